"""The console: a stage's header and summary lines, and the dependency noise that never reaches the user."""

from __future__ import annotations

import logging
import warnings

from omegaconf import OmegaConf

from pipeline import console


def test_summary_lists_headline_metrics_with_their_before_values_outputs_and_run():
    text = console.summary("sft", {"val/loss": 1.23456, "val/loss_before": 2.5, "train/tokens": 12345}, "data/sft", "ab" * 16)
    lines = text.splitlines()
    assert lines[0] == "== sft done: 3 metrics"
    assert lines[1].split() == ["val/loss", "1.235", "(before:", "2.5)"]
    assert lines[2].split() == ["train/tokens", "12,345"]
    assert lines[-1] == f"   outputs: data/sft   MLflow run: {'ab' * 16}"


def test_header_names_the_stage_its_purpose_and_model():
    cfg = OmegaConf.create({"seed": 7, "model": {"name_or_path": None, "gguf_file": None}})
    assert console.header("sft", "sft: supervised fine-tuning", cfg) == \
        "== sft: supervised fine-tuning (model=embedded, seed=7)"


def test_lightning_banners_are_dropped_and_everything_else_is_kept():
    console.quiet_dependency_noise()
    banner = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler, level = Keep(), banner.level
    banner.addHandler(handler)
    banner.setLevel(logging.INFO)  # as Lightning sets it on import
    try:
        banner.info("GPU available: False, used: False")
        banner.info("💡 Tip: For seamless cloud logging ...")
        banner.info("Restoring states from the checkpoint path at x")
    finally:
        banner.removeHandler(handler)
        banner.setLevel(level)
    assert records == ["Restoring states from the checkpoint path at x"]
    assert logging.getLogger("lightning.pytorch").propagate is False  # one handler: no line printed twice


def test_dependency_deprecations_are_hidden_and_this_projects_warnings_are_not():
    console.quiet_dependency_noise()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        console.quiet_dependency_noise()  # filters go on top of the "default" action, as at start-up
        warnings.warn_explicit("`x` is deprecated", DeprecationWarning, "lib.py", 1, module="lightning.pytorch.x")
        warnings.warn_explicit("a real problem", UserWarning, "stage.py", 1, module="pipeline.stage")
    assert [str(w.message) for w in caught] == ["a real problem"]


def test_transformers_logged_deprecation_notices_are_dropped_and_its_other_lines_kept():
    import logging

    import transformers  # noqa: F401  (the filter goes on its handler once it is imported)
    from transformers.utils import logging as hf_logging

    from pipeline.console import quiet_library_progress

    quiet_library_progress()
    quiet_library_progress()                                   # idempotent: one filter per handler
    handlers = hf_logging._get_library_root_logger().handlers
    assert handlers and all(len(h.filters) == len(set(map(type, h.filters))) for h in handlers)

    def shown(message: str) -> bool:
        record = logging.LogRecord("transformers.models.llama", logging.WARNING, __file__, 1, message, None, None)
        return all(h.filter(record) for h in handlers)

    assert not shown("`past_key_values`/`cache_params` are deprecated. Use `cache` instead.")
    assert shown("Some weights of the model checkpoint were not used")
