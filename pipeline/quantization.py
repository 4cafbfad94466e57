"""Post-training quantization methods, their capability checks, and what they cost in bytes.

Every method starts from full-precision weights: an adapter is merged first (:func:`merged_source`),
because merging into an already quantized base is what fails elsewhere (peft cannot add a LoRA delta to
packed int8 / NF4 weights without dequantizing them, and the rounding of the base would then be baked into
the merge). Methods (``quantize.method`` saves one, ``quantize.compare`` measures several):

| method | library | weights | activations | saved |
|---|---|---|---|---|
| ``int8_weight_only`` | torchao ``Int8WeightOnlyConfig`` | int8, symmetric (absmax) per output row | fp32 | safetensors via ``TorchAoConfig`` |
| ``int8_weight_only_asym`` | torchao ``IntxWeightOnlyConfig`` | int8, asymmetric (zero point) per row | fp32 | safetensors via ``TorchAoConfig`` |
| ``int8_static`` | torchao ``Int8StaticActivationInt8WeightConfig`` | int8 symmetric per row | int8, one scale per layer calibrated on a calibration split | in-process |
| ``int8_static_asym`` | the same | int8 symmetric per row | int8 with a calibrated zero point (asymmetric) | in-process |
| ``int8_dynamic`` | torch ``quantize_dynamic`` | int8 per tensor | int8, scale computed per batch at run time | never: only pickle could save it |
| ``bnb_int8`` | bitsandbytes LLM.int8() | int8 per row + fp16 outliers | fp16 | safetensors |
| ``bnb_nf4`` | bitsandbytes NF4 | 4-bit normal-float, blocks of 64 (layers the kernel cannot take stay fp32) | fp32 | safetensors |
| ``int4_weight_only`` | torchao ``Int4WeightOnlyConfig`` | int4, groups of 128 | bf16 | safetensors; needs kernels this CPU build lacks (a clear message) |
| ``intx_w8`` | torchao ``IntxWeightOnlyConfig`` | int8, symmetric per row | fp32 | in-process; QAT-capable |
| ``intx_w4a8`` | torchao ``Int8DynamicActivationIntxWeightConfig`` | int4, symmetric, groups of 32 | int8 per token, dynamic | in-process; QAT-capable |
| ``intx_w2a8`` | the same | int2, symmetric, groups of 32 | int8 per token, dynamic | in-process; QAT-capable |
| ``bf16`` / ``fp16`` | torch ``Module.to`` | bfloat16 / float16 | the same | in-process |

The ``intx`` methods are torchao's quantization-aware-training family: :func:`prepare_qat` puts fake quantizers
in their linear layers (the forward pass rounds weights and activations exactly as the converted model will, the
backward pass goes straight through), and :func:`convert_qat` turns the trained copy into the same quantized
tensors that quantizing the untrained model directly (PTQ) gives. So at each bit width the PTQ row and the QAT
row differ only by the fine-tune. On CPU the int4 and int2 codes are kept one per int8 byte
(``IntxUnpackedToInt8Tensor``): their linear bytes are int8's plus the per-group scales; packing two or four
codes per byte is a kernel this build lacks, so the table reports the bytes as held.

Static vs dynamic: a static method fixes the activation scale once, from activation ranges seen on a
calibration split (:func:`activation_ranges`, run through ``Trainer.predict``); a dynamic one measures
every batch at run time (no calibration, more work per call). Symmetric maps [-absmax, absmax] onto the
int8 range around 0; asymmetric maps [min, max] with a zero point, which wastes no codes on one-sided
ranges (the inputs of the MLP's down projection after SiLU gating lean positive).

Layers a kernel cannot take. A method may declare a shape rule (:attr:`Method.fits`); a linear layer that
breaks it stays in full precision, as bitsandbytes' and transformers' own skip lists do for output heads,
and :func:`unfit_layers` names it with the reason (the quantize stage reports them). The rule is applied on
every CPU, not only where the kernel would fail, so the same model quantizes to the same layers everywhere:
bitsandbytes packs NF4 weights for its AVX-512 CPU kernel in groups of 32 output rows and whole 64-wide
blocks of inputs, and fails on any other shape (a 16-wide key projection of a small model with grouped-query
attention, a narrow adapter or classifier head), while its AVX2 path would run them.

Failures. :func:`check_supported` reports only a known capability gap (a kernel library that is not
installed, an operation not implemented for this device) as :class:`UnsupportedMethod`; any other exception
is a failure of the method and propagates with its own message.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from pipeline.adapters import linear_modules

# bitsandbytes' 8-bit matmul warns on every call that it casts fp32 inputs to fp16 (thousands of lines
# per evaluation); torch's dynamic quantization warns that it is deprecated. Neither is actionable here.
warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")
warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")


class UnsupportedMethod(RuntimeError):
    """A quantization method that this machine (hardware or installed kernels) cannot run."""


def nf4_kernel_fits(in_features: int, out_features: int) -> str | None:
    """Why bitsandbytes' packed NF4 CPU kernel cannot take a layer of this shape (None: it can)."""
    if in_features % NF4_BLOCK or out_features % NF4_ROWS:
        return (f"{in_features} -> {out_features}: the NF4 CPU kernel needs inputs in whole blocks of {NF4_BLOCK} "
                f"and outputs in groups of {NF4_ROWS}")
    return None


NF4_BLOCK = 64  # bitsandbytes' 4-bit quantization block (inputs per absmax)
NF4_ROWS = 32   # output rows its CPU kernel packs together
INTX_GROUP = 32  # inputs per scale of the intx int4 / int2 weights: smaller = more scales, less rounding error


def intx_group_fits(in_features: int, out_features: int) -> str | None:
    """Why torchao's per-group intx weights cannot take a layer of this shape (None: they can)."""
    if in_features % INTX_GROUP:
        return f"{in_features} -> {out_features}: per-group weights need inputs in whole groups of {INTX_GROUP}"
    return None


# The intx methods' weight bits and whether activations are quantized too (int8, per token, at run time).
INTX = {"intx_w8": (8, False), "intx_w4a8": (4, True), "intx_w2a8": (2, True)}
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Method:
    """A quantization method: how to build it and what it is."""

    name: str
    library: str
    saves: bool          # written as safetensors and loaded back with from_pretrained
    calibrated: bool     # needs activation ranges from a calibration split (static quantization)
    summary: str
    fits: Callable[[int, int], str | None] | None = None  # (in, out) -> why a layer cannot be quantized, or None


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("int8_weight_only", "torchao", True, False, "int8 weights, symmetric per row; fp32 activations"),
    Method("int8_weight_only_asym", "torchao", True, False, "int8 weights, asymmetric per row (zero point)"),
    Method("int8_static", "torchao", False, True, "int8 weights and activations, activation scale calibrated"),
    Method("int8_static_asym", "torchao", False, True, "int8 weights; int8 activations with calibrated zero point"),
    Method("int8_dynamic", "torch", False, False, "int8 weights; activations quantized per batch at run time"),
    Method("bnb_int8", "bitsandbytes", True, False, "LLM.int8(): int8 weights per row, fp16 outliers"),
    Method("bnb_nf4", "bitsandbytes", True, False, "4-bit normal-float weights in blocks of 64", nf4_kernel_fits),
    Method("int4_weight_only", "torchao", True, False, "int4 weights in groups of 128"),
    Method("intx_w8", "torchao", False, False, "int8 weights, symmetric per row (QAT-capable)"),
    Method("intx_w4a8", "torchao", False, False, "int4 weights in groups of 32, int8 dynamic activations (QAT-capable)",
           intx_group_fits),
    Method("intx_w2a8", "torchao", False, False, "int2 weights in groups of 32, int8 dynamic activations (QAT-capable)",
           intx_group_fits),
    Method("bf16", "torch", False, False, "weights and activations in bfloat16"),
    Method("fp16", "torch", False, False, "weights and activations in float16"),
)}


# --------------------------------------------------------------------------------------------- sources
def merged_source(folder: str | Path) -> Path:
    """The full-precision model folder to quantize: ``folder`` itself when it holds merged weights (every
    stage of this chain saves merged weights beside ``adapter/``).

    Raises:
        UnsupportedMethod: the folder holds a prompt-learning adapter only (virtual tokens have no weights
            to merge, so there is nothing full-precision to quantize but the base).
    """
    folder = Path(folder)
    if not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"{folder}: no safetensors weights to quantize")
    adapter = folder / "adapter" / "adapter_config.json"
    if adapter.exists():
        import json

        from pipeline.schema import PROMPT_LEARNING

        kind = json.loads(adapter.read_text()).get("peft_type", "").lower()
        if kind in PROMPT_LEARNING:
            raise UnsupportedMethod(f"{folder}: a {kind} adapter has no weights to merge; quantizing would drop it")
    return folder


def merge_adapter(base_folder: str | Path, adapter_folder: str | Path):
    """Merge a weight adapter into a full-precision copy of its base: the step that must come before
    quantization (see the module docstring). Returns the merged fp32 model."""
    from peft import PeftModel

    from pipeline.models import load_causal_lm

    base = load_causal_lm(base_folder, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_folder)).merge_and_unload()


# --------------------------------------------------------------------------------------------- building
# Exceptions and messages by which a library says it lacks a kernel or an operation on this machine; any
# other exception is a failure of the method, not a capability gap.
CAPABILITY_ERRORS = (ImportError, NotImplementedError)
CAPABILITY_MESSAGES = ("not implemented for", "could not run", "no kernel", "not supported on", "is not compiled",
                       "requires a gpu", "requires cuda", "cuda is not available")


def is_capability_error(err: BaseException) -> bool:
    """True when ``err`` says this machine lacks a kernel or operation (not that the method broke)."""
    text = str(err).lower()
    return isinstance(err, CAPABILITY_ERRORS) or any(m in text for m in CAPABILITY_MESSAGES)


def check_supported(name: str) -> None:
    """Raise :class:`UnsupportedMethod`, saying why, when ``name`` cannot run on this machine.

    The check quantizes and runs one small linear layer with the method, so it reports what this exact
    hardware and library build do, not what a table says. Only a capability gap (:func:`is_capability_error`)
    is "unsupported"; any other exception propagates unchanged: the method failed, and says why.
    """
    if name not in METHODS:
        raise UnsupportedMethod(f"unknown quantization method {name!r}; valid: {sorted(METHODS)}")
    probe = torch.nn.Sequential(torch.nn.Linear(256, 256)).eval()
    try:
        with torch.no_grad():
            _apply_in_place(name, probe, {"0": (torch.tensor(1.0), torch.tensor(-1.0))})(
                torch.randn(2, 3, 256, dtype=HALF.get(name, torch.float32)))
    except Exception as err:
        if not is_capability_error(err):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        device = "this CPU" if not torch.cuda.is_available() else "this machine"
        raise UnsupportedMethod(f"quantization method {name!r} ({METHODS[name].summary}) does not run on {device} "
                                f"with the installed {METHODS[name].library}: {first}") from None


def linear_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """(in, out) features of every linear projection (output head excluded), by qualified name."""
    shapes = {}
    for fqn, module in linear_modules(model).items():
        if isinstance(module, torch.nn.Linear):
            shapes[fqn] = (module.in_features, module.out_features)
        else:  # GPT-2's Conv1D stores its weight as (in, out)
            shapes[fqn] = tuple(module.weight.shape)
    return shapes


def unfit_layers(name: str, model: torch.nn.Module) -> dict[str, str]:
    """Linear layers of ``model`` that method ``name`` leaves in full precision, with the reason."""
    rule = METHODS[name].fits
    reasons = {}
    if name in INTX:  # torchao's intx configs and fake quantizers take torch.nn.Linear only
        reasons = {fqn: f"{type(m).__name__} is not a torch.nn.Linear (torchao's intx configs take those only)"
                   for fqn, m in linear_modules(model).items() if not isinstance(m, torch.nn.Linear)}
    if rule is not None:
        reasons.update({fqn: rule(*shape) for fqn, shape in linear_shapes(model).items() if fqn not in reasons})
    return {fqn: why for fqn, why in reasons.items() if why}


def output_heads(model: torch.nn.Module) -> list[str]:
    """Qualified names of the output head (the module ``get_output_embeddings`` returns), if any."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [fqn for fqn, module in model.named_modules() if head is not None and module is head]


def _skeleton(folder: str | Path, model_cfg=None) -> torch.nn.Module:
    """The model of ``folder`` built on the meta device: its module shapes, no weights read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    remote = bool(model_cfg is not None and model_cfg.trust_remote_code)
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=remote)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=remote)


def quantize_model(name: str, folder: str | Path, ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                   model_cfg=None):
    """Load the fp32 model in ``folder`` quantized by method ``name``.

    Methods that save are quantized at load time through ``from_pretrained(quantization_config=...)``,
    the path whose ``save_pretrained`` writes safetensors that load back exactly; the others are applied to
    a loaded fp32 model in place. ``ranges`` (per linear layer: max and min of its input) are needed by the
    static methods. Layers the method's kernel cannot take (:func:`unfit_layers`) stay in full precision.
    """
    from pipeline.models import load_causal_lm

    method = METHODS[name]
    if method.calibrated and not ranges:
        raise ValueError(f"quantization method {name!r} needs activation ranges from a calibration split")
    skip = []
    if method.fits:
        skeleton = _skeleton(folder, model_cfg)
        unfit = unfit_layers(name, skeleton)
        # A skip list replaces transformers' default one (the output head): name the head too.
        skip = sorted(unfit) + output_heads(skeleton) if unfit else []
    config = _load_time_config(name, skip)
    if config is not None:
        return load_causal_lm(folder, model_cfg, quantization_config=config, dtype=torch.float32).eval()
    model = load_causal_lm(folder, model_cfg, dtype=torch.float32).eval()
    return _apply_in_place(name, model, ranges or {})


def _load_time_config(name: str, skip: list[str] | None = None):
    """The ``from_pretrained`` quantization config of a saving method (None for in-process methods); ``skip``
    names linear layers to leave in full precision."""
    skip = skip or []
    if name == "int8_weight_only":
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        return TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=skip or None)
    if name == "int8_weight_only_asym":
        from torchao.quantization import IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerAxis
        from torchao.quantization.quant_primitives import MappingType
        from transformers import TorchAoConfig

        return TorchAoConfig(IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0),
                                                  mapping_type=MappingType.ASYMMETRIC), modules_to_not_convert=skip or None)
    if name == "int4_weight_only":
        from torchao.quantization import Int4WeightOnlyConfig
        from transformers import TorchAoConfig

        return TorchAoConfig(Int4WeightOnlyConfig(group_size=128), modules_to_not_convert=skip or None)
    if name in ("bnb_int8", "bnb_nf4"):
        import re

        from transformers import BitsAndBytesConfig

        # Names are matched as regular expressions from the start of a module's name: escape them.
        kept = [re.escape(fqn) for fqn in skip] or None
        if name == "bnb_int8":
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=kept)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                  llm_int8_skip_modules=kept)
    return None


def _apply_in_place(name: str, model: torch.nn.Module, ranges: dict) -> torch.nn.Module:
    """Quantize the linear layers of an fp32 ``model`` by ``name`` in place (also used on the probe); layers
    the method's kernel cannot take (:func:`unfit_layers`) stay in full precision."""
    unfit = unfit_layers(name, model)
    targets = {fqn: m for fqn, m in linear_modules(model).items() if fqn not in unfit}
    if name in ("int8_static", "int8_static_asym"):
        from torchao.quantization import FqnToConfig, quantize_

        per_layer = {fqn: static_config(*ranges[fqn], symmetric=name == "int8_static") for fqn in targets if fqn in ranges}
        quantize_(model, FqnToConfig(per_layer), filter_fn=None)  # layers not in the map stay fp32
        return model
    if name == "int8_dynamic":
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    if name in HALF:
        return model.to(HALF[name])
    if name in INTX:
        from torchao.quantization import quantize_

        quantize_(model, intx_config(name), filter_fn=lambda module, fqn: fqn in targets)
        return model
    config = _load_time_config(name)
    if name.startswith("bnb_"):
        return _bnb_in_place(model, config, targets)
    from torchao.quantization import quantize_

    quantize_(model, config.quant_type, filter_fn=lambda module, fqn: fqn in targets)
    return model


def intx_config(name: str):
    """torchao's config of an intx method: the PTQ config, and the base config of its QAT fake quantizers."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    if name not in INTX:
        raise ValueError(f"{name!r} is not a QAT-capable method; those are {sorted(INTX)}")
    bits, activations = INTX[name]
    dtype = {8: torch.int8, 4: torch.int4, 2: torch.int2}[bits]
    if not activations:
        return IntxWeightOnlyConfig(weight_dtype=dtype, granularity=PerAxis(0))
    return Int8DynamicActivationIntxWeightConfig(weight_dtype=dtype, weight_granularity=PerGroup(INTX_GROUP))


def qat_targets(name: str, model: torch.nn.Module) -> set[str]:
    """The linear layers method ``name`` quantizes in ``model`` (the others stay fp32, :func:`unfit_layers`)."""
    unfit = unfit_layers(name, model)
    return {fqn for fqn in linear_modules(model) if fqn not in unfit}


def prepare_qat(name: str, model: torch.nn.Module) -> torch.nn.Module:
    """Fake quantizers of method ``name`` in ``model``'s linear layers, in place: the forward pass computes
    with rounded weights (and activations), gradients pass straight through to the fp32 weights."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    targets = qat_targets(name, model)
    quantize_(model, QATConfig(intx_config(name), step="prepare"), filter_fn=lambda module, fqn: fqn in targets)
    return model


def convert_qat(name: str, model: torch.nn.Module) -> torch.nn.Module:
    """The fake-quantized ``model`` converted in place to method ``name``'s quantized tensors (the same numerics)."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    targets = qat_targets(name, model)
    quantize_(model, QATConfig(intx_config(name), step="convert"), filter_fn=lambda module, fqn: fqn in targets)
    return model


def _bnb_in_place(model: torch.nn.Module, config, targets: dict[str, torch.nn.Module]) -> torch.nn.Module:
    """bitsandbytes layers in place of the ``targets`` linear ones (the capability probe's path; the stage
    loads through ``from_pretrained`` instead)."""
    import bitsandbytes as bnb

    for fqn, module in targets.items():
        parent_name, _, child = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if config.load_in_8bit:
            new = bnb.nn.Linear8bitLt(module.in_features, module.out_features, module.bias is not None,
                                      has_fp16_weights=False)
            new.weight = bnb.nn.Int8Params(module.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
        else:
            new = bnb.nn.Linear4bit(module.in_features, module.out_features, module.bias is not None,
                                    compute_dtype=torch.float32, quant_type=config.bnb_4bit_quant_type)
            new.weight = bnb.nn.Params4bit(module.weight.data.clone(), requires_grad=False,
                                           quant_type=config.bnb_4bit_quant_type)
        if module.bias is not None:
            new.bias = torch.nn.Parameter(module.bias.data.clone(), requires_grad=False)
        setattr(parent, child, new.to("cpu"))
    return model


def static_config(high: torch.Tensor, low: torch.Tensor, ndim: int = 3, symmetric: bool = True):
    """torchao's static int8 config for one layer from its calibrated input range and its input's rank
    (3-D batch x tokens x features in most decoders; 2-D where a decoder flattens tokens before its MLP).

    Symmetric (absmax): scale = max(|low|, |high|) / 127, zero point 0. Asymmetric: scale = (high - low) /
    255 and the zero point that maps ``low`` to -128, so the int8 codes span exactly the observed range.
    """
    from torchao.quantization import Int8StaticActivationInt8WeightConfig
    from torchao.quantization.granularity import PerRow, PerTensor
    from torchao.quantization.quant_primitives import MappingType

    high, low = float(high), float(low)
    if symmetric:
        scale = max(abs(high), abs(low), 1e-8) / 127.0
        zero_point = None
        mapping = MappingType.SYMMETRIC
    else:
        low, high = min(low, 0.0), max(high, 0.0)  # the range must hold 0 exactly (padding, ReLU zeros)
        scale = max(high - low, 1e-8) / 255.0
        zero_point = torch.full((1,) * ndim, int(round(-128 - low / scale)), dtype=torch.int8)
        mapping = MappingType.ASYMMETRIC
    # Scales have the activation's rank: one value for the whole tensor.
    return Int8StaticActivationInt8WeightConfig(act_quant_scale=torch.full((1,) * ndim, scale),
                                                act_quant_zero_point=zero_point,
                                                granularity=[PerTensor(), PerRow()], act_mapping_type=mapping)


# ------------------------------------------------------------------------------------------ calibration
class RangeObserver:
    """Forward pre-hooks on every linear layer that record the max and min of its inputs."""

    def __init__(self, model: torch.nn.Module):
        self.ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.handles = [module.register_forward_pre_hook(self._hook(fqn))
                        for fqn, module in linear_modules(model).items()]

    def _hook(self, fqn: str) -> Callable:
        def record(module, args):
            x = args[0].detach()
            high, low = x.max(), x.min()
            if fqn in self.ranges:
                high, low = torch.maximum(high, self.ranges[fqn][0]), torch.minimum(low, self.ranges[fqn][1])
            self.ranges[fqn] = (high, low, x.ndim)  # the rank the activation scale must have (2-D or 3-D)
        return record

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


# ------------------------------------------------------------------------------------------------ sizes
def tensor_bytes(t) -> int:
    """Bytes a tensor holds, looking inside tensor subclasses (torchao stores int8 data plus scales in
    one subclass tensor; bitsandbytes keeps its scales beside the packed data)."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names if getattr(t, n, None) is not None)
    if t.is_quantized:
        extra = t.q_per_channel_scales().numel() * 12 if t.qscheme() in (torch.per_channel_affine,
                                                                           torch.per_channel_symmetric) else 12
        return t.int_repr().numel() * t.element_size() + extra
    total = t.numel() * t.element_size()
    state = getattr(t, "quant_state", None)  # bitsandbytes 4-bit: absmax per block, code book, ...
    if state is not None:
        total += sum(tensor_bytes(v) for v in state.as_dict(packed=False).values() if isinstance(v, torch.Tensor))
    scb = getattr(t, "SCB", None)  # bitsandbytes 8-bit: one scale per row
    if isinstance(scb, torch.Tensor):
        total += tensor_bytes(scb)
    return total


def module_weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of a layer's weight (and its quantization metadata), whatever the method made of it."""
    if callable(getattr(module, "weight", None)):  # torch's dynamic quantized Linear: weight() unpacks a qint8 tensor
        return tensor_bytes(module.weight())
    return tensor_bytes(module.weight)


def model_bytes(model: torch.nn.Module) -> dict[str, int]:
    """``{"memory": every parameter and buffer, "linear": the linear layers' weights}`` in bytes, counted
    once per storage (tied embeddings once)."""
    seen: set[int] = set()
    memory = 0
    for t in [*model.parameters(), *model.buffers()]:
        key = id(t)
        if key in seen:
            continue
        seen.add(key)
        memory += tensor_bytes(t)
    linear = 0
    for module in quantized_linear_modules(model).values():
        size = module_weight_bytes(module)
        linear += size
        if callable(getattr(module, "weight", None)):
            memory += size  # packed weights are neither parameters nor buffers
    return {"memory": memory, "linear": linear}


def quantized_linear_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The linear layers, whether still fp32, wrapped by a library, or swapped for a quantized module."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out = {}
    for fqn, module in model.named_modules():
        if module is head or fqn.split(".")[-1] in ("lm_head", "embed_out"):
            continue
        # torch.nn.Linear, torch's dynamic quantized Linear, bitsandbytes' layers, GPT-2's Conv1D
        if type(module).__name__ in ("Linear", "Linear8bitLt", "Linear4bit", "Conv1D"):
            out[fqn] = module
    return out


def folder_bytes(folder: str | Path) -> int:
    """Bytes of the weight files in a saved model folder."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))

