"""What distillation builds on: a smaller student made from the teacher, and the vocabulary both must share.

A student of the teacher's family is the teacher's config with fewer layers (and optionally a narrower MLP),
initialised from the teacher: student layer i takes teacher layer ``picks[i]`` (evenly spaced, the first and
the last always kept, as DistilBERT and "shrink and fine-tune" students do), and a narrower matrix takes the
leading rows/columns of the teacher's (the first neurons of the MLP). Everything whose shape has no
counterpart stays randomly initialised. Distillation compares next-token distributions position by position,
so teacher and student must tokenize identically: :func:`check_vocabulary` refuses anything else by name.

The training itself is here too, because two stages teach a model by another one: ``distill`` (a smaller
student learns the aligned teacher) and ``quantize``'s quantization-aware training (the fake-quantized copy
learns the full-precision one). :class:`DistillModule` trains the student by a loss of
:mod:`pipeline.losses` (or plain cross-entropy, ``sft``) on :class:`DistillData`'s packed prepared data.
"""

from __future__ import annotations

import random
import re

import lightning as L
import torch
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.data import DataLoader

from pipeline.generation import generate
from pipeline.losses import generalized_jsd, jsd_per_token, word_distillation
from pipeline.models import ModelError
from pipeline.packing import Example, collate
from pipeline.tokens import final_hidden_states, token_logps
from pipeline.training import StageModule, StepBatches, adamw_warmup_cosine, batches_loader

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


def prompt_ids(example: Example) -> list[int]:
    """The tokens before an example's first labelled token: its prompt, up to the assistant's header."""
    ids, labels = example
    first = next((i for i, label in enumerate(labels) if label != -100), len(ids))
    return ids[:first]


def selected_logits(model, batch: dict, wanted: Tensor) -> Tensor:
    """The model's logits (positions, vocabulary) at the positions ``wanted`` (batch, L-1) marks, the ones that
    predict a trained token: the LM head runs on those positions only."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    with final_hidden_states(model) as head:
        hidden = model(**inputs, use_cache=False).logits
    return head(hidden[:, :-1][wanted])


@torch.no_grad()
def teacher_cache(teacher, items: list[list[Example]], pad_id: int, packed: bool, batch_size: int,
                  limit_mb: float) -> list[Tensor] | None:
    """The teacher's logits at every trained position of every training item, computed once in batches, or None
    when they would exceed ``limit_mb`` (then each batch asks the teacher itself)."""
    positions = sum(sum(label != -100 for _, labels in item for label in labels[1:]) for item in items)
    vocab = teacher.get_output_embeddings().weight.shape[0]
    if positions * vocab * 4 > limit_mb * 2 ** 20:
        return None
    cache: list[Tensor] = []
    for lo in range(0, len(items), batch_size):
        batch = collate(items[lo:lo + batch_size], pad_id, packed)
        wanted = batch["labels"][:, 1:] != -100
        cache += list(selected_logits(teacher, batch, wanted).split(wanted.sum(1).tolist()))
    return cache


class DistillData(L.LightningDataModule):
    """Training items (packs of tokenized examples: the SFT data or the teacher's answers) in resumable step
    order, with the teacher's cached logits when there are some, and the val split's reference answers."""

    def __init__(self, train: list[list[Example]], val: list[list[Example]], cfg: DictConfig, seed: int,
                 pad_id: int, cache: list[Tensor] | None):
        super().__init__()
        self.train_items, self.val_items, self.cfg, self.seed, self.pad_id = train, val, cfg, seed, pad_id
        self.cache = cache

    def batch(self, idx: list[int]) -> dict:
        out = collate([self.train_items[i] for i in idx], self.pad_id, self.cfg.packing)
        out["prompts"] = [prompt_ids(ex) for i in idx for ex in self.train_items[i]]
        if self.cache is not None:
            out["teacher_logits"] = torch.cat([self.cache[i] for i in idx])
        return out

    def train_dataloader(self) -> DataLoader:
        c = self.cfg
        return batches_loader(StepBatches(len(self.train_items), c.batch_size, c.max_steps, self.seed, self.batch))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_items, batch_size=self.cfg.batch_size,
                          collate_fn=lambda items: collate(items, self.pad_id, self.cfg.packing))


class DistillModule(StageModule):
    """Trains ``student`` against ``teacher`` by ``loss`` (word | sequence | on_policy | sft: plain cross-entropy,
    the baseline); validates the cross-entropy on the val references and the teacher's KL to the student there.
    Metric names carry ``prefix`` (the baseline's ``distill_sft/``), so both students log into one run."""

    def __init__(self, student, teacher, tokenizer, cfg: DictConfig, loss: str, seed: int, prefix: str = ""):
        super().__init__()
        self.student, self.teacher, self.tokenizer = student, teacher.eval(), tokenizer
        self.teacher.requires_grad_(False)
        self.cfg, self.loss, self.seed, self.prefix = cfg, loss, seed, prefix
        self._val = torch.zeros(3)  # summed cross-entropy, summed KL, tokens

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher never trains (no dropout noise in its targets)
        return self

    def on_policy_step(self, step: int) -> bool:
        """Whether optimizer step ``step`` trains on the student's own samples: a pure function of the seed and
        the step, so a resumed run makes the same choices."""
        return self.loss == "on_policy" and random.Random(f"{self.seed}-{step}").random() < self.cfg.on_policy_share

    def sampled_batch(self, prompts: list[list[int]], step: int) -> dict:
        """Right-padded prompts plus the student's answers sampled at temperature 1, labelled on the answers."""
        answers, _ = generate(self.student, self.tokenizer, prompts, self.cfg.max_new_tokens,
                              self.cfg.generation_batch_size, do_sample=True, generator_seed=self.seed * 100_003 + step)
        examples = [(p + a.ids, [-100] * len(p) + a.ids) for p, a in zip(prompts, answers, strict=True)]
        batch = collate([[ex] for ex in examples], self.tokenizer.pad_token_id, packed=False)
        return {k: v.to(self.device) for k, v in batch.items()}

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        step = int(self.global_step)
        cached = batch.get("teacher_logits")
        if self.on_policy_step(step):
            batch, cached = self.sampled_batch(batch["prompts"], step), None
        targets = batch["labels"][:, 1:]
        wanted = targets != -100
        student = selected_logits(self.student, batch, wanted)
        if self.loss in ("sequence", "sft"):
            logp, _ = token_logps(student, targets[wanted])
            loss = -logp.mean()
        else:
            with torch.no_grad():
                teacher = cached if cached is not None else selected_logits(self.teacher, batch, wanted)
            ones = torch.ones(len(student), device=student.device)
            c = self.cfg
            if self.loss == "word":
                loss, kl, _ = word_distillation(student, teacher, targets[wanted], ones, c.temperature, c.alpha)
                self.log(f"{self.prefix}train/kl", kl)
            else:
                loss = generalized_jsd(student, teacher, ones, c.beta, c.temperature)
        self.log(f"{self.prefix}train/loss", loss, prog_bar=True)
        if step % 10 == 0:
            self.history.append({"step": step, "train/loss": float(loss.detach())})
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        targets = batch["labels"][:, 1:]
        wanted = targets != -100
        student = selected_logits(self.student, batch, wanted)
        teacher = selected_logits(self.teacher, batch, wanted)
        logp, _ = token_logps(student, targets[wanted])
        kl = jsd_per_token(student, teacher, beta=0.0)
        self._val = self._val + torch.stack([-logp.sum(), kl.sum(), logp.new_tensor(float(len(logp)))]).cpu()

    def on_validation_epoch_end(self) -> None:
        nll, kl = (self._val[:2] / self._val[2].clamp(min=1)).tolist()
        self._val = torch.zeros(3)
        self.log(f"{self.prefix}val/loss", nll)
        self.log(f"{self.prefix}val/teacher_kl", kl, prog_bar=True)
        if self.trainer.state.fn == "fit":
            self.history.append({"step": int(self.global_step), "val/loss": nll, "val/teacher_kl": kl})

    def configure_optimizers(self):
        c = self.cfg
        return adamw_warmup_cosine(self.student, c.lr, c.weight_decay, c.warmup_steps, c.max_steps)
