"""Compose ``conf/`` into ``params.yaml``, the snapshot DVC stages read.

``conf/`` is the one source of truth. DVC's Hydra mode writes this same snapshot on ``dvc exp run``
(applying ``-S`` overrides); plain ``dvc repro`` does not look at ``conf/``, so after editing ``conf/``
run this command (the output is byte-identical to DVC's). A test keeps the committed ``params.yaml``
equal to the composition of ``conf/``.

    python -m pipeline.compose                      # default chain
    python -m pipeline.compose experiment=smoke     # any Hydra overrides
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
PARAMS_FILE = "params.yaml"


def compose(overrides: list[str] | None = None, conf_dir: str | Path = CONF_DIR) -> DictConfig:
    """The resolved composition of ``conf/config.yaml`` with ``overrides``, as DVC composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(Path(conf_dir).resolve()), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    OmegaConf.resolve(cfg)
    return cfg


def write_params(cfg: DictConfig, path: str | Path = PARAMS_FILE) -> None:
    """Write the snapshot exactly as DVC's Hydra mode does (``OmegaConf.to_yaml``)."""
    Path(path).write_text(OmegaConf.to_yaml(cfg), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    import pipeline  # noqa: F401  (telemetry off)
    from pipeline.run import validate_with_added_stages
    from pipeline.schema import ConfigError

    overrides = sys.argv[1:] if argv is None else argv
    try:
        cfg = compose(overrides)
        validate_with_added_stages(cfg)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    except Exception as err:  # Hydra's override errors name the override
        sys.exit(f"error: {type(err).__name__}: {err}")
    write_params(cfg)
    print(f"wrote {PARAMS_FILE} from conf/ with overrides {overrides}")


if __name__ == "__main__":
    main()
