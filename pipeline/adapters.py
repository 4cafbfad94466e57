"""Parameter-efficient fine-tuning through peft, plus BitFit and full fine-tuning, chosen by ``conf/peft``.

``peft.method`` names a peft method (``lora``, ``ia3``, ``loha``, ``lokr``, ``oft``, ``vera``,
``adalora``, ``ln_tuning``, ``prompt_tuning``, ``prefix_tuning``, ``p_tuning``), or ``bitfit`` (train
only the biases, by plain parameter freezing), or ``none`` (full fine-tuning). ``peft.options`` goes to
the peft config class unchanged, under peft's own argument names (DoRA is ``lora`` with
``use_dora: true``). ``peft.quantize_base: nf4`` loads the frozen base in 4 bits through bitsandbytes
(QLoRA).

Target modules are found per architecture, never hard-wired: every linear projection (``nn.Linear`` or
GPT-2's ``Conv1D``) except the output head; IA3's feed-forward modules are the MLP projections that
narrow the width back (down projections).

Hand-off: an adapter is merged into full-precision weights before saving, so any HF user can load the
result; the adapter is saved beside it. Prompt-learning methods have nothing to merge: their output is
the base weights plus the adapter, loaded back through peft (:func:`load_trained`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.schema import PROMPT_LEARNING, ConfigError

PEFT_CLASSES = {
    "lora": "LoraConfig", "ia3": "IA3Config", "loha": "LoHaConfig", "lokr": "LoKrConfig", "oft": "OFTConfig",
    "vera": "VeraConfig", "adalora": "AdaLoraConfig", "ln_tuning": "LNTuningConfig",
    "prompt_tuning": "PromptTuningConfig", "prefix_tuning": "PrefixTuningConfig", "p_tuning": "PromptEncoderConfig",
}
ADAPTER_DIR = "adapter"
OUTPUT_HEAD_NAMES = ("lm_head", "embed_out", "output", "score", "v_head")


def linear_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every linear projection of ``model`` by qualified name, the output head excluded."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {
        name: module for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head
        and name.split(".")[-1] not in OUTPUT_HEAD_NAMES
    }


def target_modules(model: torch.nn.Module) -> list[str]:
    """Leaf names of every linear projection (what ``target_modules: auto`` resolves to)."""
    names = sorted({name.split(".")[-1] for name in linear_modules(model)})
    if not names:
        raise ConfigError("peft.target_modules = auto found no linear layers in this model; list them explicitly")
    return names


def feedforward_modules(model: torch.nn.Module) -> list[str]:
    """Qualified-name suffixes of the MLP down projections (IA3 scales their inputs, not outputs)."""
    found = []
    for name, module in linear_modules(model).items():
        weight = module.weight
        # nn.Linear stores (out, in); Conv1D stores (in, out).
        n_in, n_out = (weight.shape[1], weight.shape[0]) if isinstance(module, torch.nn.Linear) else weight.shape
        parts = name.split(".")
        if "mlp" in parts and n_in > n_out:
            found.append(".".join(parts[parts.index("mlp"):]))
    return sorted(set(found))


def peft_config(cfg: DictConfig, model: torch.nn.Module, task_type: str = "CAUSAL_LM"):
    """The peft config object for ``cfg`` (``conf/peft``), with targets resolved for ``model``.

    ``task_type="SEQ_CLS"`` (reward models, critics) makes peft train the scalar head in full beside the adapter.
    """
    import inspect

    import peft

    cls = getattr(peft, PEFT_CLASSES[cfg.method])
    options: dict[str, Any] = OmegaConf.to_container(cfg.options, resolve=True) if cfg.options else {}
    accepted = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"config key 'peft.options.{unknown[0]}' is not an option of peft.{cls.__name__}; "
                          f"valid: {sorted(k for k in accepted if k != 'self')}")
    if "target_modules" in accepted and cfg.method not in PROMPT_LEARNING:
        targets = cfg.target_modules
        options["target_modules"] = target_modules(model) if targets in (None, "auto") else list(targets)
        if cfg.method == "ia3":
            ff = feedforward_modules(model)
            options["target_modules"] = sorted(set(options["target_modules"]) | set(ff))
            options.setdefault("feedforward_modules", ff)
    return cls(task_type=task_type, **options)


def apply(model: torch.nn.Module, cfg: DictConfig, task_type: str = "CAUSAL_LM") -> torch.nn.Module:
    """Make ``model`` trainable the configured way; return the (possibly wrapped) model. For
    ``task_type="SEQ_CLS"`` the scalar head is always trained."""
    if cfg.method == "none":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if cfg.method == "bitfit":
        biases = 0
        for name, p in model.named_parameters():
            is_bias = name.endswith(".bias")
            p.requires_grad_(is_bias or (task_type == "SEQ_CLS" and name.split(".")[0] in OUTPUT_HEAD_NAMES))
            biases += is_bias
        if not biases:
            raise ConfigError(f"peft.method = bitfit: the model ({type(model).__name__}) has no bias parameters "
                              "(Llama-family models have none); choose another peft method")
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if cfg.quantize_base:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, peft_config(cfg, model, task_type))


def stage_peft(cfg: DictConfig, stage: str) -> DictConfig:
    """The fine-tuning method a stage uses: the ``peft`` group, unless the stage names its own method
    (``<stage>.peft``, a choice of the same group: ``peft@sft.peft=none`` fine-tunes SFT fully while alignment
    keeps its adapter); each choice brings its own options."""
    own = cfg[stage].get("peft")
    return cfg.peft if own is None else own


def quantization_config(cfg: DictConfig):
    """bitsandbytes 4-bit config for QLoRA (``peft.quantize_base``), or None."""
    if not cfg.quantize_base:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quantize_base,
                              bnb_4bit_compute_dtype=torch.float32, bnb_4bit_use_double_quant=True)


def uses_virtual_tokens(model) -> bool:
    """Whether a peft prompt-learning adapter prepends virtual tokens (then a prompt's KV cache cannot be
    shared or built by hand: such models decode through ``generate``)."""
    configs = getattr(model, "peft_config", None) or {}
    return any(getattr(c, "is_prompt_learning", False) for c in configs.values())


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def canonical_adapter_configs(folder: Path, base_ref: str | None = None) -> None:
    """Rewrite every ``adapter_config.json`` under ``folder`` (PPO's critic adapter sits in a subfolder) with peft's
    sets sorted: peft lists ``target_modules`` in hash order, which PYTHONHASHSEED changes from run to run, so
    equal adapters would be different bytes and DVC would rerun what follows. ``base_ref``: the base model
    the top folder's adapter records (peft writes an absolute local path there)."""
    for config_file in sorted(folder.rglob("adapter_config.json")):
        adapter_config = json.loads(config_file.read_text())
        if base_ref is not None and config_file.parent == folder:
            adapter_config["base_model_name_or_path"] = base_ref
        for key in ("target_modules", "modules_to_save", "exclude_modules"):
            if isinstance(adapter_config.get(key), list):
                adapter_config[key] = sorted(adapter_config[key])
        config_file.write_text(json.dumps(adapter_config, indent=2, sort_keys=True))


def save_trained(model: torch.nn.Module, cfg: DictConfig, out: Path, base_path: str, model_cfg: DictConfig,
                 base_ref: str, load_base=None) -> None:
    """Save a trained model into ``out``: merged full-precision weights (plus ``adapter/``) for adapter
    methods, the whole model for full fine-tuning and BitFit, base + ``adapter/`` for prompt learning.

    ``base_ref`` is what ``adapter_config.json`` records as the base model (peft writes an absolute
    local path, which would not survive a move or DVC's cache): a relative or hub reference.
    ``load_base(path, model_cfg, dtype=...)`` loads the base for merging (default: a causal LM).
    """
    from pipeline.models import load_causal_lm

    if cfg.method in ("none", "bitfit"):
        model.save_pretrained(out, safe_serialization=True)
        return
    adapter_dir = out / ADAPTER_DIR
    model.save_pretrained(adapter_dir, safe_serialization=True)
    canonical_adapter_configs(adapter_dir, base_ref)
    # Merge into full-precision weights: a quantized (QLoRA) base cannot take a merge, so the adapter
    # goes onto a fresh fp32 copy of the base.
    from peft import PeftModel

    base = (load_base or load_causal_lm)(base_path, model_cfg, dtype=torch.float32)
    if cfg.method in PROMPT_LEARNING:
        base.save_pretrained(out, safe_serialization=True)  # nothing to merge: base + adapter
        return
    PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().save_pretrained(out, safe_serialization=True)


def prompt_learning_adapter(folder: str | Path) -> str | None:
    """The prompt-learning method whose virtual tokens a saved model carries (``<folder>/adapter``), or None
    for merged weights."""
    config = Path(folder) / ADAPTER_DIR / "adapter_config.json"
    if not config.exists():
        return None
    kind = json.loads(config.read_text()).get("peft_type", "").lower()
    return kind if kind in PROMPT_LEARNING else None


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Dropout off everywhere in ``model`` (TRL's ``disable_dropout``): ``nn.Dropout`` modules, peft's
    ``lora_dropout`` among them, and attention dropout kept as a float (Llama's ``attention_dropout``).

    Alignment compares log-probs of the same tokens under models that should agree: PPO's first ratio
    (policy vs the policy that sampled), DPO's and GRPO's reference (the same weights, adapter off). With
    dropout in train mode two forwards of one unchanged model differ, so the ratio is not 1 and the KL not 0.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    config = getattr(model, "config", None)
    for key in ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout", "dropout"):
        if isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)
    return model


def load_policy(sft_dir: str | Path, cfg: DictConfig, stage: str) -> torch.nn.Module:
    """The SFT model an alignment stage starts from, made trainable the ``peft`` group's way, dropout off
    (:func:`disable_dropout`).

    SFT's weights are merged, so any method can continue from them. A prompt-learning SFT (``sft.peft:
    prompt_tuning``...) is base weights plus virtual tokens: loading only the weights would align the bare
    base with a fresh random prompt. So dpo continues SFT's own virtual tokens when ``peft.method`` is the
    same method, and every other combination is refused with what to set instead.
    """
    from pipeline.models import load_causal_lm

    kind = prompt_learning_adapter(sft_dir)
    if kind is None:
        model = load_causal_lm(sft_dir, cfg.model, quantization_config=quantization_config(cfg.peft))
        return disable_dropout(apply(model, cfg.peft))
    if stage == "dpo" and cfg.peft.method == kind:
        # peft refuses to load a prompt-learning adapter as trainable: build one from its config, then load it.
        from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
        from safetensors.torch import load_file

        adapter_dir = Path(sft_dir) / ADAPTER_DIR
        config = PeftConfig.from_pretrained(str(adapter_dir))
        config.inference_mode = False
        model = get_peft_model(load_causal_lm(sft_dir, cfg.model), config)
        set_peft_model_state_dict(model, load_file(str(adapter_dir / "adapter_model.safetensors")))
        return disable_dropout(model)
    hint = f"set peft.method={kind} to continue SFT's virtual tokens" if stage == "dpo" else \
        "online alignment needs weights: train SFT with a weight method (peft@sft.peft=lora, none, ...)"
    raise ConfigError(f"{sft_dir} holds a {kind} adapter (SFT trained virtual tokens), but {stage} uses "
                      f"peft.method = {cfg.peft.method!r}: it would start from the bare base; {hint}")


def load_trained(folder: str | Path, model_cfg: DictConfig | None = None):
    """Load a model saved by :func:`save_trained` (merged weights, or base + prompt-learning adapter)."""
    from pipeline.models import load_causal_lm

    folder = Path(folder)
    model = load_causal_lm(folder, model_cfg)
    adapter_dir = folder / ADAPTER_DIR
    if adapter_dir.exists():
        peft_type = json.loads((adapter_dir / "adapter_config.json").read_text()).get("peft_type", "")
        if peft_type.lower() in PROMPT_LEARNING:
            from peft import PeftModel

            return PeftModel.from_pretrained(model, str(adapter_dir))
    return model
