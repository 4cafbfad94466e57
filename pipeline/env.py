"""Process environment: telemetry off, offline by default, reproducible threads.

Every library in the stack has a hidden network call (measured in ../shared/STACK.md): huggingface_hub
telemetry, MLflow's telemetry host lookup, DVC analytics. They are switched off here, before those
libraries are imported, with ``os.environ.setdefault`` so a user can still set them explicitly.

``offline`` is separate: the embedded default never needs the network, so ``HF_HUB_OFFLINE=1`` is the
default; a user who sets ``offline=false`` and a hub model id gets downloads back.
"""

from __future__ import annotations

import os


def die_with_parent(sig: int | None = None) -> None:
    """Ask Linux to send this process ``sig`` (SIGTERM) when its parent dies (``prctl(PR_SET_PDEATHSIG)``): a
    stage whose ``dvc repro`` was killed, or a ``dvc`` whose wrapper was, stops instead of running on as an
    orphan. A no-op where prctl does not exist."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, int(sig or signal.SIGTERM), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def set_omp_wait_policy(policy: str | None) -> bool:
    """Set OpenMP's wait policy (``trainer.omp_wait_policy``) for this process and the ones it starts; return
    whether it applies to this process.

    OpenMP's threads spin at every barrier by default. When other processes hold the cores, a spinning thread
    burns the time slice its peer needs, and a step can slow down 5-30x (measured, README "shared CPU");
    ``passive`` makes idle threads sleep. The OpenMP runtime reads ``OMP_WAIT_POLICY`` once, when torch loads it,
    so it is set here before any stage imports torch. Where torch is already loaded (a stage called in-process
    after another) the setting would silently do nothing, so this warns and says how to get it.
    """
    import logging
    import sys

    if policy is None or os.environ.get("OMP_WAIT_POLICY", "").lower() == policy:
        return True
    if "torch" in sys.modules:
        logging.getLogger(__name__).warning(
            "trainer.omp_wait_policy=%s has no effect in this process: torch is already loaded (OMP_WAIT_POLICY=%s); "
            "run the stage in its own process (python -m pipeline.run) or export OMP_WAIT_POLICY=%s",
            policy, os.environ.get("OMP_WAIT_POLICY", "unset"), policy.upper())
        return False
    os.environ["OMP_WAIT_POLICY"] = policy.upper()
    return True


TELEMETRY_OFF = {
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "GIT_PYTHON_REFRESH": "quiet",
}


def disable_telemetry() -> None:
    """Set every known telemetry switch to off unless the user already chose a value."""
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)


def set_offline(offline: bool) -> None:
    """Forbid (or allow) Hugging Face hub downloads for this process.

    Must run before ``huggingface_hub`` is imported: it reads these variables once at import time.
    An explicit ``HF_HUB_OFFLINE`` in the environment wins over the config.
    """
    if "HF_HUB_OFFLINE" in os.environ:
        return
    os.environ["HF_HUB_OFFLINE"] = "1" if offline else "0"
    os.environ["TRANSFORMERS_OFFLINE"] = "1" if offline else "0"


# Import-time noise that says nothing about this project: torchao's CUDA-only kernels failing to load on a
# CPU machine, and torch's deprecation notice for torchao's enum registration. Errors still show.
QUIET_LOGGERS = ("torchao", "torch.utils._pytree")


def quiet_import_noise() -> None:
    import logging

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
