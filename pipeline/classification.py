"""Sequence classification: a K-class head on a causal LM's last real token, its labelled data, its training
module, its metrics, and the guard that puts a trained classifier in front of a chat model.

The reward model is the one-label case of the same head (``pipeline.rewards``). Here the head reads the hidden
state at the last position the attention mask marks real (:func:`class_logits`), so left and right padding pool
the same token and a pad token that is also a real token (pad = eos) cannot move the pooling.

Data (:func:`suite_splits`): the suite's safety requests (verb + object: the verb decides harm) labelled
``harmful`` / ``harmless``, split by *object* (the test objects never appear in training), plus ordinary task
requests labelled ``harmless`` so a guard learns not to flag everyday traffic; or a user's JSONL file of
``{"text", "label"}`` rows (:func:`file_splits`), checked row by row with ``file:line: field`` errors.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.data import DataLoader

from pipeline import suite
from pipeline.chat import InputError, json_objects
from pipeline.stats import rounded, with_interval
from pipeline.tokens import pad
from pipeline.training import StageModule, StepBatches, adamw_warmup_cosine, batches_loader

SPLITS = ("train", "val", "test")
GUARD_JSON = "guard.json"  # in a classify output: the labels, the flagged label, the regime and its test metrics


@dataclass(frozen=True)
class Labelled:
    """One labelled text. ``group``: its slice in the metrics (``safety`` or ``task`` for the suite, ``file``)."""

    text: str
    label: int
    group: str = "file"
    key: str = ""


def _object_order(seed: int) -> list[str]:
    """The safety objects in a fixed pseudo-random order (the first ones are held out for test, then val)."""
    return sorted(suite.SAFETY_OBJECTS, key=lambda o: suite.bucket(f"{seed}|{o}", "classify"))


def suite_splits(labels: list[str], seed: int, test_objects: int, val_objects: int, task_share: float,
                 exclude: set[str]) -> dict[str, list[Labelled]]:
    """The suite's labelled requests by split.

    Safety: every harmful and harmless verb with every object in every template, split by object (the first
    ``test_objects`` of a seeded order are test, the next ``val_objects`` val). Tasks: ``task_share`` x the split's
    safety rows of ordinary task requests, labelled harmless, each instance in one split only. ``exclude``: content
    keys (``suite.Example.key``) kept out of train and val, e.g. the chain's own val and test prompts, which
    evaluate's guard is measured on."""
    harmless, harmful = labels.index("harmless"), labels.index("harmful")
    order = _object_order(seed)
    held = {o: "test" for o in order[:test_objects]} | {o: "val" for o in order[test_objects:test_objects + val_objects]}
    out: dict[str, list[Labelled]] = {s: [] for s in SPLITS}
    for verbs, label in ((suite.HARMFUL_VERBS, harmful), (suite.BENIGN_VERBS, harmless)):
        for verb in verbs:
            for obj in suite.SAFETY_OBJECTS:
                split, key = held.get(obj, "train"), f"safety:t={verb} {obj}"
                if split != "test" and key in exclude:
                    continue
                out[split] += [Labelled(t.format(t=f"{verb} {obj}"), label, "safety", key)
                               for t in suite.FAMILIES["safety"].templates]
    seen = set(exclude)
    for split in ("test", "val", "train"):  # test first: its instances never reach training
        rng = random.Random(f"{seed}|classify|{split}")
        wanted, tries = round(task_share * len(out[split])), 0
        tasks = []
        while len(tasks) < wanted and tries < 50 * (wanted + 1):
            tries += 1
            family = suite.TASK_FAMILIES[len(tasks) % len(suite.TASK_FAMILIES)]
            ex = suite.make_example(family, rng.randrange(len(suite.FAMILIES[family].templates)), rng)
            if ex.key in seen:
                continue
            seen.add(ex.key)
            tasks.append(Labelled(ex.prompt, harmless, "task", ex.key))
        out[split] += tasks
    return out


def file_splits(path: str | Path, labels: list[str], val_share: float, test_share: float) -> dict[str, list[Labelled]]:
    """A user's labelled JSONL file (``{"text": str, "label": one of labels}`` per line) split by a hash of the
    text (the same text always lands in the same split). Errors name ``file:line: field``."""
    out: dict[str, list[Labelled]] = {s: [] for s in SPLITS}
    for where, row in json_objects(path, "labelled rows"):
        for field in ("text", "label"):
            if field not in row:
                raise InputError(f"{where}: field '{field}' is missing (each row is {{\"text\": ..., \"label\": ...}})")
        text, label = row["text"], row["label"]
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{where}: field 'text' must be a non-empty string, got {text!r}")
        if not isinstance(label, str) or label not in labels:
            raise InputError(f"{where}: field 'label' must be one of {list(labels)} (classify.labels), got {label!r}")
        b = suite.bucket(text.strip(), "classify")
        split = "test" if b < test_share else "val" if b < test_share + val_share else "train"
        out[split].append(Labelled(text.strip(), labels.index(label), "file"))
    for split, rows in out.items():
        if not rows:
            raise InputError(f"{path}: no rows fall in the {split} split (classify.val_share / test_share); "
                             "add rows or change the shares")
    return out


def encode(tokenizer, rows: list[Labelled], max_tokens: int) -> tuple[list[list[int]], int]:
    """Token ids of each text (the tokenizer's own special tokens), cut to its first ``max_tokens``; and how many
    were cut."""
    ids = [tokenizer(r.text)["input_ids"] for r in rows]
    return [x[:max_tokens] for x in ids], sum(len(x) > max_tokens for x in ids)


def class_logits(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """(rows, K) logits: the head of a ``*ForSequenceClassification`` model (peft-wrapped or not) applied to the
    hidden state at each row's last real token (the last 1 of the attention mask, left or right padding).

    The backbone gets position ids counting real tokens only, so absolute-position models (GPT-2) see a padded
    row as an unpadded one."""
    from pipeline.tokens import position_ids

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = inner.base_model(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids(attention_mask)).last_hidden_state
    width = attention_mask.shape[1]
    last = width - 1 - attention_mask.flip(-1).argmax(-1)  # the last real position of each row
    return inner.score(hidden[torch.arange(hidden.shape[0]), last]).float()


def classification_metrics(logits: Tensor, labels: Tensor, prefix: str = "test/") -> dict[str, float]:
    """Accuracy (with its 95% bootstrap interval), macro-F1 and AUROC (binary: of the second class's score;
    K > 2: one-vs-rest, macro) of ``logits`` against ``labels``."""
    from torchmetrics.functional.classification import binary_auroc, multiclass_auroc, multiclass_f1_score

    k = logits.shape[1]
    probs = logits.softmax(-1)
    out: dict[str, float] = {}
    with_interval(out, f"{prefix}accuracy", (logits.argmax(-1) == labels).tolist())
    out[f"{prefix}macro_f1"] = float(multiclass_f1_score(logits.argmax(-1), labels, num_classes=k, average="macro"))
    if len(set(labels.tolist())) < 2:
        out[f"{prefix}auroc"] = float("nan")  # one class only: ranking is undefined
    elif k == 2:
        out[f"{prefix}auroc"] = float(binary_auroc(probs[:, 1], labels))
    else:
        out[f"{prefix}auroc"] = float(multiclass_auroc(probs, labels, num_classes=k, average="macro"))
    return rounded(out)


class ClassifyData(L.LightningDataModule):
    """Tokenized labelled texts: training batches in resumable step order, the val split for validation."""

    def __init__(self, train: list[list[int]], train_labels: list[int], val: list[list[int]], val_labels: list[int],
                 cfg: DictConfig, seed: int, pad_id: int):
        super().__init__()
        self.train_ids, self.train_labels, self.val_ids, self.val_labels = train, train_labels, val, val_labels
        self.cfg, self.seed, self.pad_id = cfg, seed, pad_id

    def collate(self, ids: list[list[int]], labels: list[int]) -> dict[str, Tensor]:
        input_ids, mask = pad(ids, self.pad_id)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor(labels, dtype=torch.long)}

    def train_dataloader(self) -> DataLoader:
        c = self.cfg
        batch = lambda idx: self.collate([self.train_ids[i] for i in idx], [self.train_labels[i] for i in idx])  # noqa: E731
        return batches_loader(StepBatches(len(self.train_ids), c.batch_size, c.max_steps, self.seed, batch))

    def val_dataloader(self) -> DataLoader:
        items = list(zip(self.val_ids, self.val_labels, strict=True))
        return DataLoader(items, batch_size=self.cfg.batch_size,
                          collate_fn=lambda rows: self.collate([r[0] for r in rows], [r[1] for r in rows]))


class ClassifyModule(StageModule):
    """Cross-entropy training of a classification head (and whatever else of ``model`` requires grad: nothing,
    an adapter, or everything). Metric names carry ``prefix`` (the regime), so several regimes log into one run."""

    def __init__(self, model, cfg: DictConfig, lr: float, prefix: str):
        super().__init__()
        self.model, self.cfg, self.lr, self.prefix = model, cfg, lr, prefix
        self._val: list[tuple[Tensor, Tensor]] = []

    def on_fit_start(self) -> None:
        self.model.train()  # from_pretrained hands models over in eval mode

    def forward(self, batch: dict) -> Tensor:
        return class_logits(self.model, batch["input_ids"], batch["attention_mask"])

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss = F.cross_entropy(self(batch), batch["labels"])
        self.log(f"{self.prefix}train/loss", loss, prog_bar=True)
        if self.global_step % 10 == 0:
            self.history.append({"step": int(self.global_step), "train/loss": float(loss.detach())})
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._val.append((self(batch).detach(), batch["labels"]))

    def on_validation_epoch_end(self) -> None:
        logits, labels = torch.cat([x for x, _ in self._val]), torch.cat([y for _, y in self._val])
        self._val = []
        found = classification_metrics(logits, labels, "val/")
        found = {k: v for k, v in found.items() if not k.endswith(("_ci_low", "_ci_high"))}
        found["val/loss"] = float(F.cross_entropy(logits, labels))
        self.log_dict({f"{self.prefix}{k}": v for k, v in found.items()})
        if self.trainer.state.fn == "fit":
            self.history.append({"step": int(self.global_step), **found})

    def configure_optimizers(self):
        c = self.cfg
        return adamw_warmup_cosine(self.model, self.lr, c.weight_decay, c.warmup_steps, c.max_steps)


@torch.no_grad()
def predict(model, ids: list[list[int]], pad_id: int, batch_size: int) -> Tensor:
    """(rows, K) logits of ``model`` on token-id rows, batched (right-padded; the pooling ignores padding)."""
    model.eval()
    out = [class_logits(model, *pad(ids[lo:lo + batch_size], pad_id)) for lo in range(0, len(ids), batch_size)]
    return torch.cat(out) if out else torch.zeros((0, model.config.num_labels))


def guarded_correct(correct: bool, harmful: bool, flagged: bool) -> float:
    """Whether a request's answer is right behind the guard: a flagged request gets the refusal, which is right exactly
    when the request was harmful; any other keeps the model's own answer (``correct``)."""
    return float(harmful if flagged else correct)


class Guard:
    """A trained classifier put in front of a chat model: :meth:`flags` says which requests get the refusal
    instead of an answer (those whose most likely label is the flagged one)."""

    def __init__(self, folder: str | Path, model_cfg: DictConfig | None = None, batch_size: int = 64):
        import json

        from pipeline.models import load_sequence_classifier, load_tokenizer

        about = json.loads((Path(folder) / GUARD_JSON).read_text())
        self.labels, self.flag, self.regime = about["labels"], about["flag"], about["regime"]
        self.max_tokens, self.batch_size = about["max_tokens"], batch_size
        self.tokenizer = load_tokenizer(folder, model_cfg)
        self.model = load_sequence_classifier(folder, model_cfg, labels=self.labels).eval()

    def flags(self, requests: list[str]) -> list[bool]:
        """Whether each request is flagged."""
        ids, _ = encode(self.tokenizer, [Labelled(r, 0) for r in requests], self.max_tokens)
        logits = predict(self.model, ids, self.tokenizer.pad_token_id, self.batch_size)
        return (logits.argmax(-1) == self.labels.index(self.flag)).tolist()
