"""The whole smoke chain on tiny random models of real families, in their own chat conventions.

Four families beyond the embedded Llama and GPT-2, each saved with ``save_pretrained`` and run as a user
runs a real model (``model=hf model.name_or_path=<folder>``) from base through evaluate:

- Qwen2 with ChatML: no BOS token, a default system prompt, eos ``<|endoftext|>`` but turns end with
  ``<|im_end|>``;
- Gemma with its ``<start_of_turn>``/``<end_of_turn>`` template and narrow (16-wide) key/value projections;
- GPT-NeoX with Llama 3's header template, turns ending with ``<|eot_id|>`` (declared in the generation
  config's eos list beside ``<|end_of_text|>``);
- Phi-3 with its template, pad = eos.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import CHAT_STYLES, run_stage, save_tiny_config_model

pytestmark = pytest.mark.slow

SIZE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=512)
FAMILIES = {
    "qwen2": ("Qwen2Config", "chatml", dict(SIZE, num_key_value_heads=2)),
    "gemma": ("GemmaConfig", "gemma", dict(SIZE, num_key_value_heads=1, head_dim=16)),
    "gpt_neox": ("GPTNeoXConfig", "llama3", dict(SIZE)),
    "phi3": ("Phi3Config", "phi3", dict(SIZE, num_key_value_heads=4)),
}
STAGES = ("base", "prepare", "sft", "collect", "reward", "dpo", "ppo", "grpo", "quantize", "evaluate")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_smoke_chain_runs_through_evaluate(family, tmp_path, monkeypatch):
    config_class, style, fields = FAMILIES[family]
    folder = save_tiny_config_model(tmp_path / family, config_class, style=style, **fields)
    monkeypatch.chdir(tmp_path)
    # Every method that runs on a CPU, not the smoke experiment's two: narrow layers of these families must stay
    # fp32 where a kernel cannot take them, and no method may fail.
    methods = "[int8_weight_only,int8_weight_only_asym,int8_static,int8_dynamic,bnb_nf4,intx_w4a8,fp16]"
    real = ("model=hf", f"model.name_or_path={folder}", "sft.max_steps=150", "sft.lr=3e-3", f"quantize.compare={methods}")
    metrics = {stage: run_stage(stage, *real) for stage in STAGES}

    bos, eos, pad, turn_end, _ = CHAT_STYLES[style]
    card = json.loads(Path("data/prepare/card.json").read_text())["template"]
    assert (card["end_of_turn"], card["bos"], card["eos"]) == (turn_end, bos, eos)
    if style == "chatml":  # the default system prompt is recorded
        assert "You are a helpful assistant." in card["preamble"]
    if style == "phi3":
        assert card["pad_is_eos"]

    results = metrics["evaluate"]
    assert {"base_zero_shot", "base_few_shot", "base_chat", "sft", "dpo", "ppo", "grpo", "quantize"} <= set(results)
    # SFT learned to close its turn with the template's turn end, and generation stopped there
    assert results["sft"]["test/unfinished_rate"] < 0.5, results["sft"]["test/unfinished_rate"]
    generations = [json.loads(line) for line in Path("data/evaluate/generations.jsonl").read_text().splitlines()]
    finished = [g for g in generations if g["variant"] == "sft" and g["finished"]]
    assert finished and not any(marker in g["response"] for g in finished for marker in (turn_end, eos))
    report = json.loads(Path("data/quantize/report.json").read_text())
    assert not report.get("failed"), report.get("failed")  # narrow layers stay fp32, no method fails
    assert all(0 <= results[v]["test/accuracy_ci_low"] <= results[v]["test/accuracy"]
               <= results[v]["test/accuracy_ci_high"] <= 1 for v in results)
