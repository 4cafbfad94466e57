"""Histogram plots written twice: as CSV for ``dvc plots show/diff`` and as a PNG for MLflow and reports.

Every stage that shows a distribution (token lengths per split, chosen vs rejected lengths, reward-model
scores) writes it through :func:`write_histogram`, so the files share one layout: a first column of bin
starts, then one count column per series.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from pipeline.outputs import write_atomic


def write_histogram(folder: Path, name: str, series: dict[str, list[float]], bins: int, x_field: str,
                    xlabel: str, ylabel: str, title: str, fmt: Callable[[float], str] = lambda x: str(int(x))) -> None:
    """Write ``<folder>/<name>.csv`` (``x_field`` = bin start, then a count per series) and ``<name>.png``
    (overlaid histograms, each labelled with its size and mean), both atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    values = [v for vs in series.values() for v in vs]
    edges = np.histogram_bin_edges(values or [0], bins=bins)
    counts = {label: np.histogram(vs, bins=edges)[0] for label, vs in series.items()}
    lines = [",".join([x_field, *counts])]
    lines += [",".join([fmt(edges[i]), *(str(int(c[i])) for c in counts.values())]) for i in range(len(edges) - 1)]
    write_atomic(folder / f"{name}.csv", "\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, vs in series.items():
        mean = f", mean {np.mean(vs):.2f}" if len(vs) else ""
        ax.hist(vs, bins=edges, alpha=0.55, label=f"{label} ({len(vs)}{mean})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    tmp = folder / f".{name}.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(folder / f"{name}.png")


def curves_png(folder: Path, out: Path) -> Path | None:
    """Draw every training curve of one stage's plot folder (the JSON plot files: rows with ``step`` or
    ``iteration`` and numeric fields) into one PNG at ``out`` for MLflow's artifact view; None if there is none."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = []  # (file stem, x field, y field, points)
    for path in sorted(Path(folder).glob("*.json")):
        rows = json.loads(path.read_text())
        if not isinstance(rows, list) or not rows or not isinstance(rows[0], dict):
            continue
        x = next((k for k in ("step", "iteration") if k in rows[0]), None)
        if x is None:
            continue
        fields = sorted({k for r in rows for k, v in r.items() if k != x and isinstance(v, (int, float))})
        for y in fields:
            points = [(r[x], r[y]) for r in rows if isinstance(r.get(y), (int, float)) and x in r]
            if points:
                series.append((path.stem, x, y, points))
    if not series:
        return None
    columns = min(3, len(series))
    rows_n = (len(series) + columns - 1) // columns
    fig, axes = plt.subplots(rows_n, columns, figsize=(4 * columns, 2.8 * rows_n), squeeze=False)
    for ax, (stem, x, y, points) in zip(axes.flat, series, strict=False):  # spare axes are hidden below
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30 else None)
        ax.set_title(f"{stem}: {y}", fontsize=9)
        ax.set_xlabel(x, fontsize=8)
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
