"""Log-probs from hidden states on selected positions, in chunks (trainer.logits_chunk): the same values and
gradients as the model's full logits, for every way a stage uses them (SFT's loss, DPO's response sums),
through adapters and virtual tokens."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from pipeline.tokens import final_hidden_states, selected_logps, sequence_logps, token_logps


def lora(model, on_head: bool = False):
    from pipeline import adapters

    targets = ["q_proj", "v_proj", "c_attn"] + (["lm_head"] if on_head else [])
    present = [t for t in targets if any(name.endswith(t) for name, _ in model.named_modules())]
    wrapped = adapters.apply(model, OmegaConf.create({"method": "lora", "target_modules": present,
                                                       "quantize_base": None, "options": {"r": 4, "lora_alpha": 8}}))
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return wrapped


def batch(tok, rows: int = 3, width: int = 24):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, len(tok), (rows, width), generator=g)
    attention = torch.ones_like(ids)
    attention[1, -5:] = 0                               # a right-padded row
    wanted = torch.zeros_like(ids)
    wanted[:, 10:] = 1                                   # "responses": the last columns
    return ids, attention, wanted * attention


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return out


@pytest.mark.parametrize("arch, on_head", [("llama", False), ("gpt2", False), ("llama", True)])
@pytest.mark.parametrize("chunk", [None, 7, 1024])
def test_selected_logps_equal_the_full_logits_in_values_and_gradients(arch, on_head, chunk):
    from test_generation import tiny

    model, tok = tiny(arch)
    model = lora(model, on_head)
    model.train()
    ids, attention, wanted = batch(tok)
    full = model(input_ids=ids, attention_mask=attention).logits
    reference = token_logps(full[:, :-1], ids[:, 1:])[0] * wanted[:, 1:]
    reference.sum().backward()
    expected = grads(model)
    ours = sequence_logps(model, ids, wanted, chunk, attention_mask=attention)
    ours.sum().backward()
    got = grads(model)
    assert torch.allclose(ours, reference, atol=1e-5)
    assert (ours[wanted[:, 1:] == 0] == 0).all()
    assert expected.keys() == got.keys() and expected                   # the same trained parameters get gradients
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-5, rtol=1e-4), name
    assert type(model.get_base_model().get_output_embeddings()).__name__ != "Identity"   # the head is back


def test_the_head_is_restored_after_an_error_and_no_grad_keeps_nothing():
    from test_generation import tiny

    model, tok = tiny("llama")
    head = model.get_output_embeddings()
    with pytest.raises(RuntimeError), final_hidden_states(model):
        raise RuntimeError("a crash inside the forward")
    assert model.get_output_embeddings() is head
    ids, attention, wanted = batch(tok)
    with torch.no_grad():
        logp = sequence_logps(model, ids, wanted, 4, attention_mask=attention)
    assert not logp.requires_grad and logp.shape == (3, 23)
    hidden = torch.randn(2, 5, 32)
    assert not selected_logps(hidden, head, torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5), 4).any()


def test_virtual_tokens_still_reach_the_hidden_states():
    """A prompt-tuning adapter prepends virtual tokens inside the model's forward; swapping only the head keeps
    them (calling the decoder directly would drop them)."""
    from test_generation import tiny

    from pipeline import adapters

    model, tok = tiny("llama")
    tuned = adapters.apply(model, OmegaConf.create({"method": "prompt_tuning", "target_modules": "auto",
                                                     "quantize_base": None, "options": {"num_virtual_tokens": 4}}))
    ids, attention, wanted = batch(tok)
    full = tuned(input_ids=ids, attention_mask=attention).logits[:, -ids.shape[1]:]
    reference = token_logps(full[:, :-1], ids[:, 1:])[0] * wanted[:, 1:]
    with final_hidden_states(tuned) as head:
        hidden = tuned(input_ids=ids, attention_mask=attention).logits[:, -ids.shape[1]:]
    ours = selected_logps(hidden[:, :-1], head, ids[:, 1:], wanted[:, 1:], 8)
    assert torch.allclose(ours, reference, atol=1e-5)


def test_sft_loss_with_chunked_logits_equals_the_models_own_loss_on_packed_rows():
    from test_generation import tiny

    from pipeline.chat import encode
    from stages.sft import SFTModule, collate, pack

    model, tok = tiny("llama")
    rows = [[{"role": "user", "content": f"What number comes after {i}?"}, {"role": "assistant", "content": str(i + 1)}]
            for i in range(6)]
    packed = collate(pack([encode(tok, r) for r in rows], 96), tok.pad_token_id, True)
    cfg = lambda chunk: OmegaConf.create({"sft": {}, "trainer": {"logits_chunk": chunk}})   # noqa: E731
    plain, chunked = SFTModule(model, cfg(None)), SFTModule(model, cfg(5))
    a = plain(packed)
    a.backward()
    expected = grads(model)
    b = chunked(packed)
    b.backward()
    assert abs(a.item() - b.item()) < 1e-5
    for name, g in grads(model).items():
        assert torch.allclose(g, expected[name], atol=1e-5, rtol=1e-4), name


def test_every_adapter_config_is_written_with_sorted_module_sets(tmp_path):
    """peft lists target_modules in hash order (PYTHONHASHSEED): the policy's and the PPO critic's configs are
    rewritten sorted, so equal adapters are equal bytes (a fresh clone's chain reran ppo's outputs for nothing)."""
    import json

    from pipeline.adapters import canonical_adapter_configs

    for sub in ("", "critic"):
        (tmp_path / sub).mkdir(exist_ok=True)
        (tmp_path / sub / "adapter_config.json").write_text(json.dumps(
            {"target_modules": ["v_proj", "down_proj", "q_proj"], "base_model_name_or_path": "/abs/path"}))
    canonical_adapter_configs(tmp_path, "data/sft")
    top, critic = (json.loads((tmp_path / s / "adapter_config.json").read_text()) for s in ("", "critic"))
    assert top["target_modules"] == critic["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert top["base_model_name_or_path"] == "data/sft" and critic["base_model_name_or_path"] == "/abs/path"
