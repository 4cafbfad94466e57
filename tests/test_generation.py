"""Batched generation: greedy equals transformers' generate; shared prefill; sampling settings."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from pipeline.generation import generate
from pipeline.models import build_causal_lm, build_char_tokenizer, render_ids, special_ids
from pipeline.tokens import left_pad

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
    ends = stop + sorted(special_ids(tok) - set(stop))  # any special token ends a response too
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=ends,
                         pad_token_id=tok.pad_token_id)[:, ids.shape[1]:].tolist()
    for mine, theirs in zip(ours, ref, strict=True):
        cut = next((n + 1 for n, t in enumerate(theirs) if t in ends), len(theirs))
        assert mine.ids == theirs[:cut]
        assert mine.finished == (cut < len(theirs) or theirs[-1] in ends)
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


class Scripted(torch.nn.Module):
    """A causal LM that emits a fixed token script, whatever the prompt (a real tiny model underneath
    supplies the cache and config): to test where generation stops."""

    def __init__(self, model, script: list[int]):
        super().__init__()
        self.model, self.script, self.config = model, script, model.config
        self.generation_config = model.generation_config

    def forward(self, input_ids, **kwargs):
        out = self.model(input_ids=input_ids, **kwargs)
        self.calls = 0 if input_ids.shape[1] > 1 else self.calls + 1  # a prefill starts the script again
        logits = torch.full_like(out.logits[:, -1:], -1e4)  # decoding reads the last position only
        logits[..., self.script[min(self.calls, len(self.script) - 1)]] = 0.0
        out.logits = logits
        return out


def chatml_model(script_text: list[str]):
    from conftest import chat_tokenizer

    tok = chat_tokenizer("chatml")  # eos <|endoftext|>, turn end <|im_end|>
    cfg = OmegaConf.create(dict(type="llama", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                max_position=256, dropout=0.0))
    model = build_causal_lm(cfg, tok, seed=0).eval()
    model.generation_config.eos_token_id = tok.eos_token_id  # only eos declared: the template must be read
    return Scripted(model, tok.convert_tokens_to_ids(script_text)), tok


def test_a_reply_ends_at_the_templates_turn_end_when_it_is_not_eos():
    model, tok = chatml_model(["4", "2", "<|im_end|>", "x", "y", "<|endoftext|>"])
    prompt = render_ids(tok, [{"role": "user", "content": "What is 17 + 25?"}], add_generation_prompt=True)
    (out,), _ = generate(model, tok, [prompt], max_new_tokens=8)
    assert out.finished and out.text == "42"
    assert out.ids == tok.convert_tokens_to_ids(["4", "2", "<|im_end|>"])


def test_a_special_token_mid_reply_ends_it_instead_of_gluing_what_follows():
    model, tok = chatml_model(["4", "<|im_start|>", "u", "s", "e", "r"])
    prompt = render_ids(tok, [{"role": "user", "content": "What is 3 + 1?"}], add_generation_prompt=True)
    (out,), _ = generate(model, tok, [prompt], max_new_tokens=8)
    assert out.text == "4"


def test_end_of_turn_ids_read_the_generation_configs_list():
    from pipeline.models import end_of_turn_ids

    model, tok = chatml_model(["4"])
    extra = tok.convert_tokens_to_ids("<|im_start|>")
    model.generation_config.eos_token_id = [tok.eos_token_id, extra]
    ids = end_of_turn_ids(tok, model)
    assert set(ids) == {tok.eos_token_id, extra, tok.convert_tokens_to_ids("<|im_end|>")}


def test_sampling_through_a_prompt_learning_adapter():
    """peft prompt tuning decodes through generate(): sampling kwargs must reach it once (issue 19)."""
    from peft import PromptTuningConfig, get_peft_model

    model, tok = tiny("llama")
    peft_model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    outs, _ = generate(peft_model, tok, prompts(tok), max_new_tokens=6, batch_size=4, do_sample=True,
                       temperature=1.0, generator_seed=1, samples_per_prompt=2)
    assert len(outs) == 2 * len(QUESTIONS) and all(o.ids for o in outs)
