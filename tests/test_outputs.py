"""Atomic outputs: what a crash leaves behind is cleaned up at the next start, never a live process's work."""

from __future__ import annotations

import subprocess
import sys

from pipeline.outputs import atomic_dir, remove_stale, write_atomic


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_crashed_runs_temp_folders_are_removed_and_a_live_runs_are_kept(tmp_path):
    out = tmp_path / "sft"
    crashed = tmp_path / f".sft.tmp-{dead_pid()}"
    (crashed / "model.safetensors").parent.mkdir()
    (crashed / "model.safetensors").write_bytes(b"\0" * 1024)
    old = tmp_path / f".sft.old-{dead_pid()}"
    old.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        working = tmp_path / f".sft.tmp-{live.pid}"
        working.mkdir()
        other_stage = tmp_path / f".dpo.tmp-{dead_pid()}"  # another output's leftovers: its own stage cleans them
        other_stage.mkdir()
        with atomic_dir(out) as tmp:
            (tmp / "config.json").write_text("{}")
        assert (out / "config.json").exists()
        assert not crashed.exists() and not old.exists()
        assert working.exists() and other_stage.exists()
    finally:
        live.kill()
        live.wait()
    assert remove_stale(out) == [working]  # its process is gone now


def test_a_crashed_metric_writes_temp_file_is_removed(tmp_path):
    leftover = tmp_path / f".sft.json.tmp-{dead_pid()}"
    leftover.write_text("{half")
    write_atomic(tmp_path / "sft.json", "{}\n")
    assert not leftover.exists() and (tmp_path / "sft.json").read_text() == "{}\n"
