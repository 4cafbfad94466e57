"""SFT: response-only loss mask, packing isolation, every PEFT method trains exactly its parameters,
two architectures end to end."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from conftest import compose, run_stage, save_tiny_model
from pipeline import adapters
from pipeline.chat import encode
from pipeline.models import build_causal_lm, build_char_tokenizer, load_causal_lm
from stages.sft import SFTData, SFTModule, collate, pack

MESSAGES = [
    [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}],
    [{"role": "user", "content": "Reverse the word abc."}, {"role": "assistant", "content": "cba"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Uppercase the word hi."},
     {"role": "assistant", "content": "HI"}],
]


def tiny(arch: str):
    from omegaconf import OmegaConf

    tok = build_char_tokenizer()
    cfg = OmegaConf.create(dict(type=arch, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                                max_position=256, dropout=0.0))
    return build_causal_lm(cfg, tok, seed=0).eval(), tok


def test_loss_mask_is_exactly_prompt_and_padding():
    tok = build_char_tokenizer()
    examples = [encode(tok, m) for m in MESSAGES]
    batch = collate([[ex] for ex in examples], tok.pad_token_id, packed=False)
    for row, (ids, _), messages in zip(range(3), examples, MESSAGES, strict=True):
        prompt = tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        labels = batch["labels"][row].tolist()
        expected = [-100] * n_prompt + ids[n_prompt:] + [-100] * (len(labels) - len(ids))
        assert labels == expected
        assert tok.decode(ids[n_prompt:]) == messages[-1]["content"] + tok.eos_token
        assert batch["attention_mask"][row].sum().item() == len(ids)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packing_does_not_attend_across_examples(arch):
    model, tok = tiny(arch)
    examples = [encode(tok, m) for m in MESSAGES]
    packs = pack(examples, 200)
    assert len(packs) == 1 and len(packs[0]) == 3
    batch = collate(packs, tok.pad_token_id, packed=True)
    with torch.no_grad():
        packed_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              position_ids=batch["position_ids"]).logits[0]
        at = 0
        for ids, _ in examples:
            alone = model(input_ids=torch.tensor([ids])).logits[0]
            assert torch.allclose(packed_logits[at:at + len(ids)], alone, atol=1e-5)
            at += len(ids)
    # and the packed loss equals the token-weighted mean of the separate losses
    with torch.no_grad():
        packed_loss = model(**batch).loss
        sums = [model(**collate([[ex]], tok.pad_token_id, packed=False)).loss * sum(l != -100 for l in ex[1][1:])
                for ex in examples]
        total = sum(sum(l != -100 for l in ex[1][1:]) for ex in examples)
    assert packed_loss.item() == pytest.approx((sum(sums) / total).item(), rel=1e-5)


METHODS = ["lora", "dora", "qlora", "ia3", "loha", "lokr", "prompt_tuning", "prefix_tuning", "bitfit", "none"]


@pytest.mark.parametrize("method", METHODS)
def test_every_trainable_parameter_changes_and_frozen_ones_do_not(smoke_chain, tmp_path, method):
    overrides = ["experiment=smoke", f"peft={method}", "sft.max_steps=3", "sft.warmup_steps=0", "sft.lr=0.01"]
    if method in ("prompt_tuning", "prefix_tuning"):
        overrides.append("sft.packing=false")
    cfg = compose(*overrides)
    if method == "bitfit":  # Llama has no biases: BitFit runs on GPT-2
        model_dir = save_tiny_model(tmp_path / "gpt2", "gpt2")
    else:
        model_dir = smoke_chain / "data" / "base"
    model = load_causal_lm(model_dir, quantization_config=adapters.quantization_config(cfg.peft))
    model = adapters.apply(model, cfg.peft)
    quantized_before = quantized_outputs(model)
    before = {n: p.detach().float().clone() for n, p in model.named_parameters() if not is_quantized(p)}
    trainable = set(adapters.trainable_parameters(model))
    assert trainable and (method == "none" or len(trainable) < len(before))
    data = SFTData(smoke_chain / "data" / "prepare", cfg, pad_id=0)
    module = SFTModule(model, cfg)
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, datamodule=data)
    after = dict(model.named_parameters())
    quantized_after = quantized_outputs(model)
    assert quantized_before.keys() == quantized_after.keys() and (method == "qlora") == bool(quantized_before)
    for name, out in quantized_before.items():  # a 4-bit base is repacked by its CPU kernel: compare what it computes
        assert torch.allclose(out, quantized_after[name], atol=1e-5), f"frozen 4-bit layer changed: {name}"
    unchanged = [n for n in trainable if torch.equal(before[n], after[n].detach().float())]
    changed_frozen = [n for n in before if n not in trainable and not torch.equal(before[n], after[n].detach().float())]
    assert not unchanged, f"trainable but unchanged: {unchanged[:5]}"
    assert not changed_frozen, f"frozen but changed: {changed_frozen[:5]}"


def is_quantized(param) -> bool:
    return hasattr(param, "quant_state")


def quantized_outputs(model) -> dict[str, torch.Tensor]:
    """What each 4-bit layer computes on a fixed input (its packed storage layout may change)."""
    outputs = {}
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")  # own weight only: adapter wrappers expose their base's
        if weight is not None and is_quantized(weight) and hasattr(module, "in_features"):
            x = torch.linspace(-1, 1, module.in_features)[None]
            with torch.no_grad():
                outputs[name] = module(x).float().clone()
    return outputs


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_target_modules_are_found_per_architecture(arch):
    model, _ = tiny(arch)
    expected = {"llama": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
                "gpt2": ["c_attn", "c_fc", "c_proj"]}[arch]
    assert adapters.target_modules(model) == expected
    assert adapters.feedforward_modules(model) == {"llama": ["mlp.down_proj"], "gpt2": ["mlp.c_proj"]}[arch]


def test_bitfit_on_llama_says_why_it_cannot(smoke_chain):
    from pipeline.schema import ConfigError

    model = load_causal_lm(smoke_chain / "data" / "base")
    with pytest.raises(ConfigError, match="has no bias parameters"):
        adapters.apply(model, compose("peft=bitfit").peft)


def test_unknown_peft_option_names_the_key(smoke_chain):
    from pipeline.schema import ConfigError

    model = load_causal_lm(smoke_chain / "data" / "base")
    with pytest.raises(ConfigError, match="config key 'peft.options.rank' is not an option of peft.LoraConfig"):
        adapters.apply(model, compose("+peft.options.rank=4").peft)


@pytest.mark.slow  # the whole chain, twice
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_chain_on_a_real_model_of_each_architecture(in_tmp, arch):
    from transformers import AutoModelForCausalLM

    folder = save_tiny_model(in_tmp / f"tiny-{arch}", arch)
    real = ("model=hf", f"model.name_or_path={folder}", "sft.peft=null")  # a real model's SFT goes through LoRA
    run_stage("base", *real)
    run_stage("prepare", *real)
    metrics = run_stage("sft", *real)
    assert metrics["val/loss"] < 0.99 * -torch.log(torch.tensor(1 / 104)).item() or metrics["val/perplexity"] < metrics["val/perplexity_before"]
    out = in_tmp / "data" / "sft"
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.config.model_type == arch
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(folder)
    assert set(adapter_cfg["target_modules"]) == set(adapters.target_modules(merged))
    # sorted: peft keeps them in a set, whose order PYTHONHASHSEED changes, so the saved bytes (and DVC's hash of
    # the output) changed from run to run and reran everything downstream of an unchanged model
    assert adapter_cfg["target_modules"] == sorted(adapter_cfg["target_modules"])
    # The rest of the chain on the same real model: pairs, a reward model with its own head, DPO, evaluation.
    assert run_stage("collect", *real)["collect/pairs"] > 0
    run_stage("reward", *real)
    from transformers import AutoModelForSequenceClassification

    assert AutoModelForSequenceClassification.from_pretrained(in_tmp / "data" / "reward").config.model_type == arch
    run_stage("dpo", *real)
    run_stage("ppo", *real)      # the critic adapter and value head on a real architecture's hidden states
    run_stage("grpo", *real)
    results = run_stage("evaluate", *real)
    assert set(results) == {"base_zero_shot", "base_few_shot", "base_cot", "base_chat", "sft", "dpo", "ppo", "grpo"}
    assert "test/reward_score" in results["ppo"] and "test/reward_win_rate_vs_sft" in results["grpo"]
    assert "test/kl_to_sft" in results["dpo"] and "test/win_rate_vs_sft" in results["dpo"]


def test_merged_model_equals_base_plus_adapter(smoke_chain, in_tmp):
    import shutil

    from peft import PeftModel

    for name in ("base", "prepare"):
        shutil.copytree(smoke_chain / "data" / name, in_tmp / "data" / name)
    run_stage("sft", "sft.peft=null")                     # through the peft group: LoRA
    out = in_tmp / "data" / "sft"
    merged = load_causal_lm(out).eval()
    unmerged = PeftModel.from_pretrained(load_causal_lm(in_tmp / "data" / "base"), str(out / "adapter")).eval()
    ids = torch.tensor([[2, 5, 40, 41, 42, 6]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, unmerged(input_ids=ids).logits, atol=1e-5)
    run = json.loads((out / "run.json").read_text())
    assert set(run["inputs"]) == {"base", "prepare"}


def test_sft_can_fine_tune_fully_while_alignment_keeps_its_adapter():
    from pipeline.adapters import stage_peft

    cfg = compose("peft=dora", "peft@sft.peft=none")
    assert stage_peft(cfg, "sft").method == "none" and stage_peft(cfg, "dpo").method == "lora"
    assert stage_peft(cfg, "dpo").options.use_dora
    assert stage_peft(compose("peft=dora", "sft.peft=null"), "sft").options.use_dora   # null: the peft group
    assert stage_peft(compose("peft=qlora", "peft@sft.peft=none"), "sft").quantize_base is None  # nothing to quantize under


def test_every_configurable_peft_method_maps_to_a_peft_class_or_is_handled_here():
    import peft

    from pipeline.schema import PEFT_METHODS

    assert set(adapters.PEFT_CLASSES) | {"bitfit", "none"} == set(PEFT_METHODS)
    assert all(hasattr(peft, cls) for cls in adapters.PEFT_CLASSES.values())
