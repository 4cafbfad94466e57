"""Shared fixtures: real Hydra composition, a tiny smoke chain in a temp dir, tiny HF models on disk."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import pipeline  # noqa: F401  (telemetry off)

ROOT = Path(__file__).resolve().parent.parent
PROJECT_FILES = ("conf", "pipeline", "stages", "data/labels", "data/UNREAD.md", "dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", "pyproject.toml")


def compose(*overrides: str):
    """The validated composition of conf/ with ``overrides`` (smoke-sized unless told otherwise)."""
    from pipeline.compose import compose as hydra_compose
    from pipeline.schema import validate

    return validate(hydra_compose(list(overrides)))


def run_stage(stage: str, *overrides: str, values: dict | None = None) -> dict:
    """Run one stage in this process, in the current directory, on the smoke experiment.

    ``values`` sets keys after composition (for values awkward to quote as Hydra overrides).
    """
    from omegaconf import OmegaConf

    from pipeline.run import run

    cfg = compose(f"stage={stage}", "experiment=smoke", *overrides)
    for key, value in (values or {}).items():
        OmegaConf.update(cfg, key, value)
    return run(cfg)


def subprocess_env() -> dict[str, str]:
    """Environment for child processes: this venv first on PATH, offline, no telemetry."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("POSTTRAIN_PARENT_RUN_ID", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def sh(*cmd: str, cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command; on failure show its output."""
    proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, env=env or subprocess_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def offline_plots(dest: Path) -> None:
    """The project's offline ``dvc plots`` page template (built by ``make install``: python -m pipeline.vega)
    and the DVC config that uses it, as in the project's own ``.dvc/``."""
    from pipeline.vega import TEMPLATE

    if not (ROOT / TEMPLATE).is_file():
        raise AssertionError(f"{ROOT / TEMPLATE} is missing: run `make install` (python -m pipeline.vega builds it)")
    (dest / TEMPLATE).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / TEMPLATE, dest / TEMPLATE)
    sh("dvc", "config", "plots.html_template", str(TEMPLATE.relative_to(".dvc")), cwd=dest)


def make_project(dest: Path, *compose_overrides: str) -> Path:
    """A fresh copy of the project as its own git + DVC repo, with params.yaml composed from overrides."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    sh("git", "init", "-q", cwd=dest)
    sh("git", "config", "user.email", "test@example.com", cwd=dest)
    sh("git", "config", "user.name", "test", cwd=dest)
    sh("dvc", "init", "-q", cwd=dest)
    sh("dvc", "config", "core.analytics", "false", cwd=dest)
    sh("dvc", "config", "hydra.enabled", "true", cwd=dest)
    offline_plots(dest)
    sh(sys.executable, "-m", "pipeline.compose", *compose_overrides, cwd=dest)
    sh("git", "add", "-A", cwd=dest)
    sh("git", "commit", "-qm", "init", cwd=dest)
    return dest


@pytest.fixture(scope="session")
def smoke_chain(tmp_path_factory) -> Path:
    """base and prepare of the smoke experiment, run once in-process in a temp dir, shared read-only."""
    workdir = tmp_path_factory.mktemp("smoke_chain")
    old = os.getcwd()
    os.chdir(workdir)
    try:
        run_stage("base")
        run_stage("prepare")
    finally:
        os.chdir(old)
    return workdir


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run the test inside a fresh temp dir (stage outputs and the MLflow store land there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def save_tiny_model(folder: Path, arch: str, with_template: bool = True) -> Path:
    """A tiny random causal LM of ``arch`` (llama | gpt2) saved with save_pretrained, safetensors."""
    from omegaconf import OmegaConf

    from pipeline.models import build_causal_lm, build_char_tokenizer

    tokenizer = build_char_tokenizer()
    if not with_template:
        tokenizer.chat_template = None
    arch_cfg = OmegaConf.create(dict(type=arch, hidden_size=32, num_layers=2, num_heads=2,
                                     intermediate_size=64, max_position=256, dropout=0.0))
    model = build_causal_lm(arch_cfg, tokenizer, seed=0)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


# Chat conventions of real model families, on the character vocabulary: (bos, eos, pad, turn end, template).
# Each differs from the embedded one where real models trip a chain: no BOS and a default system prompt (Qwen's
# ChatML), an eos that is not the turn end (Llama 3, Qwen, Phi-3, Gemma), pad = eos (Phi-3).
CHAT_STYLES = {
    "chatml": (None, "<|endoftext|>", "<|endoftext|>", "<|im_end|>",
               "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
               "{% endif %}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    "llama3": ("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|eot_id|>",
               "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + "
               "m['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    "gemma": ("<bos>", "<eos>", "<pad>", "<end_of_turn>",
              "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
              "{{ '<start_of_turn>' + role + '\n' + m['content'] + '<end_of_turn>\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"),
    "phi3": ("<s>", "<|endoftext|>", "<|endoftext|>", "<|end|>",
             "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"),
}


def chat_tokenizer(style: str):
    """The character tokenizer dressed in a real family's chat conventions (:data:`CHAT_STYLES`)."""
    import re

    from pipeline.models import build_char_tokenizer

    bos, eos, pad, turn_end, template = CHAT_STYLES[style]
    tokenizer = build_char_tokenizer()
    markers = sorted((set(re.findall(r"<[|a-z_]+\|?>", template)) | {bos, eos, pad, turn_end}) - {None})
    tokenizer.add_special_tokens({"additional_special_tokens": markers})
    tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token = eos, pad, bos
    tokenizer.chat_template = template
    return tokenizer


def save_tiny_config_model(folder: Path, config_class: str, style: str | None = None, **fields) -> Path:
    """A tiny random causal LM built from a transformers config class (``LlamaConfig``, ``Qwen2Config``, ...)
    with ``fields``, sized for the character tokenizer (in a family's chat ``style``, :data:`CHAT_STYLES`, or
    the embedded one), saved with save_pretrained (safetensors). A style's turn end goes into the generation
    config's eos list beside the eos, as real chat models declare it."""
    import torch
    import transformers

    from pipeline.models import build_char_tokenizer

    tokenizer = chat_tokenizer(style) if style else build_char_tokenizer()
    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **fields)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    if style:
        turn_end = tokenizer.convert_tokens_to_ids(CHAT_STYLES[style][3])
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, turn_end]
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def digit_share(rows: list[dict], texts: list[str]):
    """A toy reward: the share of digits in the response (about 1 in 10 tokens for a random tiny model)."""
    import torch

    return torch.tensor([sum(ch.isdigit() for ch in t) / max(1, len(t)) for t in texts])


def toy_module(tmp_path: Path, stage: str, scorer=digit_share, module_class=None, **values):
    """A tiny random Llama with LoRA, 40 prompts (``{"id": i, "Say i."}``), and the online stage's module
    (``module_class``: the stage's own, or a subclass a test overrides) on ``scorer``, with ``<stage>.<key>``
    set to each of ``values``. Returns (module, prompt data, the stage's config)."""
    import json

    import torch
    from omegaconf import OmegaConf

    from pipeline import adapters
    from pipeline.models import load_causal_lm, load_tokenizer
    from pipeline.online import PromptData, Reference

    folder = save_tiny_model(tmp_path / "model", "llama")
    tok, model = load_tokenizer(folder), load_causal_lm(folder)
    torch.manual_seed(0)
    with torch.no_grad():  # larger weights than the 0.02 init: a near-uniform model barely moves under LoRA
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.3)
    cfg = compose(f"stage={stage}", "experiment=smoke")
    for key, value in values.items():
        OmegaConf.update(cfg, f"{stage}.{key}", value)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": str(i), "messages": [{"role": "user", "content": f"Say {i}."}]}) + "\n"
                               for i in range(40)))
    data = PromptData(prompts, tok, cfg.seed, cfg[stage])
    data.setup()
    adapter_config = adapters.peft_config(cfg.peft, model)
    model = adapters.apply(model, cfg.peft)
    reference = Reference(model)
    if stage == "ppo":
        from stages.ppo import CRITIC, Critic, PPOModule, hidden_size

        model.add_adapter(CRITIC, adapter_config)
        model.set_requires_grad(list(model.peft_config), True)
        module = (module_class or PPOModule)(model, tok, cfg, scorer, reference,
                                             Critic(model, hidden_size(model), shared=True))
    else:
        from stages.grpo import GRPOModule

        module = (module_class or GRPOModule)(model, tok, cfg, scorer, reference)
    return module, data, cfg[stage]


@pytest.fixture(scope="session")
def sft_chain(smoke_chain, tmp_path_factory) -> Path:
    """The smoke chain through sft (a copy of ``smoke_chain`` plus the sft stage), shared read-only."""
    return extend_chain(smoke_chain, "sft_chain", tmp_path_factory, ("sft",))


def copy_chain(chain: Path, dest: Path) -> Path:
    """A private copy of a shared chain folder, to run further stages in."""
    shutil.copytree(chain, dest, dirs_exist_ok=True)
    return dest


def extend_chain(chain: Path, name: str, tmp_path_factory, *stages: tuple[str, ...]) -> Path:
    """A copy of ``chain`` with further stages run in it in-process, each ``(stage, *overrides)``."""
    workdir = copy_chain(chain, tmp_path_factory.mktemp(name))
    old = os.getcwd()
    os.chdir(workdir)
    try:
        for stage, *overrides in stages:
            run_stage(stage, *overrides)
    finally:
        os.chdir(old)
    return workdir


@pytest.fixture(scope="session")
def pairs_chain(sft_chain, tmp_path_factory) -> Path:
    """The smoke chain through collect, judged by the shipped brevity function (the smoke policy is too weak
    for the verifier to separate its samples), shared read-only."""
    return extend_chain(sft_chain, "pairs_chain", tmp_path_factory, ("collect", "judge=function"))


@pytest.fixture(scope="session")
def reward_chain(pairs_chain, tmp_path_factory) -> Path:
    """The smoke chain through the reward stage (on the brevity pairs), shared read-only."""
    return extend_chain(pairs_chain, "reward_chain", tmp_path_factory, ("reward",))


@pytest.fixture(scope="session")
def dpo_chain(pairs_chain, tmp_path_factory) -> Path:
    """The smoke chain through dpo with its default settings (no reward model), shared read-only."""
    return extend_chain(pairs_chain, "dpo_chain", tmp_path_factory, ("dpo",))
