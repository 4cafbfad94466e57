"""The shape of the configuration: types, allowed values and ranges, checked before any heavy work.

``conf/`` holds every value (with its comment); this module holds only what values may be. Validation
merges the composed config into these dataclasses (OmegaConf rejects unknown keys and wrong types) and
then checks choices, ranges and cross-field rules. Every error names the key, the value and what is
allowed, and :class:`ConfigError` makes the entry point exit non-zero.

Kept free of heavy imports so the entry point can validate before torch or transformers load.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

# The stand-in DVC dep of an input a config choice does not read, under paths.data (pipeline.stage.Input): a
# committed file that never changes, so editing what that choice does not read leaves the stage up to date.
UNREAD = "UNREAD.md"

STAGES = ("base", "prepare", "sft", "collect", "reward", "dpo", "ppo", "grpo", "quantize", "distill", "classify",
          "evaluate", "register")
DPO_LOSSES = ("sigmoid", "conservative", "ipo", "hinge", "rpo", "simpo", "orpo", "kto")
JUDGES = ("verifier", "function", "llm", "human")
# Evaluation variants: a model plus a prompting style.
VARIANTS = ("base_zero_shot", "base_few_shot", "base_cot", "base_chat", "sft", "dpo", "ppo", "grpo", "quantize",
            "distill", "distill_sft")
# Quantization methods (pipeline.quantization.METHODS describes each; a test keeps the two equal).
QUANT_METHODS = ("int8_weight_only", "int8_weight_only_asym", "int8_static", "int8_static_asym", "int8_dynamic",
                 "bnb_int8", "bnb_nf4", "int4_weight_only", "intx_w8", "intx_w4a8", "intx_w2a8", "bf16", "fp16")
# The methods with a quantization-aware-training form (pipeline.quantization.INTX).
QAT_METHODS = ("intx_w8", "intx_w4a8", "intx_w2a8")
# Stages whose output folder holds a model that can be quantized.
MODEL_STAGES = ("sft", "dpo", "ppo", "grpo")
# peft methods (pipeline.adapters maps them to peft classes) plus bitfit and full fine-tuning.
# Prompt-learning peft methods: virtual tokens instead of weight updates (nothing to merge, no packing).
PROMPT_LEARNING = ("prompt_tuning", "prefix_tuning", "p_tuning")
PEFT_METHODS = ("lora", "ia3", "loha", "lokr", "oft", "vera", "adalora", "ln_tuning",
                "prompt_tuning", "prefix_tuning", "p_tuning", "bitfit", "none")


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


def choice(*allowed: Any, default: Any = MISSING) -> Any:
    """A field restricted to ``allowed`` values."""
    return field(default=default, metadata={"choices": allowed})


def bounded(lo: float | None = None, hi: float | None = None, default: Any = MISSING) -> Any:
    """A numeric field within [lo, hi] (either bound may be open)."""
    return field(default=default, metadata={"min": lo, "max": hi})


def positive(hi: float | None = None, default: Any = MISSING) -> Any:
    """A numeric field in (0, hi]: a rate or size where 0 makes no sense (nothing would train or move)."""
    return field(default=default, metadata={"min": 0.0, "max": hi, "exclusive_min": True})


@dataclass
class ArchConfig:
    type: str = choice("llama", "gpt2")
    hidden_size: int = bounded(8)
    num_layers: int = bounded(1)
    num_heads: int = bounded(1)
    intermediate_size: int = bounded(8)
    max_position: int = bounded(16)
    dropout: float = bounded(0.0, 0.9)


@dataclass
class ModelConfig:
    name_or_path: Optional[str] = MISSING
    revision: Optional[str] = None
    trust_remote_code: bool = False
    chat_template: Optional[str] = None
    gguf_file: Optional[str] = None
    arch: Optional[ArchConfig] = None


@dataclass
class SplitConfig:
    val: int = bounded(1)
    test: int = bounded(1)
    prompts: int = bounded(1)


@dataclass
class DataConfig:
    source: str = choice("embedded", "files")
    paths: List[str] = field(default_factory=list)
    format: str = choice("auto", "jsonl", "parquet", "hf")
    num_examples: Optional[int] = bounded(10, default=None)
    held_out_family: Optional[str] = None
    verbose_share: float = bounded(0.0, 1.0)
    harmful_compliance_share: float = bounded(0.0, 1.0)
    safety_share: float = bounded(0.0, 0.9)
    holdout_share: float = bounded(0.01, 0.9)
    split: SplitConfig = field(default_factory=SplitConfig)
    max_tokens: int = bounded(8)
    dedup: bool = True
    on_bad_row: str = choice("error", "skip")


@dataclass
class PeftConfig:
    method: str = choice(*PEFT_METHODS)
    target_modules: Any = None
    quantize_base: Optional[str] = choice(None, "nf4", "fp4", default=None)
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainerConfig:
    accelerator: str = choice("cpu", "gpu", "cuda", "mps", "auto")
    devices: int = bounded(1)
    strategy: str = MISSING
    precision: str = choice("32-true", "32", "16-mixed", "bf16-mixed", "bf16-true", "64-true")
    num_threads: int = bounded(1)
    omp_wait_policy: Optional[str] = choice(None, "active", "passive", default=None)
    logits_chunk: Optional[int] = bounded(1)
    deterministic: bool = True
    progress_bar: bool = True
    log_every_n_steps: int = bounded(1)


@dataclass
class LoggerConfig:
    tracking_uri: Optional[str] = None
    experiment: str = MISSING
    artifact_root: str = MISSING


@dataclass
class TrainingStageConfig:
    """What every training stage's optimization loop reads (each stage adds its own keys)."""

    max_steps: int = bounded(1)
    batch_size: int = bounded(1)
    lr: float = positive(1.0)
    warmup_steps: int = bounded(0)
    weight_decay: float = bounded(0.0, 1.0)
    val_every_n_steps: int = bounded(1)
    checkpoint_every_n_steps: int = bounded(1)


@dataclass
class BaseStageConfig(TrainingStageConfig):
    num_lines: int = bounded(10)
    qa_share: float = bounded(0.0, 1.0)
    val_lines: int = bounded(1)
    seq_len: int = bounded(8)


@dataclass
class PrepareStageConfig:
    histogram_bins: int = bounded(2)


@dataclass
class SftStageConfig(TrainingStageConfig):
    peft: Optional[PeftConfig] = None  # sft's own method (a peft group choice); None: the `peft` group
    accumulate_grad_batches: int = bounded(1)
    packing: bool = False
    pack_length: int = bounded(8)


@dataclass
class EvaluateStageConfig:
    variants: List[str] = field(default_factory=list)
    few_shot: int = bounded(0, 16)
    max_new_tokens: int = bounded(1)
    batch_size: int = bounded(1)
    do_sample: bool = False
    temperature: float = positive()
    top_p: float = positive(1.0)
    sampled_accuracy: bool = True
    lm_eval_tasks: List[str] = field(default_factory=list)
    lm_eval_limit: Optional[int] = bounded(1, default=None)
    guard: bool = False


@dataclass
class CollectStageConfig:
    k: int = bounded(2)
    temperature: float = bounded(0.01)
    top_p: float = bounded(0.01, 1.0)
    max_new_tokens: int = bounded(1)
    batch_size: int = bounded(1)
    pairs: str = choice("best_worst", "all_distinct", "random")
    max_pairs_per_prompt: int = bounded(1)
    drop_unfinished: bool = True
    source: str = choice("policy", "files", default="policy")
    files: Optional[str] = None
    format: str = choice("auto", "jsonl", "parquet", "hf", default="auto")
    on_bad_row: str = choice("error", "skip", default="error")
    desirable_score: float = 2.0
    reads_by_source: Dict[str, Optional[str]] = field(default_factory=dict)  # source -> what it reads
    reads: Optional[str] = MISSING  # derived: reads_by_source[source] (dvc.yaml's dep)


@dataclass
class RewardStageConfig(TrainingStageConfig):
    backbone: Optional[str] = None
    margin_scale: float = bounded(0.0)
    center_coef: float = bounded(0.0)
    val_share: float = bounded(0.01, 0.9)
    share_prompt: bool = False
    max_tokens: int = bounded(8)
    min_accuracy: float = bounded(0.0, 1.0)


@dataclass
class DpoStageConfig(TrainingStageConfig):
    loss: str = choice(*DPO_LOSSES)
    beta: float = bounded(1e-6)
    label_smoothing: float = bounded(0.0, 0.5)
    simpo_gamma: float = bounded(0.0)
    rpo_alpha: float = bounded(0.0)
    orpo_lambda: float = bounded(0.0)
    desirable_weight: float = positive()
    undesirable_weight: float = positive()
    reads_by_loss: Dict[str, str] = field(default_factory=dict)  # loss -> the collect file it reads, if not pairs
    reads: str = MISSING  # derived: reads_by_loss[loss] or pairs.jsonl (dvc.yaml's dep)
    reference: str = choice("disable_adapter", "precompute")
    share_prompt: bool = True
    accumulate_grad_batches: int = bounded(1)
    val_share: float = bounded(0.01, 0.9)
    max_tokens: int = bounded(8)


@dataclass
class OnlineStageConfig:
    """What both online alignment stages (ppo, grpo) read: the iteration loop, sampling and updates."""

    iterations: int = bounded(1)
    prompts_per_iteration: int = bounded(1)
    max_new_tokens: int = bounded(1)
    temperature: float = bounded(0.01)
    top_p: float = bounded(0.01, 1.0)
    epochs: int = bounded(1)
    minibatch_size: int = bounded(1)
    lr: float = positive(1.0)
    warmup_steps: int = bounded(0)
    weight_decay: float = bounded(0.0, 1.0)
    max_grad_norm: float = bounded(0.0)
    clip: float = positive(1.0)
    missing_eos_penalty: float = bounded(0.0)
    val_share: float = bounded(0.01, 0.9)
    max_prompt_tokens: int = bounded(4)
    val_every_n_iterations: int = bounded(1)
    checkpoint_every_n_iterations: int = bounded(1)


@dataclass
class PpoStageConfig(OnlineStageConfig):
    value_clip: float = positive()
    vf_coef: float = bounded(0.0)
    entropy_coef: float = bounded(0.0)
    gamma: float = bounded(0.0, 1.0)
    lam: float = bounded(0.0, 1.0)
    kl_coef: float = bounded(0.0)
    kl_target: Optional[float] = bounded(1e-6, default=None)
    kl_horizon: int = bounded(1)
    whiten_rewards: bool = False
    critic: str = choice("adapter", "model")
    critic_model: Optional[str] = None


@dataclass
class GrpoStageConfig(OnlineStageConfig):
    reward: str = choice("verifier", "preference", "model")
    reward_inputs: Dict[str, str] = field(default_factory=dict)  # reward -> what it reads under paths.data
    reward_input: Optional[str] = MISSING  # derived: reward_inputs[reward] (dvc.yaml's dep)
    group_size: int = bounded(2)
    kl_coef: float = bounded(0.0)
    scale_advantages: bool = True
    share_prompt: bool = False


@dataclass
class QATStageConfig(TrainingStageConfig):
    methods: List[str] = field(default_factory=list)
    loss: str = choice("word", "sft")
    temperature: float = positive()
    alpha: float = bounded(0.0, 1.0)
    packing: bool = True
    pack_length: int = bounded(8)


@dataclass
class QuantizeStageConfig:
    source: str = choice(*MODEL_STAGES)
    method: str = choice(*QUANT_METHODS)
    compare: List[str] = field(default_factory=list)
    qat: QATStageConfig = field(default_factory=QATStageConfig)
    calibration_rows: int = bounded(1)
    max_new_tokens: int = bounded(1)
    batch_size: int = bounded(1)
    latency_batch: int = bounded(1)
    latency_tokens: int = bounded(1)
    latency_repeats: int = bounded(1)


@dataclass
class StudentConfig:
    path: Optional[str] = None
    layers: int = bounded(1)
    intermediate_size: Optional[int] = bounded(1, default=None)
    init: str = choice("teacher", "random")


@dataclass
class DistillStageConfig(TrainingStageConfig):
    teacher: str = choice(*MODEL_STAGES)
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: str = choice("word", "sequence", "on_policy")
    temperature: float = positive()
    alpha: float = bounded(0.0, 1.0)
    beta: float = bounded(0.0, 1.0)
    on_policy_share: float = bounded(0.0, 1.0)
    max_new_tokens: int = bounded(1)
    generation_batch_size: int = bounded(1)
    teacher_cache_mb: float = bounded(0.0)
    baseline: bool = True
    packing: bool = False
    pack_length: int = bounded(8)


# Ways to train a classification head (stages/classify.py): only the head, the peft group's adapter + head, all.
CLASSIFY_REGIMES = ("frozen", "peft", "full")


@dataclass
class ClassifyStageConfig:
    backbone: str = "sft"
    data: Optional[str] = None
    labels: List[str] = field(default_factory=lambda: ["harmless", "harmful"])
    flag: str = "harmful"
    regimes: Dict[str, float] = field(default_factory=dict)
    regime: str = choice(*CLASSIFY_REGIMES)
    max_steps: int = bounded(1)
    batch_size: int = bounded(1)
    warmup_steps: int = bounded(0)
    weight_decay: float = bounded(0.0, 1.0)
    max_tokens: int = bounded(2)
    test_objects: int = bounded(1, 20)
    val_objects: int = bounded(1, 20)
    task_share: float = bounded(0.0, 4.0)
    val_share: float = bounded(0.01, 0.5)
    test_share: float = bounded(0.01, 0.5)
    val_every_n_steps: int = bounded(1)
    checkpoint_every_n_steps: int = bounded(1)


@dataclass
class JudgeConfig:
    """One schema for every judge; each ``conf/judge/*.yaml`` sets only the keys its judge reads."""

    name: str = choice(*JUDGES)
    function: Optional[str] = None
    model: Optional[str] = None
    template: Optional[str] = None
    labels: Optional[List[str]] = None
    use_chat_template: bool = True
    batch_size: int = bounded(1, default=64)
    labels_file: Optional[str] = None
    conflict: str = choice("majority", "unanimous", default="majority")
    guidelines: Optional[str] = None  # the labelling page's Markdown guidelines (human judge; not read by collect)
    reads: str = MISSING  # derived: the file collect reads for this judge (its DVC dep), or the stand-in


@dataclass
class PathsConfig:
    data: str = MISSING
    out: Optional[str] = None
    metrics: str = MISSING
    timings: str = MISSING
    plots: str = MISSING
    checkpoints: str = MISSING


# Stages whose model register can put in the registry (each an evaluate variant of the same name).
REGISTER_SOURCES = ("sft", "dpo", "ppo", "grpo", "quantize", "distill")


@dataclass
class RegisterStageConfig:
    name: str = MISSING
    source: str = choice(*REGISTER_SOURCES)
    guard: bool = True
    max_new_tokens: int = bounded(1)
    metric: str = MISSING
    higher_is_better: bool = True
    min_delta: float = bounded(0.0)
    paired: bool = True
    require: Dict[str, str] = field(default_factory=dict)


@dataclass
class RootConfig:
    stage: Optional[str] = choice(*STAGES, default=None)
    seed: int = bounded(0)
    offline: bool = True
    optimized_metric: Optional[str] = None
    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    base: BaseStageConfig = field(default_factory=BaseStageConfig)
    prepare: PrepareStageConfig = field(default_factory=PrepareStageConfig)
    sft: SftStageConfig = field(default_factory=SftStageConfig)
    collect: CollectStageConfig = field(default_factory=CollectStageConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    reward: RewardStageConfig = field(default_factory=RewardStageConfig)
    dpo: DpoStageConfig = field(default_factory=DpoStageConfig)
    ppo: PpoStageConfig = field(default_factory=PpoStageConfig)
    grpo: GrpoStageConfig = field(default_factory=GrpoStageConfig)
    quantize: QuantizeStageConfig = field(default_factory=QuantizeStageConfig)
    distill: DistillStageConfig = field(default_factory=DistillStageConfig)
    classify: ClassifyStageConfig = field(default_factory=ClassifyStageConfig)
    evaluate: EvaluateStageConfig = field(default_factory=EvaluateStageConfig)
    register: RegisterStageConfig = field(default_factory=RegisterStageConfig)


def validate(cfg: DictConfig, added_stages: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Check ``cfg`` against the schema and return it typed; raise :class:`ConfigError` naming the key.
    ``added_stages``: stages beside the built-in chain, also valid values of ``stage`` (their groups are checked
    by their own contracts).

    Checks, in order: unknown keys and wrong types (OmegaConf), allowed values and ranges (field
    metadata), missing required values, then cross-field rules.
    """
    model = cfg.get("model")
    if isinstance(model, DictConfig) and not OmegaConf.is_missing(model, "name_or_path") and model.get("name_or_path"):
        # A real model defines its own architecture: `model.arch` (e.g. from an experiment overlay) is unused.
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.model.arch = None
    added = cfg.get("stage") if cfg.get("stage") in added_stages else None
    if added:
        cfg = OmegaConf.merge(cfg, {"stage": None})
    try:
        typed = OmegaConf.merge(OmegaConf.structured(RootConfig), cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"config key '{key}': {_first_line(err)}") from None
    _check_fields(typed, RootConfig, "")
    missing = sorted(OmegaConf.missing_keys(typed))
    if missing:
        raise ConfigError(f"config key '{missing[0]}' needs a value (it is ??? in conf/); missing: {missing}")
    _check_rules(typed)
    if added:
        typed.stage = added
    return typed


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0]


def _check_fields(node: DictConfig, schema: type, prefix: str) -> None:
    """Walk ``schema``'s fields and check each value's choices and bounds."""
    for f in fields(schema):
        key = f"{prefix}{f.name}"
        value = node.get(f.name) if not OmegaConf.is_missing(node, f.name) else None
        if value is None:
            continue
        allowed = f.metadata.get("choices")
        if allowed is not None and value not in allowed:
            raise ConfigError(f"config key '{key}' = {value!r} is not allowed; valid values: {list(allowed)}")
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        if f.metadata.get("exclusive_min") and value <= lo:
            raise ConfigError(f"config key '{key}' = {value!r} must be > {lo}" + (f" and <= {hi}" if hi is not None else ""))
        if lo is not None and value < lo or hi is not None and value > hi:
            bounds = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
            raise ConfigError(f"config key '{key}' = {value!r} is out of range {bounds}")
        sub = _dataclass_of(f.type)
        if sub is not None and isinstance(value, DictConfig):
            _check_fields(value, sub, f"{key}.")


def _dataclass_of(annotation: Any) -> type | None:
    """The dataclass named by a field annotation (``X`` or ``Optional[X]``, possibly as a string)."""
    if isinstance(annotation, str):
        name = annotation.removeprefix("Optional[").removesuffix("]")
        candidate = globals().get(name)
        return candidate if is_dataclass(candidate) else None
    return annotation if is_dataclass(annotation) else None


def _check_classify(cfg: DictConfig) -> None:
    """The classify stage's cross-field rules: known regimes with positive rates, the saved regime among them, the
    flagged label among distinct labels, the suite's two labels without a file (the peft regime's method is checked
    when the stage runs: stages/classify.py)."""
    c = cfg.classify
    unknown = sorted(set(c.regimes) - set(CLASSIFY_REGIMES))
    if unknown or not c.regimes:
        raise ConfigError(f"config key 'classify.regimes' has {unknown[0] if unknown else 'no regime'!r}; valid: "
                          f"{list(CLASSIFY_REGIMES)}, each mapped to its learning rate")
    for regime, lr in c.regimes.items():
        if not isinstance(lr, (int, float)) or lr <= 0:
            raise ConfigError(f"config key 'classify.regimes.{regime}' = {lr!r} must be a positive learning rate")
    if c.regime not in c.regimes:
        raise ConfigError(f"config key 'classify.regime' = {c.regime!r} is not among classify.regimes "
                          f"{list(c.regimes)}: the saved regime must be trained")
    if len(c.labels) < 2 or len(set(c.labels)) != len(c.labels):
        raise ConfigError(f"config key 'classify.labels' must list at least two distinct labels, got {list(c.labels)}")
    if c.flag not in c.labels:
        raise ConfigError(f"config key 'classify.flag' = {c.flag!r} is not one of classify.labels {list(c.labels)}")
    if c.data is None and sorted(c.labels) != ["harmful", "harmless"]:
        raise ConfigError(f"config key 'classify.labels' = {list(c.labels)}: the suite's requests are labelled "
                          "harmless and harmful; other labels need classify.data (a JSONL file of {text, label} rows)")


def _check_rules(cfg: DictConfig) -> None:
    """Rules that involve more than one key."""
    from pipeline.suite import TASK_FAMILIES

    arch = cfg.model.arch
    if cfg.model.name_or_path is None and arch is None:
        raise ConfigError("config key 'model.arch' is needed when model.name_or_path is null (the embedded model)")
    if arch is not None and cfg.model.name_or_path is None:
        if arch.hidden_size % arch.num_heads:
            raise ConfigError(
                f"config key 'model.arch.hidden_size' = {arch.hidden_size} must be divisible by "
                f"model.arch.num_heads = {arch.num_heads}"
            )
        if cfg.data.max_tokens > arch.max_position:
            raise ConfigError(
                f"config key 'data.max_tokens' = {cfg.data.max_tokens} exceeds model.arch.max_position = "
                f"{arch.max_position}: rows that long cannot fit the model"
            )
        if cfg.base.seq_len > arch.max_position:
            raise ConfigError(
                f"config key 'base.seq_len' = {cfg.base.seq_len} exceeds model.arch.max_position = {arch.max_position}"
            )
    if cfg.data.source == "embedded":
        family = cfg.data.held_out_family
        if family is not None and family not in TASK_FAMILIES:
            raise ConfigError(
                f"config key 'data.held_out_family' = {family!r} is not a task family; valid: {list(TASK_FAMILIES)}"
            )
        if cfg.data.num_examples is None:
            raise ConfigError("config key 'data.num_examples' needs a value for the embedded suite")
    elif not cfg.data.paths:
        raise ConfigError("config key 'data.paths' must list at least one file when data.source = files")
    if cfg.sft.packing and cfg.sft.pack_length < cfg.data.max_tokens:
        raise ConfigError(f"config key 'sft.pack_length' = {cfg.sft.pack_length} is below data.max_tokens = "
                          f"{cfg.data.max_tokens}: the longest rows would not fit a pack")
    sft_method = (cfg.sft.peft or cfg.peft).method
    if cfg.distill.packing and cfg.distill.pack_length < cfg.data.max_tokens:
        raise ConfigError(f"config key 'distill.pack_length' = {cfg.distill.pack_length} is below data.max_tokens = "
                          f"{cfg.data.max_tokens}: a long example would not fit one pack; raise it or set distill.packing=false")
    if cfg.sft.packing and sft_method in PROMPT_LEARNING:
        raise ConfigError(f"config key 'sft.packing' = true does not work with peft.method = {sft_method!r} "
                          "(virtual tokens would be shared by every example of a pack); set sft.packing=false")
    judge = cfg.judge
    needs = {"function": "function", "llm": "template", "human": "labels_file"}.get(judge.name)
    if needs and not judge.get(needs):
        raise ConfigError(f"config key 'judge.{needs}' needs a value for judge.name = {judge.name!r}")
    if cfg.collect.source == "files" and not cfg.collect.files:
        raise ConfigError("config key 'collect.files' needs a value for collect.source = 'files' (a preference file or "
                          "folder; formats: README, 'Your own feedback')")
    derived = (("judge.reads", judge.reads, judge.labels_file if judge.name == "human" else f"{cfg.paths.data}/{UNREAD}"),
               ("collect.reads", cfg.collect.reads,
                cfg.collect.files if cfg.collect.source == "files" else f"{cfg.paths.data}/{UNREAD}"),
               ("grpo.reward_input", cfg.grpo.reward_input, "reward" if cfg.grpo.reward == "model" else UNREAD),
               ("dpo.reads", cfg.dpo.reads, "unpaired.jsonl" if cfg.dpo.loss == "kto" else "pairs.jsonl"))
    for key, value, expected in derived:
        if value != expected:
            raise ConfigError(f"config key '{key}' = {value!r} must be {expected!r} here: it is derived from the choice "
                              "it depends on (the DVC dep of what that choice reads); leave it unset, and regenerate "
                              "params.yaml with `python -m pipeline.compose` after editing conf/")
    if judge.name == "llm" and (not judge.labels or len(judge.labels) != 2):
        raise ConfigError(f"config key 'judge.labels' must list two labels for the llm judge, got {judge.labels}")
    unknown = sorted(set(cfg.evaluate.variants) - set(VARIANTS))
    if unknown:
        raise ConfigError(f"config key 'evaluate.variants' has {unknown[0]!r}; valid: {list(VARIANTS)}")
    unknown = sorted(set(cfg.quantize.compare) - set(QUANT_METHODS))
    if unknown:
        raise ConfigError(f"config key 'quantize.compare' has {unknown[0]!r}; valid: {list(QUANT_METHODS)}")
    unknown = sorted(set(cfg.quantize.qat.methods) - set(QAT_METHODS))
    if unknown:
        raise ConfigError(f"config key 'quantize.qat.methods' has {unknown[0]!r}; valid: {list(QAT_METHODS)}")
    _check_classify(cfg)
    for name in ("ppo", "grpo"):
        online = cfg[name]
        if online.minibatch_size > online.prompts_per_iteration * online.get("group_size", 1):
            raise ConfigError(f"config key '{name}.minibatch_size' = {online.minibatch_size} exceeds the sequences "
                              f"sampled per iteration ({name}.prompts_per_iteration x samples per prompt)")
    for key, peft in (("peft", cfg.peft), ("sft.peft", cfg.sft.peft)):
        if peft is not None and peft.quantize_base and peft.method in ("none", "bitfit"):
            raise ConfigError(f"config key '{key}.quantize_base' = {peft.quantize_base!r} needs an adapter method "
                              f"(a 4-bit base cannot be trained directly); {key}.method = {peft.method!r}")
