"""What each stage of the current outputs cost: wall time, peak memory and throughput, from MLflow.

Every stage run logs ``system/wall_seconds`` and ``system/peak_rss_mb`` (:func:`pipeline.runs.stage_run`)
beside its own throughput metric; this reads the runs that made the outputs on disk
(:func:`pipeline.lineage.output_run`) and prints one Markdown table, the README's per-stage cost table.

    python -m pipeline.costs            # after dvc repro
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.schema import STAGES

# stage -> (metric, what it counts) for the throughput column; {param} fields are filled from the run's params.
THROUGHPUT = {
    "sft": ("train/tokens_per_second", "tokens/s trained"),
    "collect": ("collect/tokens_per_second", "tokens/s sampled"),
    "reward": ("train/seconds", "s training"),
    "dpo": ("train/samples_per_second", "pairs/s"),
    "ppo": ("train/seconds_per_iteration", "s/iteration"),
    "grpo": ("train/seconds_per_iteration", "s/iteration"),
    "quantize": ("{quantize.method}/speed/tokens_per_second", "tokens/s (saved method)"),
    "evaluate": ("sft/test/tokens_per_second", "tokens/s generated (sft)"),
}


def stage_costs(client, data_dir: str | Path = "data") -> list[dict]:
    """One row per stage whose output exists: its run id, wall seconds, peak RSS (MB) and throughput."""
    from pipeline.lineage import output_run

    rows = []
    for stage in STAGES:
        record = output_run(client, stage, data_dir)
        if record is None:
            continue
        run = client.get_run(record["run_id"])
        m = run.data.metrics
        key, label = THROUGHPUT.get(stage, (None, ""))
        if key and "{" in key:
            key = key.replace("{quantize.method}", run.data.params.get("quantize.method", ""))
        rows.append({"stage": stage, "run_id": run.info.run_id, "wall_seconds": m.get("system/wall_seconds"),
                     "peak_rss_mb": m.get("system/peak_rss_mb"),
                     "throughput": f"{m[key]:,.1f} {label}" if key in m else "–"})
    return rows


def format_table(rows: list[dict]) -> str:
    def num(value, pattern):
        return "–" if value is None else pattern.format(value)

    total = sum(r["wall_seconds"] or 0 for r in rows)
    lines = ["| stage | wall time | peak RSS | throughput |", "|---|---:|---:|---|"]
    lines += [f"| {r['stage']} | {num(r['wall_seconds'], '{:,.0f} s')} | {num(r['peak_rss_mb'], '{:,.0f} MB')} "
              f"| {r['throughput']} |" for r in rows]
    lines.append(f"| **all** | **{total:,.0f} s ({total / 60:.1f} min)** | | |")
    return "\n".join(lines)


def main() -> None:
    """``python -m pipeline.costs [--store URI] [--data DIR]``: the per-stage cost table of the outputs on disk."""
    import argparse

    from mlflow.tracking import MlflowClient
    from omegaconf import OmegaConf

    from pipeline.runs import tracking_uri

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("--store", help="tracking URI (default: as the stages resolve it)")
    parser.add_argument("--data", default="data", help="the stages' output root")
    args = parser.parse_args()
    client = MlflowClient(tracking_uri=args.store or tracking_uri(OmegaConf.create({"logger": {"tracking_uri": None}})))
    rows = stage_costs(client, args.data)
    if not rows:
        sys.exit(f"error: no stage output under {args.data}/ made by a run in the store (run the chain first)")
    print(format_table(rows))


if __name__ == "__main__":
    main()
