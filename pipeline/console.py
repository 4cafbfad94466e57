"""What a stage prints: one header line, its progress bars, and a closing summary; dependency noise filtered.

A chain's log used to be mostly Lightning's accelerator banners and tips (each printed twice: Lightning's own
handler and the root one Hydra installs), MLflow's database set-up lines and deprecation warnings from inside
the libraries, none of which a user can act on. :func:`quiet_dependency_noise` drops exactly those (by message or
by the module that warns); errors, and warnings raised from this project's code, still show.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

# Lightning's INFO lines that describe the machine, not the run (they repeat for every fit, validate and test).
LIGHTNING_BANNERS = re.compile(r"^(GPU|TPU|HPU|IPU) available|^💡 Tip|^`Trainer\.fit` stopped|^You are using a CUDA")
# Warnings raised inside the libraries about their own internals or about choices this project makes on purpose.
DEPENDENCY_WARNINGS = (
    # module regex, message regex
    (r"(lightning|torch|transformers|peft|trl|mlflow|torchao|accelerate)(\.|$)", r".*deprecated"),
    (r"lightning(\.|$)", r"Your `IterableDataset` has `__len__` defined"),  # ours: __len__ for progress bars
    (r"lightning(\.|$)", r"Found \d+ module\(s\) in eval mode"),           # frozen reference copies, on purpose
    (r"lightning(\.|$)", r"The '\w+_dataloader' does not have many workers"),  # in-memory data: workers cost more
    (r"lightning(\.|$)", r"Checkpoint directory .* exists and is not empty"),  # resume beside the last checkpoint
    (r"lightning(\.|$)", r"You're resuming from a checkpoint that ended"),     # mid-epoch resume is exact here
    # register's pyfunc runs no example at save (a model load). (Its advice to type-hint predict cannot be filtered:
    # MLflow forces that one to show once.)
    (r"mlflow(\.|$)", r".*An input example was not provided"),
)


class _DropBanners(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not LIGHTNING_BANNERS.search(record.getMessage())


def quiet_dependency_noise() -> None:
    """Filter the known dependency noise (see the module docstring); idempotent."""
    for module, message in DEPENDENCY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, module=module)
    warnings.filterwarnings("ignore", category=FutureWarning, module=DEPENDENCY_WARNINGS[0][0])
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).propagate = False  # it has its own handler: through the root one too, every line came twice
    banners = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # where Lightning logs them
    if not any(isinstance(f, _DropBanners) for f in banners.filters):
        banners.addFilter(_DropBanners())
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial MLflow database tables"
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per local artifact copy
    logging.getLogger("alembic").setLevel(logging.WARNING)


def quiet_library_progress() -> None:
    """transformers' own progress bars ("Writing model shards" for every save): noise beside the stage's bars."""
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        for handler in hf_logging._get_library_root_logger().handlers:  # its own handler: where its lines print
            if not any(isinstance(f, _DropDeprecations) for f in handler.filters):
                handler.addFilter(_DropDeprecations())


class _DropDeprecations(logging.Filter):
    """transformers' notices about its own API moves ("`past_key_values` ... deprecated. Use `cache`"): logged,
    not warned, so the warnings filters above miss them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "deprecated" not in record.getMessage()


def header(stage: str, description: str, cfg) -> str:
    """The one line a stage starts with: its name, what it does, and the choices that define this run."""
    description = description.removeprefix(f"{stage}:").strip()
    model = cfg.get("model") if hasattr(cfg, "get") else None
    source = (model.get("name_or_path") or model.get("gguf_file")) if model is not None else None
    return f"== {stage}: {description} (model={source or 'embedded'}, seed={cfg.seed})"


def summary(stage: str, metrics: dict, output: str, run_id: str, limit: int = 8) -> str:
    """The closing lines of a stage: its headline metrics as a small table, where its outputs went, its run."""
    rows = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and not k.endswith("_before")][:limit]
    before = {k[: -len("_before")]: v for k, v in metrics.items() if k.endswith("_before")}
    width = max((len(k) for k, _ in rows), default=0)
    lines = [f"== {stage} done: {len(metrics)} metrics"]
    for key, value in rows:
        was = f"   (before: {_fmt(before[key])})" if key in before else ""
        lines.append(f"   {key:<{width}}  {_fmt(value)}{was}")
    lines.append(f"   outputs: {output}   MLflow run: {run_id}")
    return "\n".join(lines)


def _fmt(value) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def print_summary(text: str) -> None:
    print(text, file=sys.stdout, flush=True)
