"""Batched generation: greedy equals transformers' generate; shared prefill; sampling settings."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from pipeline.generation import generate, left_pad
from pipeline.models import build_causal_lm, build_char_tokenizer, render_ids

QUESTIONS = ["What number comes after 41?", "Sort the digits 3 1 2.", "Hi", "Give the first letter of the word abc."]


def tiny(arch: str):
    tok = build_char_tokenizer()
    cfg = OmegaConf.create(dict(type=arch, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                                max_position=256, dropout=0.0))
    model = build_causal_lm(cfg, tok, seed=0).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # large random weights: varied tokens instead of one repeated token
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model, tok


def prompts(tok):
    return [render_ids(tok, [{"role": "user", "content": q}], add_generation_prompt=True) for q in QUESTIONS]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_decoding_equals_transformers_generate(arch):
    model, tok = tiny(arch)
    ids, mask = left_pad(prompts(tok), tok.pad_token_id)
    free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                          pad_token_id=tok.pad_token_id)[:, ids.shape[1]:]
    stop = [tok.eos_token_id, int(free[0, 5])]  # a token the first row emits: rows end at different steps
    ours, _ = generate(model, tok, prompts(tok), max_new_tokens=12, batch_size=4, stop_ids=stop)
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=stop,
                         pad_token_id=tok.pad_token_id)[:, ids.shape[1]:].tolist()
    for mine, theirs in zip(ours, ref, strict=True):
        cut = next((n + 1 for n, t in enumerate(theirs) if t in stop), len(theirs))
        assert mine.ids == theirs[:cut]
        assert mine.finished == (cut < len(theirs) or theirs[-1] in stop)
    assert any(o.finished for o in ours) and any(len(o.ids) > 1 for o in ours)


def test_shared_prefill_samples_equal_independent_greedy_runs():
    model, tok = tiny("llama")
    single, _ = generate(model, tok, prompts(tok), max_new_tokens=10, batch_size=2)
    shared, _ = generate(model, tok, prompts(tok), max_new_tokens=10, batch_size=2, samples_per_prompt=3)
    assert [o.ids for o in shared] == [o.ids for o in single for _ in range(3)]


def test_sampling_is_seeded_and_a_tiny_nucleus_is_greedy():
    model, tok = tiny("llama")
    kwargs = dict(max_new_tokens=10, batch_size=4, do_sample=True, temperature=1.0, samples_per_prompt=2)
    a, _ = generate(model, tok, prompts(tok), generator_seed=3, **kwargs)
    b, _ = generate(model, tok, prompts(tok), generator_seed=3, **kwargs)
    c, _ = generate(model, tok, prompts(tok), generator_seed=4, **kwargs)
    assert [o.ids for o in a] == [o.ids for o in b] != [o.ids for o in c]
    nucleus, _ = generate(model, tok, prompts(tok), generator_seed=3, top_p=1e-6, **kwargs)
    greedy, _ = generate(model, tok, prompts(tok), max_new_tokens=10, batch_size=4, samples_per_prompt=2)
    assert [o.ids for o in nucleus] == [o.ids for o in greedy]


def test_temperature_sharpens_sampling():
    model, tok = tiny("llama")
    common = dict(max_new_tokens=6, batch_size=4, do_sample=True, samples_per_prompt=8, generator_seed=0)
    hot, _ = generate(model, tok, prompts(tok), temperature=3.0, **common)
    cold, _ = generate(model, tok, prompts(tok), temperature=0.05, **common)
    distinct = lambda outs: sum(len({tuple(o.ids) for o in outs[i * 8:(i + 1) * 8]}) for i in range(len(QUESTIONS)))
    assert distinct(cold) < distinct(hot)
