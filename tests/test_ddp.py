"""Data-parallel training: a training stage runs with DDP in 2 CPU processes over gloo."""

from __future__ import annotations

import pytest

from conftest import copy_chain, run_stage


@pytest.mark.slow  # two gloo processes, each importing the stack and training
def test_sft_trains_with_ddp_in_two_cpu_processes(smoke_chain, tmp_path, monkeypatch):
    import torch

    from pipeline.models import load_causal_lm

    monkeypatch.chdir(copy_chain(smoke_chain, tmp_path / "chain"))
    metrics = run_stage("sft", "trainer=ddp_cpu")
    assert metrics["train/world_size"] == 2                     # two gloo processes trained
    assert metrics["val/perplexity"] < metrics["val/perplexity_before"]
    trained, base = load_causal_lm("data/sft"), load_causal_lm("data/base")
    changed = [n for (n, p), (_, q) in zip(trained.named_parameters(), base.named_parameters(), strict=True) if not torch.equal(p, q)]
    assert changed                                              # the merged adapter moved the weights


def test_step_batches_shard_by_rank_without_overlap(monkeypatch):
    from pipeline import training
    from pipeline.training import StepBatches

    stream = StepBatches(num_items=40, batch_size=4, total=3, seed=0, collate=lambda idx: idx)
    single = [b for b in StepBatches(40, 4, 6, 0, lambda idx: idx)]
    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(training, "rank_and_world", lambda rank=rank: (rank, 2))
        shards.append(list(stream))
    assert shards[0] == single[0::2] and shards[1] == single[1::2]   # rank r takes stream batch 2k + r
