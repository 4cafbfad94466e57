"""Tokenizers and causal LMs: build the embedded ones, load real ones safely, check they fit the chain.

Safe defaults: weights load from safetensors only (``use_safetensors=True``: a pickle checkpoint is
refused, never unpickled), ``trust_remote_code`` stays off unless the config turns it on, and no hub
download happens unless ``offline=false``.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

# Config keys a stage declares (pipeline.stage) when it loads a model folder the chain wrote: loading options.
LOAD_KEYS = ("model.trust_remote_code", "model.revision")
# ... and when it reads the source model (data/base): its identity and the chat template that overrides its own.
SOURCE_KEYS = (*LOAD_KEYS, "model.name_or_path", "model.gguf_file", "model.chat_template")

SPECIAL_TOKENS = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>"}
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
# A minimal chat template: <s><|user|>question<|assistant|>answer</s>. Role markers are single tokens, and
# the prompt with add_generation_prompt is a token prefix of the full conversation (the loss mask relies on it).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


class ModelError(ValueError):
    """A model or tokenizer cannot be used by the chain (not a causal LM, no chat template, ...)."""


def build_char_tokenizer(texts: list[str] | None = None):
    """A character-level tokenizer with a chat template, built locally.

    Vocabulary: the special and role tokens, printable ASCII, and any other character seen in ``texts``.
    Characters suit the embedded suite far better than byte-level BPE (STACK.md): a word or number is
    split the same way wherever it appears, so input and answer align for reversal, case and sums.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values()) + list(ROLE_TOKENS)
    chars = set(string.printable) - set("\x0b\x0c\r")
    for text in texts or ():
        chars.update(text)
    vocab = {tok: i for i, tok in enumerate(specials + sorted(chars))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=SPECIAL_TOKENS["unk"]))
    core.decoder = decoders.Fuse()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
    )


def build_causal_lm(arch: DictConfig, tokenizer, seed: int):
    """A freshly initialized causal LM of ``arch.type`` (llama or gpt2) sized for ``tokenizer``."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    common = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                  tie_word_embeddings=True)
    if arch.type == "llama":
        config = LlamaConfig(hidden_size=arch.hidden_size, num_hidden_layers=arch.num_layers,
                             num_attention_heads=arch.num_heads, num_key_value_heads=arch.num_heads,
                             intermediate_size=arch.intermediate_size, max_position_embeddings=arch.max_position,
                             attention_dropout=arch.dropout, **common)
    elif arch.type == "gpt2":
        config = GPT2Config(n_embd=arch.hidden_size, n_layer=arch.num_layers, n_head=arch.num_heads,
                            n_inner=arch.intermediate_size, n_positions=arch.max_position,
                            resid_pdrop=arch.dropout, embd_pdrop=arch.dropout, attn_pdrop=arch.dropout, **common)
    else:
        raise ModelError(f"model.arch.type = {arch.type!r}: valid values are ['llama', 'gpt2']")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def load_tokenizer(path: str | Path, model_cfg: DictConfig | None = None):
    """Load a tokenizer from a folder or hub id, with the configured chat template if one is set."""
    from transformers import AutoTokenizer

    kwargs = _load_kwargs(model_cfg)
    kwargs.pop("use_safetensors")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, TypeError, KeyError) as err:  # an empty or non-model folder, a broken file
        raise ModelError(f"{path}: no usable tokenizer there ({type(err).__name__}: "
                         f"{str(err).strip().splitlines()[0] if str(err).strip() else 'no message'})") from None
    if tokenizer is None or isinstance(tokenizer, bool):
        raise ModelError(f"{path}: no usable tokenizer there")
    # A stage that reads a tokenizer the chain saved does not declare model.chat_template: that one carries it.
    if model_cfg is not None and "chat_template" in model_cfg and model_cfg.chat_template:
        tokenizer.chat_template = model_cfg.chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str | Path, model_cfg: DictConfig | None = None, **kwargs: Any):
    """Load a causal LM from a folder or hub id, from safetensors only."""
    from transformers import AutoModelForCausalLM

    return _load(AutoModelForCausalLM, "a causal LM", path, model_cfg, **kwargs)


def load_sequence_scorer(path: str | Path, model_cfg: DictConfig | None = None, **kwargs: Any):
    """Load a model with a scalar head (``AutoModelForSequenceClassification``, one label) from a folder or
    hub id, from safetensors only. A causal LM's folder gets a freshly initialized head."""
    from transformers import AutoModelForSequenceClassification

    return _load(AutoModelForSequenceClassification, "a sequence scorer", path, model_cfg, num_labels=1, **kwargs)


def load_sequence_classifier(path: str | Path, model_cfg: DictConfig | None = None, *, labels: list[str],
                             **kwargs: Any):
    """Load a model with a ``len(labels)``-class head (``AutoModelForSequenceClassification``, its config naming
    the labels) from a folder or hub id, from safetensors only. A causal LM's folder gets a freshly initialized
    head."""
    from transformers import AutoModelForSequenceClassification

    names = {i: str(name) for i, name in enumerate(labels)}
    return _load(AutoModelForSequenceClassification, "a sequence classifier", path, model_cfg,
                 num_labels=len(labels), id2label=names, label2id={v: k for k, v in names.items()}, **kwargs)


def record_pad_token(folder: str | Path, pad_id: int) -> None:
    """Write the pad token into a saved classifier's config, so ``AutoModelForSequenceClassification`` users pool
    at the last real token as training did."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    config.pad_token_id = pad_id
    config.save_pretrained(folder)


def _load(auto_class, what: str, path: str | Path, model_cfg: DictConfig | None, **kwargs: Any):
    try:
        return auto_class.from_pretrained(str(path), **_load_kwargs(model_cfg), **kwargs)
    except ValueError as err:
        raise ModelError(f"{path}: cannot be loaded as {what}: {str(err).splitlines()[0]}") from None
    except OSError as err:
        raise ModelError(f"{path}: {str(err).splitlines()[0]} (weights must be safetensors; "
                         "a hub id needs offline=false and network)") from None


def _load_kwargs(model_cfg: DictConfig | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"use_safetensors": True, "trust_remote_code": False}
    if model_cfg is not None:
        kwargs["trust_remote_code"] = bool(model_cfg.trust_remote_code)
        if model_cfg.revision:
            kwargs["revision"] = model_cfg.revision
    return kwargs


def check_chat_template(tokenizer, source: str) -> None:
    """Fail unless the tokenizer renders a conversation whose prompt part is a token prefix of the whole.

    The response-only loss mask and generation both rely on that prefix property.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(f"{source}: the tokenizer has no chat template; set model.chat_template to a Jinja template")
    try:
        prompt, full = render_probe(tokenizer)
    except Exception as err:  # a broken template raises anything jinja can raise
        raise ModelError(f"{source}: the chat template does not render a conversation: {err}") from None
    if full[: len(prompt)] != prompt or len(full) <= len(prompt):
        raise ModelError(f"{source}: the chat template's generation prompt is not a prefix of the full conversation")


# One short exchange every check of a chat template renders.
PROBE = ({"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"})


def render_probe(tokenizer) -> tuple[list[int], list[int]]:
    """(generation prompt, whole conversation) of :data:`PROBE` as token ids through the chat template."""
    return render_ids(tokenizer, list(PROBE[:1]), add_generation_prompt=True), render_ids(tokenizer, list(PROBE))


def render_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of ``messages`` through the chat template (a plain list, whatever the tokenizer returns)."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def special_ids(tokenizer) -> set[int]:
    """Every special token id of ``tokenizer`` (eos, pad, role markers, turn ends...): none of them is text,
    so a response ends at the first one rather than decoding across it."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for i, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(token, "special", False):
            ids.add(int(i))
    return ids


def template_turn_end(tokenizer) -> int | None:
    """The token the chat template closes an assistant turn with (``<|im_end|>``, ``<|eot_id|>``,
    ``<end_of_turn>``, ``</s>``...): the first special token after the reply in a rendered conversation.
    None without a chat template or when the template closes turns in plain text."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        prompt, full = render_probe(tokenizer)
    except Exception:  # a template that cannot render is reported by check_chat_template
        return None
    specials = special_ids(tokenizer)
    return next((t for t in full[len(prompt):] if t in specials), None)


def template_summary(tokenizer) -> dict:
    """What the chat template does around a conversation, for the data card: the text it puts before the
    user's turn (a default system prompt shows here), the turn end, and the tokenizer's bos, eos and pad."""
    marker = "@@user@@"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True)
    turn_end = template_turn_end(tokenizer)
    return {"preamble": text[: text.index(marker)] if marker in text else None,
            "generation_prompt": text[text.index(marker) + len(marker):] if marker in text else None,
            "end_of_turn": tokenizer.convert_ids_to_tokens(turn_end) if turn_end is not None else None,
            "bos": tokenizer.bos_token, "eos": tokenizer.eos_token, "pad": tokenizer.pad_token,
            "pad_is_eos": tokenizer.pad_token_id == tokenizer.eos_token_id}


def end_of_turn_ids(tokenizer, model=None) -> list[int]:
    """Every id that ends a reply: the tokenizer's eos, the model's generation config and config eos (an id
    or a list, as Llama 3 declares), and the chat template's turn end. A model whose turn end is not its
    eos (Qwen's ``<|im_end|>``, Llama 3's ``<|eot_id|>``) stops where its template says the reply ends."""
    found: list[int] = []

    def add(value) -> None:
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and int(i) not in found:
                found.append(int(i))

    add(tokenizer.eos_token_id)
    if model is not None:
        add(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
        add(getattr(getattr(model, "config", None), "eos_token_id", None))
    add(template_turn_end(tokenizer))
    return found


def base_sources(base_dir: str | Path) -> tuple[str, str]:
    """(model location, tokenizer location) of the base stage's output.

    The embedded model is the folder itself; a real model's folder holds ``source.json`` pointing at the
    model's own files, and holds a tokenizer only when a chat template was configured.
    """
    import json

    base_dir = Path(base_dir)
    source = base_dir / "source.json"
    if not source.exists():
        return str(base_dir), str(base_dir)
    files = json.loads(source.read_text())["files"]
    has_tokenizer = (base_dir / "tokenizer_config.json").exists()
    return files, str(base_dir) if has_tokenizer else files


def base_reference(model_cfg: DictConfig, base_dir: str | Path) -> str:
    """What an adapter records as its base model: the hub id or folder the user named, or the chain's own
    ``data/base`` when the base was built here (embedded) or converted here (GGUF)."""
    if model_cfg.name_or_path is None or model_cfg.gguf_file:
        return str(base_dir)
    return model_cfg.name_or_path


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
