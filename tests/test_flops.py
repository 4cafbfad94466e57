"""The FLOP count behind the benchmarks' MFU, checked by hand on a tiny Llama with and without LoRA."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from pipeline.flops import linear_parameters, matmul_peak, training_flops


def test_flops_of_a_lora_step_by_hand():
    from test_generation import tiny

    from pipeline import adapters

    model, tok = tiny("llama")                      # 2 layers, hidden 32, 2 heads, MLP 64, vocab len(tok)
    per_layer = 4 * 32 * 32 + 3 * 32 * 64            # q, k, v, o and gate, up, down
    vocab = len(tok)
    for p in model.parameters():
        p.requires_grad_(False)
    assert linear_parameters(model) == (2 * per_layer, 0, vocab * 32)
    lora = adapters.apply(model, OmegaConf.create({"method": "lora", "target_modules": ["q_proj", "v_proj"],
                                                    "quantize_base": None, "options": {"r": 4, "lora_alpha": 8}}))
    frozen, trained, head = linear_parameters(lora)
    assert (frozen, trained, head) == (2 * per_layer, 2 * 2 * (32 * 4 + 4 * 32), vocab * 32)
    # 3 sequences of 10 tokens, 12 of them read by the loss
    attention = 3 * (2 * 2 * 10 * 32 * 2 / 2)       # forward: scores and values, causal half; x3 with backward
    expected = 30 * (4 * frozen + 6 * trained + attention) + 12 * 4 * head
    assert training_flops(lora, tokens=30, loss_tokens=12, seq_len=10) == pytest.approx(expected)


def test_the_matmul_peak_is_a_plausible_flop_rate():
    peak = matmul_peak(size=256, repeats=2)
    assert 1e8 < peak < 1e14                         # between a slow core and a large GPU: FLOP/s, not s or FLOPs
