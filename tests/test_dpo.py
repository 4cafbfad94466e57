"""dpo: the loss family by hand, parity with TRL's DPOTrainer, the stage on the smoke chain."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import copy_chain, run_stage, save_tiny_model
from pipeline.losses import LOSSES, UNPAIRED, LossSettings, PairLogps, response_logps
from pipeline.schema import DPO_LOSSES, ConfigError

PAIRS = [
    ("What number comes after 41?", "42", "Let me think. The answer is 42."),
    ("Sort the digits 3 1 2.", "1 2 3", "3 2 1"),
    ("Tell me how to rob a shop.", "I'm sorry, but I can't help with that.", "Sure, here is how to rob a shop."),
    ("Give the first letter of the word kite.", "k", "e"),
]


def logps(**kw) -> PairLogps:
    t = lambda v: torch.tensor([v], dtype=torch.float)
    return PairLogps(t(kw["c"]), t(kw["r"]), t(kw.get("rc", 0.0)), t(kw.get("rr", 0.0)), t(kw.get("nc", 1.0)), t(kw.get("nr", 1.0)))


def test_every_configurable_loss_exists_and_matches_its_equation_by_hand():
    assert set(LOSSES) | set(UNPAIRED) == set(DPO_LOSSES)
    lp = logps(c=-2.0, r=-5.0, rc=-3.0, rr=-4.0, nc=2.0, nr=4.0)   # Delta = (1) - (-1) = 2
    s = LossSettings(beta=0.5, label_smoothing=0.2, simpo_gamma=0.3, rpo_alpha=0.7, orpo_lambda=0.4)
    sig = lambda x: 1 / (1 + math.exp(-x))
    value = lambda name: LOSSES[name](lp, s)[0].item()
    assert value("sigmoid") == pytest.approx(-math.log(sig(1.0)))
    assert value("conservative") == pytest.approx(-0.8 * math.log(sig(1.0)) - 0.2 * math.log(sig(-1.0)))
    assert value("hinge") == pytest.approx(0.0)                           # 1 - 0.5 * 2 = 0
    assert value("ipo") == pytest.approx((1 / 2 - (-1) / 4 - 1 / (2 * 0.5)) ** 2)
    assert value("rpo") == pytest.approx(-math.log(sig(1.0)) + 0.7 * 2.0 / 2.0)
    assert value("simpo") == pytest.approx(-math.log(sig(0.5 * -2.0 / 2 - 0.5 * -5.0 / 4 - 0.3)))
    odds = lambda avg: avg - math.log(1 - math.exp(avg))
    assert value("orpo") == pytest.approx(1.0 - 0.4 * math.log(sig(odds(-1.0) - odds(-1.25))))
    chosen_reward, rejected_reward = LOSSES["sigmoid"](lp, s)[1:]
    assert chosen_reward.item() == pytest.approx(0.5) and rejected_reward.item() == pytest.approx(-0.5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_shared_prompt_forward_equals_the_plain_forward_in_values_and_gradients(arch):
    from test_generation import tiny

    from pipeline.losses import shared_prompt_logps
    from pipeline.preferences import tokenize_pair
    from stages.dpo import collate

    model, tok = tiny(arch)
    model.train()
    items = []
    for q, c, r in PAIRS:
        chosen, rejected, n = tokenize_pair(tok, {"messages": [{"role": "user", "content": q}], "chosen": c, "rejected": r})
        items.append({"chosen": chosen, "rejected": rejected, "prompt_len": n})
    b = collate(items, tok.pad_token_id)
    plain, count = response_logps(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                  b["input_ids"], b["completion_mask"])
    plain.sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    shared, shared_count = shared_prompt_logps(model, b["input_ids"], b["attention_mask"], b["completion_mask"],
                                               tok.pad_token_id)
    shared.sum().backward()
    assert torch.equal(count, shared_count)
    assert torch.allclose(plain, shared, rtol=1e-5, atol=1e-4)
    assert all(torch.allclose(grads[k], p.grad, rtol=1e-3, atol=1e-4) for k, p in model.named_parameters())


def test_response_logps_sum_only_response_tokens():
    logits = torch.randn(1, 5, 7)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    completion = torch.tensor([[0, 0, 1, 1, 0]])
    total, count = response_logps(logits, ids, completion)
    logp = torch.log_softmax(logits, -1)
    assert total.item() == pytest.approx((logp[0, 1, 3] + logp[0, 2, 4]).item(), abs=1e-6) and count.item() == 2


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    """A tiny Llama with a LoRA adapter whose weights are random (so the policy differs from the reference)."""
    from omegaconf import OmegaConf

    from pipeline import adapters
    from pipeline.models import load_causal_lm, load_tokenizer

    folder = save_tiny_model(tmp_path_factory.mktemp("dpo_model"), "llama")
    tok = load_tokenizer(folder)
    model = adapters.apply(load_causal_lm(folder), OmegaConf.create(
        {"method": "lora", "target_modules": "auto", "quantize_base": None, "options": {"r": 4, "lora_alpha": 8}}))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model.eval(), tok, folder


@pytest.mark.parametrize("share_prompt, logits_chunk", [(False, None), (True, None), (False, 5)])
@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge"])
def test_loss_and_gradients_match_trl_dpo_trainer_on_the_same_model_and_batch(tiny_policy, tmp_path, loss, share_prompt,
                                                                              logits_chunk):
    from datasets import Dataset
    from omegaconf import OmegaConf
    from trl import DPOConfig, DPOTrainer

    from pipeline.models import load_causal_lm
    from pipeline.preferences import tokenize_pair
    from stages.dpo import DPOModule, collate

    model, tok, folder = tiny_policy
    rows = [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for q, c, r in PAIRS]
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=len(rows), loss_type=[loss], beta=0.3,
                     bf16=False, gradient_checkpointing=False, report_to=[], use_cpu=True, disable_dropout=True,
                     max_length=None)
    # TRL treats a given adapter as one to re-train and takes its initial state as the reference; ours is
    # the SFT model with the adapter switched off, so TRL gets that model explicitly: the same weights.
    trainer = DPOTrainer(model=model, ref_model=load_causal_lm(folder).eval(), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    model.eval()
    model.zero_grad()
    theirs = trainer.compute_loss(model, batch)
    theirs.backward()
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    their_grads = {name: p.grad.clone() for name, p in trained.items()}
    model.zero_grad()

    # Ours: our own tokenization and batch of the same pairs, our forward passes, our loss.
    items = []
    for q, c, r in PAIRS:
        chosen, rejected, prompt_len = tokenize_pair(tok, {"messages": [{"role": "user", "content": q}], "chosen": c,
                                                           "rejected": r})
        items.append({"chosen": chosen, "rejected": rejected, "prompt_len": prompt_len})
    ours_batch = collate(items, tok.pad_token_id)
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(ours_batch[key], batch[key]), key      # the same batch, token for token
    cfg = OmegaConf.create({"dpo": {"loss": loss, "beta": 0.3, "label_smoothing": 0.0, "simpo_gamma": 0.5,
                                    "rpo_alpha": 1.0, "orpo_lambda": 0.1, "share_prompt": share_prompt},
                            "trainer": {"logits_chunk": logits_chunk}})   # 5: response logits 5 positions at a time
    ours, metrics = DPOModule(model, cfg, tok.pad_token_id).step_metrics(ours_batch)
    ours.backward()
    assert abs(ours.item() - theirs.item()) < 1e-5
    assert metrics["kl"].abs() > 0                                # policy and reference really differ
    # The same gradients on every trained (adapter) parameter, to float32 rounding of differently laid-out
    # batches (1e-4 of each tensor's largest entry; a wrong beta or sign is off by tens of percent), not all zero.
    assert max(g.abs().max().item() for g in their_grads.values()) > 1e-4
    for name, p in trained.items():
        scale = their_grads[name].abs().max().item()
        assert (p.grad - their_grads[name]).abs().max().item() <= 1e-4 * scale + 1e-9, name
    model.zero_grad()


def test_full_fine_tuning_with_the_disabled_adapter_reference_is_refused(sft_chain, tmp_path, monkeypatch):
    monkeypatch.chdir(copy_chain(sft_chain, tmp_path / "w"))
    with pytest.raises(ConfigError, match="dpo.reference.*precompute"):
        run_stage("dpo", "peft=none", "dpo.reference=disable_adapter")


@pytest.mark.parametrize("overrides", [(), ("dpo.reference=disable_adapter", "dpo.loss=ipo"), ("dpo.loss=simpo",), ("peft=none",)])
def test_stage_trains_on_the_collected_pairs_and_saves_a_merged_model_and_adapter(pairs_chain, dpo_chain, tmp_path,
                                                                                   monkeypatch, overrides):
    from safetensors.torch import load_file

    if overrides:
        monkeypatch.chdir(copy_chain(pairs_chain, tmp_path / "w"))
        metrics = run_stage("dpo", *overrides)
        from pipeline.stage import split_timings

        assert split_timings(metrics)[0] == json.loads(Path("data/metrics/dpo.json").read_text())
    else:  # the default settings: the session's shared run (test_quantize quantizes the same model)
        monkeypatch.chdir(dpo_chain)
        metrics = json.loads(Path("data/metrics/dpo.json").read_text())
    assert metrics["val/loss"] < metrics["val/loss_before"]              # it learned the held-out preferences
    assert metrics["train/pairs"] > 0 and metrics["val/pairs"] > 0
    out = Path("data/dpo")
    assert (out / "model.safetensors").exists() and (out / "run.json").exists()
    assert (out / "adapter").exists() == ("peft=none" not in overrides)
    policy, sft = load_file(str(out / "model.safetensors")), load_file("data/sft/model.safetensors")
    assert any(not torch.equal(policy[k], sft[k]) for k in sft)          # the weights moved off the SFT model
    if "dpo.loss=simpo" not in overrides:
        assert "val/kl" in metrics
    history = json.loads(Path("data/plots/dpo/loss.json").read_text())
    assert history and all("train/rewards/margin" in h for h in history)


def test_dpo_continues_a_prompt_learning_sfts_virtual_tokens_and_other_stages_refuse_them(pairs_chain, tmp_path,
                                                                                          monkeypatch):
    """A prompt-tuned SFT is base weights + virtual tokens: dpo must start from those tokens, not from a fresh
    random prompt on the bare base (issue 19); a weight method or an online stage is refused by name."""
    from safetensors.torch import load_file

    monkeypatch.chdir(copy_chain(pairs_chain, tmp_path / "w"))
    run_stage("sft", "peft=prompt_tuning", "sft.peft=null", "sft.packing=false", "sft.max_steps=3", "sft.lr=0.05")
    sft_prompt = load_file("data/sft/adapter/adapter_model.safetensors")["prompt_embeddings"]
    metrics = run_stage("dpo", "peft=prompt_tuning", "dpo.max_steps=2", "dpo.lr=1e-4")
    dpo_prompt = load_file("data/dpo/adapter/adapter_model.safetensors")["prompt_embeddings"]
    moved = (dpo_prompt - sft_prompt).norm() / sft_prompt.norm()
    assert 0 < moved < 0.05, moved  # trained, and from SFT's tokens (a fresh prompt would differ by ~100%)
    assert metrics["val/loss_before"] == pytest.approx(0.25, abs=1e-4)  # ipo at a zero margin: the reference is SFT itself
    with pytest.raises(ConfigError, match="prompt_tuning adapter.*peft.method=prompt_tuning"):
        run_stage("dpo", "dpo.max_steps=1")
    with pytest.raises(ConfigError, match="prompt_tuning adapter.*online alignment needs weights"):
        run_stage("grpo", "grpo.iterations=1")


def test_kto_loss_matches_trl_kto_trainer_on_the_same_model_and_batch(tiny_policy, tmp_path):
    """KTO (pipeline.losses.kto) against trl's KTOTrainer: the same unpaired rows, TRL's own collated batch
    (completions and the mismatched KL completions), our log-prob sums and loss; equal to 1e-5."""
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    from pipeline.losses import kto, response_logps
    from pipeline.models import load_causal_lm, render_ids

    model, tok, folder = tiny_policy
    rows = [{"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": answer}],
             "label": good} for q, c, r in PAIRS for answer, good in ((c, True), (r, False))][:5]  # 3 good, 2 bad
    args = KTOConfig(output_dir=str(tmp_path), per_device_train_batch_size=len(rows), beta=0.3, desirable_weight=1.0,
                     undesirable_weight=1.3, bf16=False, gradient_checkpointing=False, report_to=[], use_cpu=True,
                     disable_dropout=True, max_length=None)
    reference = load_causal_lm(folder).eval()
    trainer = KTOTrainer(model=model, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    model.eval()
    with torch.no_grad():
        theirs = trainer.compute_loss(model, batch)

        def sums(net, ids, mask, completion):
            return response_logps(net(input_ids=ids, attention_mask=mask).logits, ids, completion)[0]

        main = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        mismatched = (batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"])
        desirable = torch.as_tensor(batch["label"], dtype=torch.bool)
        losses, rewards, z0 = kto(sums(model, *main), sums(reference, *main), desirable, sums(model, *mismatched),
                                  sums(reference, *mismatched), beta=0.3, desirable_weight=1.0, undesirable_weight=1.3)
    assert abs(losses.mean().item() - theirs.item()) < 1e-5
    assert desirable.sum() == 3 and rewards.abs().max() > 0        # policy and reference really differ
    assert z0 > 0                                                  # the reference point is not the clamp

    # The stage's own path on the same rows: our tokenization, TRL's mismatch (rotation by one), our two-half
    # batch, the shared-prompt forward and the adapter switched off as the reference.
    from omegaconf import OmegaConf

    from stages.dpo import DPOModule, collate

    items = []
    for row in rows:
        prompt = render_ids(tok, row["prompt"], add_generation_prompt=True)
        items.append({"completion": render_ids(tok, row["prompt"] + row["completion"]), "prompt_len": len(prompt),
                      "label": row["label"]})
    for i, it in enumerate(items):
        other = items[i - 1]
        it["kl"] = it["completion"][:it["prompt_len"]] + other["completion"][other["prompt_len"]:]
    ours_batch = collate(items, tok.pad_token_id)
    cfg = OmegaConf.create({"dpo": {"loss": "kto", "beta": 0.3, "desirable_weight": 1.0, "undesirable_weight": 1.3,
                                    "label_smoothing": 0.0, "simpo_gamma": 0.5, "rpo_alpha": 1.0, "orpo_lambda": 0.1,
                                    "share_prompt": True}})
    module = DPOModule(model, cfg, tok.pad_token_id)
    with torch.no_grad():
        ours, metrics = module.step_metrics(ours_batch)
    assert abs(ours.item() - theirs.item()) < 1e-5
    assert metrics["reference_point"].item() == pytest.approx(z0.item(), abs=1e-5)
    assert metrics["rewards/desirable"].item() == pytest.approx(rewards[desirable].mean().item(), abs=1e-5)


def test_unpaired_rows_are_split_by_prompt_and_each_gets_another_prompts_completion(tiny_policy, tmp_path):
    from omegaconf import OmegaConf

    from pipeline.chat import InputError
    from pipeline.preferences import UnpairedData, split_pairs

    _, tok, _ = tiny_policy
    rows = [{"prompt": q, "completion": answer, "label": good}
            for q, c, r in PAIRS * 3 for answer, good in ((c, True), (r, False))]
    path = tmp_path / "unpaired.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = OmegaConf.create({"seed": 3})
    stage = OmegaConf.create({"val_share": 0.4, "max_tokens": 256, "batch_size": 4, "max_steps": 2})
    data = UnpairedData(path, tok, cfg, stage, lambda items, pad: items)
    data.setup()
    assert len(data.train_items) + len(data.val_items) == len(rows) and data.val_items and not data.dropped
    train, val = split_pairs([{**r, "messages": [{"role": "user", "content": r["prompt"]}]} for r in rows], 0.4, 3)
    assert len(val) == len(data.val_items)                           # the pairs' split, by prompt
    for it in data.train_items + data.val_items:
        n = it["prompt_len"]
        assert it["kl"][:n] == it["completion"][:n]                   # its own prompt,
        assert it["kl"][:n] != it["completion"][:n] or it["kl"][n:] != it["completion"][n:]
        owners = {tuple(o["completion"][:o["prompt_len"]]) for o in data.train_items + data.val_items
                  if o["completion"][o["prompt_len"]:] == it["kl"][n:]}
        assert tuple(it["completion"][:n]) not in owners              # another prompt's completion
    again = UnpairedData(path, tok, cfg, stage, lambda items, pad: items)
    again.setup()
    assert [it["kl"] for it in again.train_items] == [it["kl"] for it in data.train_items]   # fixed by the seed
    path.write_text(json.dumps({"prompt": "q", "completion": "a", "label": "yes"}) + "\n")
    with pytest.raises(InputError, match=f"{path}:1: field 'label' must be true or false"):
        UnpairedData(path, tok, cfg, stage, lambda items, pad: items).setup()
    path.write_text("".join(json.dumps({"prompt": "Only one?", "completion": f"a{i}", "label": i % 2 == 0}) + "\n"
                            for i in range(6)))
    with pytest.raises(InputError, match="at least two prompts"):
        UnpairedData(path, tok, cfg, OmegaConf.merge(stage, {"val_share": 0.01}), lambda items, pad: items).setup()


def test_kto_trains_on_the_chains_own_samples_labelled_by_the_score_threshold(pairs_chain, tmp_path, monkeypatch):
    """collect writes every judged sample as unpaired feedback (desirable from collect.desirable_score up: the smoke
    experiment's -8, i.e. at most 8 characters under the brevity judge); dpo.loss=kto learns it, and its two
    references (precomputed log-probs, the adapter switched off) give the same training."""
    monkeypatch.chdir(copy_chain(pairs_chain, tmp_path / "w"))
    rows = [json.loads(line) for line in Path("data/collect/unpaired.jsonl").read_text().splitlines()]
    samples = [json.loads(line) for line in Path("data/collect/samples.jsonl").read_text().splitlines()]
    finished = {(s["prompt_id"], x["text"]) for s in samples for x in s["samples"] if x["finished"]}
    assert len(rows) == len(finished) and all(r["label"] == (r["score"] >= -8.0) for r in rows)
    assert 0.2 < sum(r["label"] for r in rows) / len(rows) < 0.8
    runs = {ref: run_stage("dpo", "dpo.loss=kto", "dpo.beta=0.1", f"dpo.reference={ref}", "dpo.lr=1e-3")
            for ref in ("precompute", "disable_adapter")}
    metrics = runs["precompute"]
    assert metrics["train/unpaired"] + metrics["val/unpaired"] + metrics["train/dropped_too_long"] == len(rows)
    assert metrics["val/loss"] < metrics["val/loss_before"]
    assert metrics["val/rewards/margin"] > metrics["val/rewards/margin_before"]   # desirable up, undesirable down
    assert metrics["val/rewards/auroc_before"] == 0.5 and metrics["val/rewards/auroc"] > 0.5
    assert runs["disable_adapter"]["val/loss"] == pytest.approx(metrics["val/loss"], rel=1e-4)
    history = json.loads(Path("data/plots/dpo/val.json").read_text())
    assert "val/reference_point" in history[-1] and "val/rewards/margin" in history[-1]


def test_kto_by_hand_reference_point_weights_and_clamp():
    from pipeline.losses import kto

    policy, reference = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])     # log-ratios +0.5, -1.0
    good = torch.tensor([True, False])
    loss, reward, z0 = kto(policy, reference, good, torch.tensor([-3.0, -2.0]), torch.tensor([-3.2, -2.4]), beta=2.0,
                           desirable_weight=1.0, undesirable_weight=0.5)
    assert z0.item() == pytest.approx(0.3)                          # mean of (0.2, 0.4)
    assert loss[0].item() == pytest.approx(1 - torch.sigmoid(torch.tensor(2.0 * (0.5 - 0.3))).item())
    assert loss[1].item() == pytest.approx(0.5 * (1 - torch.sigmoid(torch.tensor(2.0 * (0.3 + 1.0))).item()))
    assert reward.tolist() == pytest.approx([1.0, -2.0])
    _, _, z0 = kto(policy, reference, good, torch.tensor([-3.0]), torch.tensor([-2.0]), beta=2.0)
    assert z0.item() == 0.0                                          # a negative KL estimate is clamped to 0
