"""What the online alignment stages (``ppo``, ``grpo``) share: prompts in resumable order, sampling from
the policy, the token layout, per-token log-probs of policy and reference, reward functions, and one
``LightningModule`` skeleton on manual optimization whose checkpoints resume an RL run exactly.

One *iteration* = sample responses for a batch of prompts, score them, then several epochs of minibatch
updates on that batch. Lightning counts optimizer steps, so a run of N iterations is ``N x updates per
iteration`` trainer steps; the data position, the KL controller and the RNG states are restored from the
checkpoint, so a killed run continues with the batch and the random stream it would have had.

Token layout of a sampled batch: ``[left-padded prompt | response, right-padded]``. Every response starts
in the same column ``W``, so per-token tensors are plain slices ``[:, W:]`` of shape (rows, T), with
``mask`` = 1 on real response tokens (the end token included).
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import lightning as L
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, IterableDataset

from pipeline import rl, tokens
from pipeline.chat import InputError, read_prompts
from pipeline.generation import Generated, generate
from pipeline.judges import VerifierJudge, has_verifier, verifier_correct
from pipeline.models import render_ids
from pipeline.preferences import holdout_key
from pipeline.suite import bucket
from pipeline.tokens import padded_forward
from pipeline.training import (
    SAMPLES,
    StageModule,
    StepBatches,
    adamw_warmup_cosine,
    batches_loader,
    log_samples,
    rank_and_world,
)

if TYPE_CHECKING:
    from pipeline.stage import Stage

Tensor = torch.Tensor
# Checkpoints are taken after an iteration's updates, which is the state to resume from; Lightning's
# warning that a manual-optimization checkpoint holds the post-update state does not apply.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


# ------------------------------------------------------------------------------------------------- data
class PromptData(L.LightningDataModule):
    """Prompts of the ``prompts`` split: train prompts in resumable step order (batch k = iteration k's
    prompts), validation prompts (the same held-out share, by the same hash of the task instance, as the
    preference pairs': reward, DPO, PPO and GRPO validate on the same instances)."""

    def __init__(self, path: Path, tokenizer, seed: int, stage_cfg: DictConfig):
        super().__init__()
        self.path, self.tok, self.seed, self.c = path, tokenizer, seed, stage_cfg
        self.train_items: list[dict] = []
        self.val_items: list[dict] = []
        self.dropped = 0

    def setup(self, stage: str | None = None) -> None:
        if self.train_items:
            return
        for row in read_prompts(self.path):
            ids = render_ids(self.tok, row["messages"], add_generation_prompt=True)
            if len(ids) > self.c.max_prompt_tokens:
                self.dropped += 1
                continue
            key = holdout_key({**row, "prompt_id": row.get("id")})  # collect names a pair's prompt by the row id
            held_out = bucket(key, f"pairs:{self.seed}") < self.c.val_share
            (self.val_items if held_out else self.train_items).append({"row": row, "prompt": ids})
        if not self.train_items or not self.val_items:
            raise InputError(f"{self.path}: {len(self.train_items)} training and {len(self.val_items)} validation "
                             "prompts after the split; both need at least one")

    def train_dataloader(self) -> DataLoader:
        items = self.train_items
        steps = StepBatches(len(items), self.c.prompts_per_iteration, self.c.iterations, self.seed,
                            lambda idx: [items[i] for i in idx])
        return batches_loader(steps)

    def val_dataloader(self) -> DataLoader:
        return batches_loader(Shard(self.val_items, 64))


class Shard(IterableDataset):
    """This data-parallel process's share of the held-out items (items ``rank::world``: every item exactly
    once over all processes, where Lightning's distributed sampler would repeat some to even the shares), in
    batches. In one process: every item, in order."""

    def __init__(self, items: list[dict], batch_size: int):
        self.items, self.batch_size = items, batch_size

    def __iter__(self):
        rank, world = rank_and_world()
        mine = self.items[rank::world]
        for lo in range(0, len(mine), self.batch_size):
            yield mine[lo:lo + self.batch_size]


# ----------------------------------------------------------------------------------------------- rollout
@dataclass
class Rollout:
    """A sampled batch in the token layout of the module docstring."""

    rows: list[dict]           # the prompt row of each sequence
    texts: list[str]           # decoded responses
    input_ids: Tensor          # (n, W + T)
    attention_mask: Tensor     # (n, W + T)
    mask: Tensor               # (n, T) float: real response tokens
    finished: Tensor           # (n,) bool: ended with an end token
    width: int                 # W: the prompt columns

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, idx: Tensor) -> "Rollout":
        keep = idx.tolist()
        return Rollout([self.rows[i] for i in keep], [self.texts[i] for i in keep], self.input_ids[idx],
                       self.attention_mask[idx], self.mask[idx], self.finished[idx], self.width)


def build_rollout(rows: list[dict], prompts: list[list[int]], generated: list[Generated], pad_id: int) -> Rollout:
    """Lay prompts (left-padded) and responses (right-padded) out so every response starts in one column."""
    width = max(len(p) for p in prompts)
    length = max(1, max(len(g.ids) for g in generated))
    n = len(generated)
    ids = torch.full((n, width + length), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width + length), dtype=torch.long)
    for i, (p, g) in enumerate(zip(prompts, generated, strict=True)):
        ids[i, width - len(p):width] = torch.tensor(p, dtype=torch.long)
        attention[i, width - len(p):width] = 1
        if g.ids:
            ids[i, width:width + len(g.ids)] = torch.tensor(g.ids, dtype=torch.long)
            attention[i, width:width + len(g.ids)] = 1
    mask = attention[:, width:].float()
    finished = torch.tensor([g.finished for g in generated])
    return Rollout(rows, [g.text for g in generated], ids, attention, mask, finished, width)


def response_logits(model, roll: Rollout, group: int = 1) -> Tensor:
    """Logits (n, T, V) predicting each response token. ``group`` > 1: rows ``g*group .. g*group+group-1`` share
    one prompt (GRPO's samples of a prompt); each prompt then runs through the model once, its KV cache repeated
    for its ``group`` responses, and only the responses run per row (as ``dpo.share_prompt`` does for a pair's two
    responses; gradients flow back through the cache). Same values as one forward per row up to float rounding
    (a test checks it); a real model's chat prompt (SmolLM2's system turn) is most of each row's tokens."""
    width, steps = roll.width, roll.input_ids.shape[1] - roll.width
    heads = torch.arange(0, len(roll), group)
    prompts, prompt_mask = roll.input_ids[heads, :width], roll.attention_mask[heads, :width]
    shared = group > 1 and len(roll) % group == 0 and torch.equal(
        roll.input_ids[:, :width], prompts.repeat_interleave(group, 0))
    if not shared:
        return padded_forward(model, roll.input_ids, roll.attention_mask, use_cache=False,
                              logits_to_keep=steps + 1).logits[:, :-1]
    out = padded_forward(model, prompts, prompt_mask, use_cache=True, logits_to_keep=1)
    cache, first = out.past_key_values, out.logits[:, -1]
    cache.batch_repeat_interleave(group)
    lengths = prompt_mask.sum(-1).repeat_interleave(group)
    positions = lengths[:, None] + torch.arange(steps, device=lengths.device)[None]
    out = model(input_ids=roll.input_ids[:, width:], position_ids=positions, past_key_values=cache, use_cache=True,
                attention_mask=torch.cat([prompt_mask.repeat_interleave(group, 0), roll.attention_mask[:, width:]], 1))
    return torch.cat([first.repeat_interleave(group, 0)[:, None], out.logits[:, :-1]], 1)


def token_logps(model, roll: Rollout, with_entropy: bool = False, temperature: float = 1.0,
                group: int = 1) -> tuple[Tensor, Tensor | None]:
    """Per-token log-probs (n, T) of the responses under ``model`` (and the entropy of its next-token
    distribution at each response position), with the logits divided by the sampling ``temperature`` so
    that they are the log-probs of the distribution the responses were drawn from (as TRL's GRPO does).
    Plain log-softmax + gather in fp32: what trl's ``selective_log_softmax`` does, without importing trl
    (~10 s) into the stage. The LM head runs on the response positions only (``logits_to_keep``, as TRL's
    GRPO): the prompt's logits are never read, and on a real vocabulary (49,152 for SmolLM2) they are most
    of the forward's logits memory. ``group``: see :func:`response_logits`."""
    logits = response_logits(model, roll, group)
    logp, logp_all = tokens.token_logps(logits, roll.input_ids[:, roll.width:], temperature)
    logp = logp * roll.mask
    entropy = -(logp_all.exp() * logp_all).sum(-1) * roll.mask if with_entropy else None
    return logp, entropy


def has_adapter(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


@contextmanager
def active_adapter(model, name: str):
    """Run a peft model with adapter ``name`` active. peft's ``set_adapter`` freezes the other adapters;
    every adapter is made trainable again, so a policy and a critic adapter both train on one base."""
    previous = model.active_adapter
    model.set_adapter(name)
    model.set_requires_grad(list(model.peft_config), True)
    try:
        yield model
    finally:
        model.set_adapter(previous)
        model.set_requires_grad(list(model.peft_config), True)


class Reference:
    """The reference policy (the SFT model): the policy with its adapters switched off (no weight copy),
    or a frozen copy for full fine-tuning."""

    def __init__(self, policy, copy=None, temperature: float = 1.0):
        self.policy, self.copy, self.temperature = policy, copy, temperature
        if copy is None and not has_adapter(policy):
            raise ValueError("a reference needs an adapter on the policy or a frozen copy")

    @torch.no_grad()
    def logps(self, roll: Rollout, group: int = 1) -> Tensor:
        if self.copy is not None:
            return token_logps(self.copy, roll, temperature=self.temperature, group=group)[0]
        with self.policy.disable_adapter():
            return token_logps(self.policy, roll, temperature=self.temperature, group=group)[0]


# ------------------------------------------------------------------------------------------------ rewards
Scorer = Callable[[list[dict], list[str]], Tensor]


class model_reward:  # noqa: N801  (a scorer factory by name; a class so that DDP's spawned processes can pickle it)
    """Score responses with a loaded :class:`pipeline.rewards.RewardModel`, normalized by the mean and std
    its training pairs had (so a score of 1 = one training-pair spread above their mean)."""

    def __init__(self, reward_model, batch_size: int = 64):
        self.reward_model, self.batch_size = reward_model, batch_size

    @torch.no_grad()
    def __call__(self, rows: list[dict], texts: list[str]) -> Tensor:
        from pipeline.rewards import sequence_rewards
        from pipeline.tokens import left_pad

        tok = self.reward_model.tokenizer
        ids = [render_ids(tok, r["messages"] + [{"role": "assistant", "content": t}]) for r, t in zip(rows, texts, strict=True)]
        out = []
        for lo in range(0, len(ids), self.batch_size):
            input_ids, mask = left_pad(ids[lo:lo + self.batch_size], tok.pad_token_id)
            out.append(sequence_rewards(self.reward_model.model, input_ids, mask))
        return self.reward_model.normalize(torch.cat(out))


# grpo.reward: pass/fail verifiable rewards (no model, nothing to exploit but the task), or the verifier's full
# 0-3 preference score (correctness first, then no filler: the judge collect uses).
SCORERS = {"verifier": VerifierJudge(pass_fail=True).reward, "preference": VerifierJudge().reward}


# ------------------------------------------------------------------------------------------------ module
class OnlineModule(StageModule):
    """The iteration loop of online alignment on manual optimization. Subclasses implement
    :meth:`iteration` (the update on one sampled batch) and may add state to :meth:`extra_state`."""

    automatic_optimization = False

    def __init__(self, model, tokenizer, cfg: DictConfig, stage_cfg: DictConfig, scorer: Scorer,
                 reference: Reference, samples_per_prompt: int = 1):
        super().__init__()
        self.model, self.tok, self.c, self.seed = model, tokenizer, stage_cfg, cfg.seed
        self.scorer, self.reference, self.k = scorer, reference, samples_per_prompt
        sequences = stage_cfg.prompts_per_iteration * samples_per_prompt
        self.updates_per_iteration = stage_cfg.epochs * math.ceil(sequences / stage_cfg.minibatch_size)
        self._val: list[dict] = []

    # ---- resume
    @property
    def iteration(self) -> int:
        return self.trainer.global_step // self.updates_per_iteration

    def on_fit_start(self) -> None:
        self.model.train()

    def on_train_start(self) -> None:
        dataset = getattr(self.trainer.train_dataloader, "dataset", None)
        if isinstance(dataset, StepBatches):
            dataset.start = self.iteration

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["online_state"] = self.extra_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.load_extra_state(checkpoint.get("online_state", {}))

    # ---- sampling
    def sample(self, items: list[dict], seed: int, greedy: bool = False) -> Rollout:
        """Responses of the policy to ``items`` (``k`` each, prompt-major), laid out for training."""
        prompts = [it["prompt"] for it in items]
        generated, _ = generate(self.model, self.tok, prompts, self.c.max_new_tokens, batch_size=len(prompts),
                                do_sample=not greedy, temperature=self.c.temperature, top_p=self.c.top_p,
                                generator_seed=seed, samples_per_prompt=1 if greedy else self.k)
        k = 1 if greedy else self.k
        rows = [it["row"] for it in items for _ in range(k)]
        return build_rollout(rows, [p for p in prompts for _ in range(k)], generated, self.tok.pad_token_id)

    def scores(self, roll: Rollout) -> tuple[Tensor, Tensor]:
        """(raw reward, reward after the missing-end-token penalty) of each sequence."""
        raw = self.scorer(roll.rows, roll.texts).float()
        return raw, raw - self.c.missing_eos_penalty * (~roll.finished).float()

    # ---- optimization
    def training_step(self, items: list[dict], batch_idx: int) -> None:
        it = self.iteration
        rank, world = rank_and_world()  # each data-parallel process samples its own prompts with its own seed
        roll = self.sample(items, seed=self.seed * 1_000_003 + it * world + rank)
        metrics = self.iteration_update(roll)
        metrics.update({"response_length": float(roll.mask.sum(-1).mean()),
                        "unfinished_rate": float((~roll.finished).float().mean())})
        metrics = mean_over_processes(metrics)
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, on_step=True)
        self.history.append({"iteration": it + 1, **{f"train/{k}": round(float(v), 5) for k, v in metrics.items()}})

    def iteration_update(self, roll: Rollout) -> dict[str, float]:
        raise NotImplementedError

    def policy_logps(self, roll: Rollout, with_entropy: bool = False, group: int = 1) -> tuple[Tensor, Tensor | None]:
        """The policy's per-token log-probs of sampled responses, at the sampling temperature."""
        return token_logps(self.model, roll, with_entropy, self.c.temperature, group)

    def minibatches(self, n: int):
        """Index tensors of each update: ``epochs`` shuffled passes over the batch."""
        for _ in range(self.c.epochs):
            yield from torch.randperm(n).split(self.c.minibatch_size)

    def step(self, *terms: Tensor | Callable[[], Tensor]) -> None:
        """One optimizer step on the sum of the loss ``terms``: tensors, or functions that run a forward pass and
        return one. Each function's term is backpropagated before the next function runs, so the peak memory
        holds one pass's activations instead of all of them (PPO's policy pass and critic pass: ~1.4 GB each on
        SmolLM2 with 8 sequences of ~90 tokens). The gradient is the sum's: each term's backward adds into the
        same ``.grad`` before clipping and the step. Under DDP the terms go through one backward: DDP's reducer
        averages gradients once per backward and needs every trained parameter's gradient in it (a policy-only
        backward leaves the critic's missing), so there the peak holds both passes."""
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        optimizer.zero_grad()
        values = (term() if callable(term) else term for term in terms)
        if rl.world_size() > 1:
            self.manual_backward(sum(values))
        else:
            for value in values:
                self.manual_backward(value)
        if self.c.max_grad_norm:
            self.clip_gradients(optimizer, gradient_clip_val=self.c.max_grad_norm, gradient_clip_algorithm="norm")
        optimizer.step()
        scheduler.step()

    def configure_optimizers(self):
        total = self.c.iterations * self.updates_per_iteration
        return adamw_warmup_cosine(self, self.c.lr, self.c.weight_decay, self.c.warmup_steps, total)

    # ---- validation: greedy answers to held-out prompts
    def validation_step(self, items: list[dict], batch_idx: int) -> None:
        roll = self.sample(items, seed=self.seed, greedy=True)
        raw, _ = self.scores(roll)
        correct = [verifier_correct(r, t) for r, t in zip(roll.rows, roll.texts, strict=True) if has_verifier(r)]
        self._val.append({"reward": raw.sum().item(), "n": len(roll), "length": roll.mask.sum().item(),
                          "correct": sum(correct), "verified": len(correct)})

    def on_validation_epoch_end(self) -> None:
        totals = {k: sum(v[k] for v in self._val) for k in ("reward", "n", "length", "correct", "verified")}
        totals = sum_over_processes(totals)  # every process validated its own share of the held-out prompts
        n, verified = totals["n"], totals["verified"]
        metrics = {"val/reward": totals["reward"] / n, "val/response_length": totals["length"] / n}
        if verified:
            metrics["val/accuracy"] = totals["correct"] / verified
        self._val = []
        self.log_dict(metrics)
        if self.trainer.state.fn == "fit":
            self.history.append({"iteration": self.iteration, **metrics})


def sum_over_processes(values: dict[str, float]) -> dict[str, float]:
    """Each value summed over the data-parallel processes (the values themselves in one process)."""
    _, world = rank_and_world()
    if world == 1:
        return values
    import torch.distributed as dist

    total = torch.tensor(list(values.values()), dtype=torch.float64)
    dist.all_reduce(total)
    return dict(zip(values, total.tolist(), strict=True))


def mean_over_processes(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over the data-parallel processes. Every process holds as many rows, so this is the
    mean over all rows; token means (:func:`pipeline.rl.masked_mean`) are already each process's share of it
    times the world size."""
    _, world = rank_and_world()
    return values if world == 1 else {k: v / world for k, v in sum_over_processes(values).items()}


# -------------------------------------------------------------------------------------------------- stage
def run_stage(ctx, make_module: Callable, reward: str,
              save_extra: Callable[[OnlineModule, Path], None] | None = None) -> dict:
    """Run an online alignment stage (``ppo``, ``grpo``) under its contract; return its metrics.

    ``make_module(model, tokenizer, scorer, reference, adapter_config, load_copy)`` builds the stage's
    module; ``reward`` is ``model`` (the reward stage's model, gate checked first), ``verifier`` (pass/fail)
    or ``preference`` (the verifier's 0-3 preference score).
    """
    import copy
    import logging
    import time

    from pipeline import adapters
    from pipeline.models import load_causal_lm, load_tokenizer
    from pipeline.rewards import load_reward_model
    from pipeline.training import fit

    cfg, c, name = ctx.cfg, ctx.config, ctx.name
    log = logging.getLogger(f"stages.{name}")
    sft_dir, prompts_path = ctx.input("sft"), ctx.input("prepare")
    reward_model = None
    if reward == "model":  # first: a reward model that failed its gate stops the stage before any work
        reward_model = load_reward_model(ctx.input("reward"), cfg.model)
        if "reward" not in ctx.digests:  # a conditional input (grpo): recorded now that it is read
            ctx.digests["reward"] = ctx.run.add_input("reward", ctx.input("reward"))["digest"]
        ctx.run.set_tag("reward_model_accuracy", reward_model.accuracy)
    start = time.time()
    tokenizer = load_tokenizer(sft_dir, cfg.model)

    def load_copy(path: str | None = None, trainable: bool = False):
        """Another copy of a causal LM (default: the SFT model): trained through the peft group, or frozen."""
        copy = adapters.disable_dropout(load_causal_lm(path or sft_dir, cfg.model))
        if trainable:
            return adapters.disable_dropout(adapters.apply(copy, cfg.peft))
        return copy.eval().requires_grad_(False)

    has_adapters = cfg.peft.method not in ("none", "bitfit")
    model = adapters.load_policy(sft_dir, cfg, name)
    # The critic adapter (ppo) is configured like the policy's: a copy of the policy adapter's config.
    adapter_config = copy.deepcopy(model.peft_config["default"]) if has_adapters else None
    reference = Reference(model, None if has_adapters else load_copy(), temperature=c.temperature)
    scorer = model_reward(reward_model) if reward_model is not None else SCORERS[reward]
    datamodule = PromptData(prompts_path, tokenizer, cfg.seed, c)
    datamodule.setup()
    module = make_module(model, tokenizer, scorer, reference, adapter_config, load_copy)
    updates = module.updates_per_iteration
    result = fit(ctx, module, datamodule, c.iterations * updates, c.val_every_n_iterations,
                 c.checkpoint_every_n_iterations * updates)
    if has_adapter(model):
        model.set_adapter("default")
    adapters.save_trained(model, cfg.peft, ctx.output, str(sft_dir), cfg.model, str(sft_dir))
    held_out = datamodule.val_items[:SAMPLES]
    log_samples(ctx, model, tokenizer, [item["prompt"] for item in held_out],
                [item["row"]["meta"].get("gold") for item in held_out])
    tokenizer.save_pretrained(ctx.output)
    if save_extra is not None:
        save_extra(module, ctx.output)
    ctx.info.update(peft_method=cfg.peft.method, reward=reward)
    ctx.write_plot("iterations.json", [h for h in module.history if "train/reward" in h])
    ctx.write_plot("val.json", [h for h in module.history if "val/reward" in h])
    last = [h for h in module.history if "train/reward" in h][-1]
    final, before = result.after, result.before
    log.info("%s: held-out reward %.3f (before %s), accuracy %s", name, final["val/reward"],
             before and round(before["val/reward"], 3), final.get("val/accuracy"))
    return {**result.metrics(),
            **{k: round(v, 4) for k, v in last.items() if k.startswith("train/")},
            "train/prompts": len(datamodule.train_items), "val/prompts": len(datamodule.val_items),
            "train/world_size": result.trainer.world_size,  # data-parallel processes (trainer.devices with ddp)
            "train/seconds_per_iteration": round(result.seconds / max(1, c.iterations), 3),
            "train/seconds": round(time.time() - start, 1)}


def check_online(cfg: DictConfig) -> None:
    """Online alignment trains weight adapters or every weight, never virtual tokens."""
    from pipeline.schema import PROMPT_LEARNING, ConfigError

    if cfg.peft.method in PROMPT_LEARNING:
        raise ConfigError(f"config key 'peft.method' = {cfg.peft.method!r}: online alignment needs weight adapters "
                          "(lora, ia3, ...) or full fine-tuning; virtual tokens do not fit its token layout")


def online_stage(name: str, reward_always: bool, note: str = "") -> Stage:
    """The contract both online stages share: prompts and the SFT policy in, the aligned policy out."""
    from pipeline.models import LOAD_KEYS
    from pipeline.stage import Chart, Input, Plot, Stage
    from pipeline.training import TRAINER_KEYS

    return Stage(
        name=name,
        check=check_online,
        inputs=(Input("prepare", "prepare/prompts.jsonl", dataset=True), Input("sft", "sft"),
                Input("reward", "reward" if reward_always else f"${{{name}.reward_input}}", conditional=not reward_always,
                      note=note)),
        params=("peft", *LOAD_KEYS, *TRAINER_KEYS),
        plots=(Plot("iterations.json", x="iteration", y="train/reward", title=f"{name} mean reward per iteration"),
               Plot("val.json", x="iteration", y="val/reward", title=f"{name} held-out reward (greedy)")),
        charts=(Chart("KL to the SFT reference per iteration (ppo, grpo)", "linear", x="iteration",
                      y={"iterations.json": "train/kl"}),),
    )
