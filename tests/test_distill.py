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
