"""What distillation builds on: a smaller student made from the teacher, and the vocabulary both must share.

A student of the teacher's family is the teacher's config with fewer layers (and optionally a narrower MLP),
initialised from the teacher: student layer i takes teacher layer ``picks[i]`` (evenly spaced, the first and
the last always kept, as DistilBERT and "shrink and fine-tune" students do), and a narrower matrix takes the
leading rows/columns of the teacher's (the first neurons of the MLP). Everything whose shape has no
counterpart stays randomly initialised. Distillation compares next-token distributions position by position,
so teacher and student must tokenize identically: :func:`check_vocabulary` refuses anything else by name.
"""

from __future__ import annotations

import re

import torch

from pipeline.models import ModelError

LAYER = re.compile(r"\.(layers|h|layer|blocks)\.(\d+)\.")   # the per-layer prefix of Llama-like, GPT-2-like models


def layer_picks(teacher_layers: int, student_layers: int) -> list[int]:
    """The teacher layers the student's layers start from: evenly spaced, first and last included."""
    if not 1 <= student_layers <= teacher_layers:
        raise ModelError(f"a student of {student_layers} layers cannot come from a teacher of {teacher_layers}: "
                         f"choose 1 to {teacher_layers}")
    if student_layers == 1:
        return [teacher_layers - 1]
    return [round(i * (teacher_layers - 1) / (student_layers - 1)) for i in range(student_layers)]


def shrink(teacher, layers: int, intermediate_size: int | None = None, init: str = "teacher", seed: int = 0):
    """A student of the teacher's architecture with ``layers`` layers and MLP width ``intermediate_size`` (None:
    the teacher's), initialised from the teacher (``init="teacher"``) or randomly (``"random"``, with ``seed``)."""
    from transformers import AutoModelForCausalLM

    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    picks = layer_picks(config.num_hidden_layers, layers)
    config.num_hidden_layers = layers
    if intermediate_size is not None:
        key = "intermediate_size" if hasattr(config, "intermediate_size") else "n_inner"
        config.__setattr__(key, intermediate_size)
    torch.manual_seed(seed)
    student = AutoModelForCausalLM.from_config(config)
    if init == "teacher":
        copy_from_teacher(student, teacher, picks)
    elif init != "random":
        raise ModelError(f"student init {init!r}: valid values are ['teacher', 'random']")
    return student


@torch.no_grad()
def copy_from_teacher(student, teacher, picks: list[int]) -> int:
    """Copy into the student every teacher tensor it has a counterpart of (student layer i <- teacher layer
    ``picks[i]``), the leading slice where the student's is smaller; return how many tensors were copied."""
    source = teacher.state_dict()
    copied = 0
    for name, param in student.state_dict().items():
        found = LAYER.search(name)
        teacher_name = (name[:found.start()] + f".{found.group(1)}.{picks[int(found.group(2))]}." + name[found.end():]
                        if found else name)
        value = source.get(teacher_name)
        if value is None or value.dim() != param.dim() or any(s > t for s, t in zip(param.shape, value.shape, strict=True)):
            continue
        param.copy_(value[tuple(slice(0, s) for s in param.shape)])
        copied += 1
    return copied


def check_vocabulary(teacher_tokenizer, student_tokenizer, teacher_name: str, student_name: str) -> None:
    """Raise :class:`ModelError` naming both tokenizers unless they map every token to the same id (the same
    vocabulary and special tokens): per-position distributions of different vocabularies cannot be compared."""
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    differs = sorted(set(teacher_vocab.items()) ^ set(student_vocab.items()), key=lambda kv: kv[1])
    specials = [(k, getattr(teacher_tokenizer, k), getattr(student_tokenizer, k))
                for k in ("bos_token", "eos_token", "pad_token")
                if getattr(teacher_tokenizer, k) != getattr(student_tokenizer, k)]
    if differs or specials:
        what = (f"first differing entry {differs[0][0]!r} (id {differs[0][1]})" if differs
                else f"{specials[0][0]} {specials[0][1]!r} vs {specials[0][2]!r}")
        raise ModelError(f"distill: the student's tokenizer ({student_name}, {len(student_vocab)} tokens) differs from "
                         f"the teacher's ({teacher_name}, {len(teacher_vocab)} tokens): {what}; distillation compares "
                         f"next-token distributions token by token, so both need one vocabulary")
