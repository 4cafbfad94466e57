"""reward: the Bradley-Terry loss by hand, a separable toy set, last-token pooling, the gate, pair files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import run_stage, save_tiny_model
from pipeline.chat import InputError
from pipeline.models import load_sequence_scorer, load_tokenizer, render_ids
from pipeline.preferences import read_pairs, split_pairs
from pipeline.rewards import GateError, bradley_terry_loss, check_gate, load_reward_model, sequence_rewards
from pipeline.tokens import pad


def test_loss_equals_a_hand_computed_value():
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    plain = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(2.0))) / 2    # -log sigmoid(x) = log(1 + e^-x)
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(plain, abs=1e-6)
    margin = torch.tensor([0.5, 0.0])
    with_margin = (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(2.0))) / 2
    assert bradley_terry_loss(chosen, rejected, margin).item() == pytest.approx(with_margin, abs=1e-6)
    centred = with_margin + 0.1 * ((1.0 + 0.0) ** 2 + (0.0 + 2.0) ** 2) / 2
    assert bradley_terry_loss(chosen, rejected, margin, center_coef=0.1).item() == pytest.approx(centred, abs=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_head_reads_the_last_real_token_under_both_paddings(tmp_path, arch):
    folder = save_tiny_model(tmp_path / "m", arch)
    tok = load_tokenizer(folder)
    model = load_sequence_scorer(folder).eval()
    model.config.pad_token_id = tok.pad_token_id
    rows = [render_ids(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
            for q, a in [("Add one to 4.", "5"), ("Sort the digits 3 1 2 please.", "1 2 3"), ("Hi", "Hello there")]]
    alone = torch.cat([sequence_rewards(model, torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long)) for r in rows])
    for side in ("right", "left"):
        ids, mask = pad(rows, tok.pad_token_id, side)
        assert torch.allclose(sequence_rewards(model, ids, mask), alone, atol=1e-5), side
    assert len(set(alone.tolist())) == 3   # the three rows really score differently


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_shared_prompt_rewards_equal_the_plain_forward_in_values_and_gradients(tmp_path, arch):
    """reward.share_prompt: each pair's prompt once, its KV cache repeated for both responses, through a LoRA
    adapter and the trained head = the plain forward of every row."""
    from omegaconf import OmegaConf

    from pipeline import adapters
    from pipeline.preferences import tokenize_pair
    from pipeline.rewards import can_share_prompt, shared_prompt_rewards
    from stages.reward import collate

    folder = save_tiny_model(tmp_path / "m", arch)
    tok = load_tokenizer(folder)
    model = load_sequence_scorer(folder)
    model.config.pad_token_id = tok.pad_token_id
    model = adapters.apply(model, OmegaConf.create({"method": "lora", "target_modules": "auto", "quantize_base": None,
                                                    "options": {"r": 4, "lora_alpha": 8}}), task_type="SEQ_CLS")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "score" in name:
                p.normal_(0, 0.5)
    model.train()
    assert can_share_prompt(model)
    pairs = [("What number comes after 41?", "42", "Let me think. The answer is 42."),
             ("Sort the digits 3 1 2.", "1 2 3", "3 2 1"), ("Hi", "Hello there", "Go away, I am busy right now.")]
    items = []
    for q, c, r in pairs:
        chosen, rejected, n = tokenize_pair(tok, {"messages": [{"role": "user", "content": q}], "chosen": c, "rejected": r})
        items.append({"chosen": chosen, "rejected": rejected, "prompt_len": n, "gap": 1.0})
    b = collate(items, tok.pad_token_id)
    plain = sequence_rewards(model, b["input_ids"], b["attention_mask"])
    (plain * torch.arange(1.0, 7.0)).sum().backward()     # distinct weights: a row mix-up changes the gradients
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    shared = shared_prompt_rewards(model, b["input_ids"], b["attention_mask"], b["prompt_len"], tok.pad_token_id)
    (shared * torch.arange(1.0, 7.0)).sum().backward()
    assert len(set(plain.tolist())) == 6                   # every row scores differently
    assert torch.allclose(plain, shared, rtol=1e-5, atol=1e-5)
    assert any("score" in k for k in grads) and any("lora_A" in k for k in grads)
    now = dict(model.named_parameters())
    for k, g in grads.items():   # float rounding relative to each tensor's scale (gradients reach ~300 here)
        assert torch.allclose(g, now[k].grad, rtol=1e-4, atol=1e-5 * float(g.abs().max())), k


def write_pairs(path: Path, n: int, separable: bool = True) -> None:
    """A separable toy set: the chosen response always praises, the rejected one always complains
    (not separable: every other pair the other way round)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt_id": f"p{i}", "prompt": f"Say something about item {i}.",
             "chosen": f"good {i}" if separable or i % 2 else f"bad {i}",
             "rejected": f"bad {i}" if separable or i % 2 else f"good {i}",
             "score_chosen": 1.0, "score_rejected": 0.0} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_separable_toy_set_reaches_full_accuracy_and_saves_an_hf_scorer(in_tmp):
    backbone = save_tiny_model(in_tmp / "backbone", "llama")
    write_pairs(in_tmp / "data/collect/pairs.jsonl", 80)
    metrics = run_stage("reward", values={"reward.backbone": str(backbone), "reward.max_steps": 60, "reward.lr": 3e-3,
                                          "reward.min_accuracy": 0.99, "reward.val_every_n_steps": 30})
    assert metrics["val/accuracy"] == 1.0 and metrics["val/loss"] < 0.1 and metrics["val/loss_before"] > 0.5
    assert metrics["gate/passed"] == 1 and metrics["val/margin"] > 0
    from transformers import AutoModelForSequenceClassification

    out = in_tmp / "data/reward"
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()  # plain transformers, no posttrain code
    tok = load_tokenizer(out)
    ids = render_ids(tok, [{"role": "user", "content": "Say something about item 3."},
                           {"role": "assistant", "content": "good 3"}])
    bad = render_ids(tok, [{"role": "user", "content": "Say something about item 3."},
                           {"role": "assistant", "content": "bad 3"}])
    batch, mask = pad([ids, bad], tok.pad_token_id)
    with torch.no_grad():
        scores = hf(input_ids=batch, attention_mask=mask).logits[:, 0]
    assert scores[0] > scores[1]
    stats = json.loads((out / "reward_stats.json").read_text())
    assert stats["std"] > 0 and stats["responses"] == 2 * metrics["train/pairs"]
    loaded = load_reward_model(out)
    assert loaded.accuracy == 1.0 and loaded.normalize(torch.tensor([stats["mean"]])).item() == pytest.approx(0.0)
    assert (in_tmp / "data/plots/reward/rewards.png").stat().st_size > 1000


def test_gate_refuses_a_reward_model_below_it(in_tmp):
    backbone = save_tiny_model(in_tmp / "backbone", "llama")
    write_pairs(in_tmp / "data/collect/pairs.jsonl", 40, separable=False)
    metrics = run_stage("reward", values={"reward.backbone": str(backbone), "reward.max_steps": 2,
                                          "reward.min_accuracy": 1.0, "reward.lr": 1e-6})
    assert metrics["gate/passed"] == 0
    with pytest.raises(GateError, match=r"failed its quality gate: held-out pairwise accuracy .* < reward.min_accuracy 1.0"):
        load_reward_model(in_tmp / "data/reward")
    with pytest.raises(GateError, match="no gate.json"):
        check_gate(backbone)


@pytest.mark.parametrize("line,message", [
    ("{oops", ":2: not valid JSON"),
    (json.dumps({"prompt": "q", "chosen": "a"}), ":2: field 'rejected' is missing or not a string"),
    (json.dumps({"chosen": "a", "rejected": "b"}), ":2: field 'messages' or 'prompt' is missing"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"}),
     ":2: field 'messages' must be"),
    (json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": "high"}),
     ":2: field 'score_chosen' must be a number"),
    (json.dumps({"prompt": "q", "chosen": "same", "rejected": " same"}),
     ":2: fields 'chosen' and 'rejected' are the same response"),
])
def test_bad_pair_lines_name_the_line_and_field(tmp_path, line, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n" + line + "\n")
    with pytest.raises(InputError, match=message):
        read_pairs(path)


def test_split_keeps_every_prompt_on_one_side():
    pairs = [{"prompt_id": f"p{i % 30}", "chosen": "a", "rejected": str(i)} for i in range(300)]
    train, val = split_pairs(pairs, 0.2, 7)
    assert train and val and not {p["prompt_id"] for p in train} & {p["prompt_id"] for p in val}
