"""distill: the distillation losses by hand (temperature, T^2, the generalized JSD and its endpoints), against TRL."""

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

    from pipeline.distillation import parameter_count, shrink
    from pipeline.models import build_causal_lm, build_char_tokenizer

    tok = build_char_tokenizer()
    teacher = build_causal_lm(OmegaConf.create(dict(type=arch, hidden_size=32, num_layers=4, num_heads=2,
                                                    intermediate_size=96, max_position=64, dropout=0.0)), tok, seed=0)
    student = shrink(teacher, layers=2, intermediate_size=64)
    assert student.config.num_hidden_layers == 2
    assert parameter_count(student) <= parameter_count(teacher) / 2
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
