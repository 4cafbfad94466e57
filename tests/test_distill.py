"""distill: the distillation losses by hand (temperature, T^2, the generalized JSD and its endpoints), against TRL;
the student built from the teacher; the stage with each loss on the smoke chain's SFT model as the teacher."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.losses import generalized_jsd, word_distillation

STUDENT = [[0.0, 1.0, -1.0], [2.0, 0.0, 0.0]]   # logits of two positions over a 3-token vocabulary
TEACHER = [[1.0, 0.0, 0.5], [0.0, 0.0, 3.0]]


def softmax(row: list[float], temperature: float = 1.0) -> list[float]:
    e = [math.exp(x / temperature) for x in row]
    return [x / sum(e) for x in e]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def jsd(s: list[float], t: list[float], beta: float) -> float:
    m = [beta * a + (1 - beta) * b for a, b in zip(t, s, strict=True)]
    return beta * kl(t, m) + (1 - beta) * kl(s, m)


def tensors(mask=(1, 1)):
    return torch.tensor([STUDENT]), torch.tensor([TEACHER]), torch.tensor([list(mask)])


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_generalized_jsd_equals_the_definition_and_its_endpoints_are_the_two_kls(temperature):
    student, teacher, mask = tensors()
    s = [softmax(r, temperature) for r in STUDENT]
    t = [softmax(r, temperature) for r in TEACHER]
    for beta in (0.1, 0.5, 0.9):
        by_hand = sum(jsd(a, b, beta) for a, b in zip(s, t, strict=True)) / 2
        assert generalized_jsd(student, teacher, mask, beta, temperature).item() == pytest.approx(by_hand, rel=1e-5)
    forward = sum(kl(b, a) for a, b in zip(s, t, strict=True)) / 2     # KL(teacher || student)
    reverse = sum(kl(a, b) for a, b in zip(s, t, strict=True)) / 2     # KL(student || teacher)
    assert forward != pytest.approx(reverse, rel=1e-2)                   # the endpoints really differ
    assert generalized_jsd(student, teacher, mask, 0.0, temperature).item() == pytest.approx(forward, rel=1e-5)
    assert generalized_jsd(student, teacher, mask, 1.0, temperature).item() == pytest.approx(reverse, rel=1e-5)


def test_masked_positions_do_not_count_and_the_teacher_gets_no_gradient():
    student, teacher, _ = tensors()
    only_first = generalized_jsd(student, teacher, torch.tensor([[1, 0]]), 0.5).item()
    by_hand = jsd(softmax(STUDENT[0]), softmax(TEACHER[0]), 0.5)
    assert only_first == pytest.approx(by_hand, rel=1e-5)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    generalized_jsd(student, teacher, torch.tensor([[1, 0]]), 0.5).backward()
    assert student.grad[0, 0].abs().sum() > 0 and student.grad[0, 1].abs().sum() == 0
    assert teacher.grad is None


def test_word_distillation_mixes_t_squared_times_the_forward_kl_with_the_cross_entropy():
    student, teacher, mask = tensors()
    targets = torch.tensor([[1, 0]])
    temperature, alpha = 2.0, 0.7
    loss, kl_t, ce = word_distillation(student, teacher, targets, mask, temperature, alpha)
    forward = sum(kl(softmax(b, temperature), softmax(a, temperature)) for a, b in zip(STUDENT, TEACHER, strict=True)) / 2
    cross_entropy = -(math.log(softmax(STUDENT[0])[1]) + math.log(softmax(STUDENT[1])[0])) / 2   # at T = 1
    assert kl_t.item() == pytest.approx(forward, rel=1e-5)
    assert ce.item() == pytest.approx(cross_entropy, rel=1e-5)
    assert loss.item() == pytest.approx(alpha * temperature ** 2 * forward + (1 - alpha) * cross_entropy, rel=1e-5)
    only_ce, _, _ = word_distillation(student, teacher, targets, mask, temperature, alpha=0.0)
    assert only_ce.item() == pytest.approx(cross_entropy, rel=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_generalized_jsd_matches_trls_gkd_trainer(beta):
    from trl.experimental.gkd import GKDTrainer

    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, :2] = -100                                   # TRL's ignored positions = our mask's zeros
    theirs = GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta, temperature=1.5,
                                             reduction="batchmean")
    ours = generalized_jsd(student, teacher, labels != -100, beta, temperature=1.5)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


def test_layer_picks_keep_the_first_and_last_teacher_layers_evenly_spaced():
    from pipeline.distillation import layer_picks
    from pipeline.models import ModelError

    assert layer_picks(4, 2) == [0, 3] and layer_picks(30, 4) == [0, 10, 19, 29] and layer_picks(4, 4) == [0, 1, 2, 3]
    with pytest.raises(ModelError, match="a student of 5 layers cannot come from a teacher of 4"):
        layer_picks(4, 5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_shrunk_student_starts_from_the_teachers_picked_layers_and_is_at_most_half_its_size(tmp_path, arch):
    from omegaconf import OmegaConf

    from pipeline.distillation import shrink
    from pipeline.models import build_causal_lm, build_char_tokenizer, count_parameters

    tok = build_char_tokenizer()
    teacher = build_causal_lm(OmegaConf.create(dict(type=arch, hidden_size=32, num_layers=4, num_heads=2,
                                                    intermediate_size=96, max_position=64, dropout=0.0)), tok, seed=0)
    student = shrink(teacher, layers=2, intermediate_size=64)
    assert student.config.num_hidden_layers == 2
    assert count_parameters(student) <= count_parameters(teacher) / 2  # tied embeddings counted once
    t, s = teacher.state_dict(), student.state_dict()
    if arch == "llama":
        assert torch.equal(s["model.layers.1.self_attn.q_proj.weight"], t["model.layers.3.self_attn.q_proj.weight"])
        assert torch.equal(s["model.layers.0.mlp.gate_proj.weight"], t["model.layers.0.mlp.gate_proj.weight"][:64])
        assert torch.equal(s["model.layers.0.mlp.down_proj.weight"], t["model.layers.0.mlp.down_proj.weight"][:, :64])
        assert torch.equal(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"])
    else:
        assert torch.equal(s["transformer.h.1.attn.c_attn.weight"], t["transformer.h.3.attn.c_attn.weight"])
        assert torch.equal(s["transformer.h.0.mlp.c_fc.weight"], t["transformer.h.0.mlp.c_fc.weight"][:, :64])
        assert torch.equal(s["transformer.wte.weight"], t["transformer.wte.weight"])
    ids = torch.tensor([tok.encode("1+2=")])
    assert torch.isfinite(student(input_ids=ids).logits).all()
    key = "model.layers.1.self_attn.q_proj.weight" if arch == "llama" else "transformer.h.1.attn.c_attn.weight"
    assert not torch.equal(shrink(teacher, layers=2, init="random").state_dict()[key], s[key])


def test_a_student_with_another_vocabulary_is_refused_naming_both_tokenizers():
    from pipeline.distillation import check_vocabulary
    from pipeline.models import ModelError, build_char_tokenizer

    teacher, same, other = build_char_tokenizer(), build_char_tokenizer(), build_char_tokenizer(["ĳ"])
    check_vocabulary(teacher, same, "data/dpo", "student/")
    with pytest.raises(ModelError, match=r"the student's tokenizer \(student/, \d+ tokens\) differs from the teacher's "
                                         r"\(data/dpo, \d+ tokens\): first differing entry 'ĳ'"):
        check_vocabulary(teacher, other, "data/dpo", "student/")


def tiny_pair():
    """A tiny teacher (2 layers), its tokenizer, a 1-layer student made from it, and packed SFT-like items."""
    from omegaconf import OmegaConf

    from pipeline.chat import encode
    from pipeline.distillation import shrink
    from pipeline.models import build_causal_lm, build_char_tokenizer
    from pipeline.packing import pack

    tok = build_char_tokenizer()
    teacher = build_causal_lm(OmegaConf.create(dict(type="llama", hidden_size=32, num_layers=2, num_heads=2,
                                                    intermediate_size=64, max_position=128, dropout=0.0)), tok, seed=0)
    examples = [encode(tok, [{"role": "user", "content": f"{a}+{b}="}, {"role": "assistant", "content": str(a + b)}])
                for a in range(4) for b in range(3)]
    return teacher, tok, shrink(teacher, 1), pack(examples, 40)


def test_the_teachers_cached_logits_are_what_it_gives_on_each_training_batch():
    """The cache is computed once over consecutive items; a step's batch draws items in any order and packs them
    with padding: the cached logits must be the teacher's at exactly that batch's trained positions."""
    from omegaconf import OmegaConf

    from pipeline.distillation import DistillData, selected_logits, teacher_cache

    teacher, tok, _, items = tiny_pair()
    assert teacher_cache(teacher, items, tok.pad_token_id, True, 3, limit_mb=1e-4) is None  # over the limit
    cache = teacher_cache(teacher, items, tok.pad_token_id, True, 3, limit_mb=64)
    cfg = OmegaConf.create(dict(packing=True, batch_size=3, max_steps=4))
    data = DistillData(items, items, cfg, seed=0, pad_id=tok.pad_token_id, cache=cache)
    batch = data.batch([len(items) - 1, 0, 2])
    wanted = batch["labels"][:, 1:] != -100
    with torch.no_grad():
        direct = selected_logits(teacher, batch, wanted)
    assert batch["teacher_logits"].shape == direct.shape and int(wanted.sum()) > 10
    assert torch.allclose(batch["teacher_logits"], direct, atol=1e-5)
    assert len(batch["prompts"]) == sum(len(items[i]) for i in (len(items) - 1, 0, 2))
    assert all(tok.decode(p).endswith("<|assistant|>") for p in batch["prompts"])


@pytest.mark.parametrize("share, expected", [(0.0, 0), (1.0, 4)])
def test_on_policy_steps_train_on_the_students_own_samples_at_the_configured_share(monkeypatch, share, expected):
    """GKD's mix: ``on_policy_share`` of the steps replace the batch by the student's samples, scored by the teacher
    on those tokens; the choice is a function of the seed and step (a resumed run makes the same ones)."""
    from omegaconf import OmegaConf

    from pipeline.distillation import DistillData, DistillModule

    teacher, tok, student, items = tiny_pair()
    cfg = OmegaConf.create(dict(packing=True, batch_size=2, max_steps=4, on_policy_share=share, beta=0.5,
                                temperature=1.0, max_new_tokens=4, generation_batch_size=8))
    module = DistillModule(student, teacher, tok, cfg, "on_policy", seed=0)
    data = DistillData(items, items, cfg, seed=0, pad_id=tok.pad_token_id, cache=None)
    sampled = []
    real = module.sampled_batch
    monkeypatch.setattr(module, "sampled_batch", lambda prompts, step: sampled.append(step) or real(prompts, step))
    monkeypatch.setattr(DistillModule, "global_step", property(lambda self: self._step))
    for step in range(4):
        module._step = step
        loss = module.training_step(data.batch(list(range(2))), 0)
        assert torch.isfinite(loss) and loss.requires_grad
    assert len(sampled) == expected
    assert [module.on_policy_step(s) for s in range(50)] == [module.on_policy_step(s) for s in range(50)]
    if share == 1.0:
        batch = real(data.batch([0])["prompts"], 0)
        assert (batch["labels"] != -100).any()  # the sampled answers are what is trained


@pytest.fixture(scope="module")
def sft_teacher(sft_chain, tmp_path_factory):
    from conftest import copy_chain

    return copy_chain(sft_chain, tmp_path_factory.mktemp("distill"))


@pytest.mark.parametrize("loss", ["word", pytest.param("sequence", marks=pytest.mark.slow),
                                  pytest.param("on_policy", marks=pytest.mark.slow)])
def test_each_loss_brings_the_student_toward_the_teacher_beside_its_sft_only_baseline(sft_teacher, monkeypatch, loss):
    """The stage on the smoke chain with sft as the teacher: the student has at most half its parameters, its
    training loss falls, it ends closer to the teacher's distributions on the val references than it started
    (word and on-policy losses, which train on those distributions: sequence-level KD fits the smoke teacher's
    greedy answers, which need not bring it closer on references), it is saved with the SFT-only baseline, and
    both are measured on the test prompts with the paired differences."""
    import json

    from conftest import run_stage
    from pipeline.adapters import load_trained

    monkeypatch.chdir(sft_teacher)
    metrics = run_stage("distill", "distill.teacher=sft", f"distill.loss={loss}", "distill.max_steps=12")
    out = sft_teacher / "data" / "distill"
    curve = json.loads((sft_teacher / "data" / "plots" / "distill" / "loss.json").read_text())
    assert [row["step"] for row in curve] == [0, 10] and curve[-1]["train/loss"] < curve[0]["train/loss"]
    if loss != "sequence":
        assert metrics["val/teacher_kl"] < metrics["val/teacher_kl_before"]
    assert metrics["size/parameters"] <= metrics["teacher/size/parameters"] / 2
    assert metrics["size/parameters"] == metrics["distill_sft/size/parameters"]
    for key in ("test/teacher_kl_vs_distill_sft", "test/accuracy_vs_distill_sft"):
        assert metrics[f"{key}_ci_low"] <= metrics[key] <= metrics[f"{key}_ci_high"]
    assert load_trained(out / "distill_sft").config.num_hidden_layers == 1
    report = json.loads((out / "report.json").read_text())
    assert report["teacher"] == "sft" and report["metrics"]["test/accuracy"] == metrics["test/accuracy"]
    assert json.loads((out / "run.json").read_text())["teacher"] == "sft"
    answers = out / "teacher_answers.jsonl"
    assert answers.exists() == (loss == "sequence")
    if loss == "sequence":  # the teacher's greedy answers, one per SFT prompt
        rows = [json.loads(line) for line in answers.read_text().splitlines()]
        train = (sft_teacher / "data" / "prepare" / "train.jsonl").read_text().splitlines()
        assert len(rows) == len(train) and rows[0]["messages"][-1]["role"] == "assistant"
    if loss == "on_policy":
        assert 0 < metrics["train/on_policy_steps"] < 12


def test_a_student_folder_with_another_vocabulary_stops_the_stage_naming_both(sft_teacher, monkeypatch, tmp_path):
    from conftest import run_stage
    from pipeline.models import ModelError, build_char_tokenizer

    monkeypatch.chdir(sft_teacher)
    folder = tmp_path / "student"
    from conftest import save_tiny_model

    save_tiny_model(folder, "llama")
    build_char_tokenizer(["ĳ"]).save_pretrained(folder)
    with pytest.raises(ModelError, match=r"student's tokenizer \(.*student.*\) differs from the teacher's \(.*sft"):
        run_stage("distill", "distill.teacher=sft", f"distill.student.path={folder}")
