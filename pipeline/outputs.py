"""Atomic outputs and content digests.

A stage never writes into its final output folder: it writes into a sibling temporary folder and
renames it into place only when everything is written. A crash therefore leaves either the previous
complete output or none, never a half-written model that DVC would cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

RUN_JSON = "run.json"
# Fault injection for the crash tests: an optimizer step number (pipeline.training.KillAtStep) or "rename" (between
# the two renames of atomic_dir, the worst moment for an output folder). Inert when unset.
KILL_ENV = "POSTTRAIN_KILL_AT_STEP"


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``path`` when the block finishes without error.

    On error the temporary folder is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        path.rename(old)
    if os.environ.get(KILL_ENV) == "rename":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def remove_stale(path: str | Path) -> list[Path]:
    """Remove the temporary siblings of ``path`` (``.<name>.tmp-<pid>``, ``.<name>.old-<pid>``) that a crashed
    process left behind; one whose process is alive is another run's work in progress and stays. Returns
    what was removed."""
    path = Path(path)
    removed = []
    for leftover in path.parent.glob(f".{path.name}.*-*"):
        kind, _, pid = leftover.name[len(path.name) + 2:].rpartition("-")
        if kind not in ("tmp", "old") or not pid.isdigit() or pid_alive(int(pid)):
            continue
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
        removed.append(leftover)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def stage_output(cfg, stage: str) -> Path:
    """The folder a stage writes: ``<paths.out>/<stage>``, where ``paths.out`` null means ``paths.data`` (the
    DVC outputs); a Hydra multirun job sets it to its own folder."""
    return Path(cfg.paths.out or cfg.paths.data) / stage


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON, atomically."""
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    """Read a JSON file; a missing or malformed file names itself in the error."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None


def file_digest(path: str | Path) -> str:
    """SHA-256 of one file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def digest(path: str | Path, exclude: tuple[str, ...] = (RUN_JSON,)) -> str:
    """Content digest of a file or folder (relative names and bytes, sorted), ignoring ``exclude`` names.

    ``run.json`` is excluded by default: it holds run ids, which differ between identical runs.
    """
    path = Path(path)
    if path.is_file():
        return file_digest(path)
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name not in exclude):
        h.update(str(file.relative_to(path)).encode() + b"\0" + file_digest(file).encode())
    return h.hexdigest()
