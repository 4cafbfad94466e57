"""Configuration: every config in conf/ composes and validates; errors name the key; params.yaml is conf/."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import ROOT, compose, subprocess_env
from pipeline.compose import compose as raw_compose
from pipeline.schema import ConfigError, validate

CONF = ROOT / "conf"
# Options whose required values (???) must be supplied to compose a runnable config.
REQUIRED = {("model", "hf"): ["model.name_or_path=some/model"], ("data", "files"): ["data.paths=[a.jsonl]"],
            ("peft", "prompt_tuning"): ["sft.packing=false"], ("peft", "prefix_tuning"): ["sft.packing=false"]}


def group_options():
    for group in sorted(p for p in CONF.iterdir() if p.is_dir()):
        for option in sorted(group.glob("*.yaml")):
            yield group.name, option.stem


@pytest.mark.parametrize(("group", "option"), list(group_options()))
def test_every_config_composes_and_validates(group, option):
    cfg = compose(f"{group}={option}", *REQUIRED.get((group, option), []))
    assert cfg.seed is not None
    if group == "hparams_search":  # a global overlay: it sets the metric and the sweeper's search space
        assert cfg.optimized_metric is not None
    elif group != "experiment":
        assert OmegaConf.select(cfg, group) is not None


def test_committed_params_yaml_equals_composition_of_conf():
    committed = OmegaConf.load(ROOT / "params.yaml")
    assert OmegaConf.to_container(committed) == OmegaConf.to_container(raw_compose([])), (
        "params.yaml is stale: run `python -m pipeline.compose`")


@pytest.mark.parametrize(("override", "message"), [
    ("data.on_bad_row=sometimes", "config key 'data.on_bad_row' = 'sometimes' is not allowed; valid values: ['error', 'skip']"),
    ("base.lr=-0.1", "config key 'base.lr' = -0.1 must be > 0.0 and <= 1.0"),
    ("sft.lr=0", "config key 'sft.lr' = 0.0 must be > 0.0"),       # nothing would train
    ("grpo.clip=0", "config key 'grpo.clip' = 0.0 must be > 0.0"),   # no update could move the policy
    ("dpo.max_steps=0", "config key 'dpo.max_steps' = 0 is out of range [1, inf]"),
    ("model.arch.type=rnn", "config key 'model.arch.type' = 'rnn' is not allowed; valid values: ['llama', 'gpt2']"),
    ("model.arch.num_heads=5", "config key 'model.arch.hidden_size' = 128 must be divisible by model.arch.num_heads = 5"),
    ("data.max_tokens=100000", "config key 'data.max_tokens' = 100000 exceeds model.arch.max_position"),
    ("data.held_out_family=poetry", "config key 'data.held_out_family' = 'poetry' is not a task family"),
    ("base.max_steps=many", "config key 'base.max_steps'"),
    ("+base.learning_rate=0.1", "config key 'base.learning_rate'"),
    ("stage=train", "config key 'stage' = 'train' is not allowed"),
    ("peft@sft.peft=prefix_tuning", "config key 'sft.packing' = true does not work with peft.method = 'prefix_tuning'"),
    ("evaluate.variants=[sft,gpt5]", "config key 'evaluate.variants' has 'gpt5'"),
    ("quantize.qat.methods=[bnb_nf4]", "config key 'quantize.qat.methods' has 'bnb_nf4'; valid: ['intx_w8'"),
    ("quantize.qat.loss=kto", "config key 'quantize.qat.loss' = 'kto' is not allowed; valid values: ['word', 'sft']"),
    ("+classify.regimes.linear=0.1", "config key 'classify.regimes' has 'linear'; valid: ['frozen', 'peft', 'full']"),
    ("classify.regimes.full=-1", "config key 'classify.regimes.full' = -1.0 must be a positive learning rate"),
    ("~classify.regimes.peft", "config key 'classify.regime' = 'peft' is not among classify.regimes ['frozen', 'full']"),
    ("classify.flag=spam", "config key 'classify.flag' = 'spam' is not one of classify.labels"),
    ("classify.labels=[ham,spam]", "config key 'classify.flag' = 'harmful' is not one of classify.labels ['ham', 'spam']"),
    ("classify.max_tokens=0", "config key 'classify.max_tokens'"),
    ("peft.method=adapterx", "config key 'peft.method' = 'adapterx' is not allowed"),
])
def test_bad_values_name_the_key_and_allowed_values(override, message):
    with pytest.raises(ConfigError) as err:
        validate(raw_compose([override]))
    assert message in str(err.value)


def test_required_value_is_named():
    with pytest.raises(ConfigError, match="config key 'model.name_or_path' needs a value"):
        validate(raw_compose(["model=hf"]))


def test_entry_point_exits_nonzero_with_the_key_before_heavy_work(tmp_path):
    import shutil

    shutil.copytree(ROOT / "conf", tmp_path / "conf")  # a project root: its conf/, nothing else
    proc = subprocess.run([sys.executable, "-m", "pipeline.run", "stage=base", "trainer.precision=fp8"],
                          cwd=tmp_path, capture_output=True, text=True, env=subprocess_env())
    assert proc.returncode == 2
    assert "config key 'trainer.precision' = 'fp8' is not allowed" in proc.stderr
    assert not (tmp_path / "data").exists()


def test_params_door_rejects_unknown_keys(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    proc = subprocess.run([sys.executable, "-m", "pipeline.run", "--params", "params.yaml", "stage=base", "base.lrr=1"],
                          cwd=tmp_path, capture_output=True, text=True, env=subprocess_env())
    assert proc.returncode == 2
    assert "config key 'base.lrr' does not exist in params.yaml; did you mean 'base.lr'?" in proc.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["stage=sft", "sft.lrr=1"], "config key 'sft.lrr' does not exist; did you mean 'sft.lr'?"),  # an unknown key
    (["stage=sft", "judge=humn"], "'humn' is not an option of config group 'judge'; did you mean 'human'?"),
    (["stage=sft", "peft@sft.peft=lorra"], "did you mean 'lora'?"),             # a group chosen at another key
    (["stage=sft", "sft.nested.lrr=1"], "config key 'sft.nested.lrr' does not exist"),  # no sibling to suggest
])
def test_hydra_door_exits_2_on_a_bad_override_with_what_is_valid(tmp_path, args, message):
    proc = subprocess.run([sys.executable, "-m", "pipeline.run", *args], cwd=ROOT, capture_output=True, text=True,
                          env=subprocess_env())
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize(("text", "message"), [
    ("seed: 1\nsft: [unclosed\n", "params.yaml:3: not valid YAML"),
    ("- just\n- a list\n", "params.yaml: must hold a mapping of config keys"),
])
def test_params_door_names_a_malformed_params_yaml(tmp_path, text, message):
    (tmp_path / "params.yaml").write_text(text)
    proc = subprocess.run([sys.executable, "-m", "pipeline.run", "--params", "params.yaml", "stage=base"],
                          cwd=tmp_path, capture_output=True, text=True, env=subprocess_env())
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_params_door_types_overrides_like_yaml(tmp_path):
    from pipeline.run import load_params

    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    cfg = load_params(str(tmp_path / "params.yaml"), ["stage=sft", "sft.lr=0.01", "evaluate.variants=[sft]",
                                                       "model.revision=null"])
    assert cfg.stage == "sft" and cfg.sft.lr == 0.01 and list(cfg.evaluate.variants) == ["sft"]
    assert cfg.model.revision is None
    validate(cfg)


# Stages that sample responses, and which demonstrations their policy may legitimately answer with.
RESPONSE_CAPS = {"collect": ("plain", "verbose"), "ppo": ("plain", "verbose"), "grpo": ("plain", "verbose"),
                 "quantize": ("plain", "verbose"), "distill": ("plain", "verbose"), "evaluate": ("plain", "verbose", "cot")}


def test_every_sampling_cap_fits_the_longest_right_answer():
    """A response cap shorter than a right answer cuts it off: the verifier then fails it and the online
    stages subtract the missing-end-token penalty, so they learn to avoid the answer (measured: with a
    32-token cap the 38-character refusal never finished, and PPO and GRPO unlearned refusing)."""
    import random

    from pipeline import suite
    from pipeline.models import build_char_tokenizer

    tok, rng, cfg = build_char_tokenizer(), random.Random(0), compose()
    longest = {"plain": 0, "verbose": 0, "cot": 0}
    for family, spec in suite.FAMILIES.items():
        for _ in range(300):
            ex = suite.make_example(family, rng.randrange(len(spec.templates)), rng)
            for kind, text in (("plain", suite.demonstration(ex)),
                               ("verbose", suite.demonstration(ex, verbose=True)),
                               ("cot", suite.rationale(family, ex.inputs, ex.answer))):
                longest[kind] = max(longest[kind], len(tok(text, add_special_tokens=False).input_ids) + 1)  # + EOS
    assert longest["plain"] >= len(suite.REFUSAL) + 1  # the refusal is among the right answers
    for stage, kinds in RESPONSE_CAPS.items():
        need = max(longest[k] for k in kinds)
        assert cfg[stage].max_new_tokens >= need, f"{stage}.max_new_tokens = {cfg[stage].max_new_tokens} < {need}"


def test_the_posttrain_script_helps_runs_from_the_project_root_and_says_when_it_is_not_there(tmp_path):
    """The console script pyproject declares: `--help` lists the commands, stages and config groups;
    `posttrain run ...` composes the project's conf/ (the working directory's); elsewhere one clear line, exit 2."""
    script = str(Path(sys.executable).parent / "posttrain")
    shown = subprocess.run([script, "--help"], cwd=ROOT, capture_output=True, text=True)
    assert shown.returncode == 0 and "posttrain run stage=<stage>" in shown.stdout
    assert "stages: base prepare sft collect reward dpo ppo grpo quantize distill classify evaluate register" in shown.stdout
    assert "judge [function, human, llm, verifier]" in shown.stdout
    composed = subprocess.run([script, "run", "stage=sft", "sft.lr=0.0042", "--cfg", "job"], cwd=ROOT,
                              capture_output=True, text=True)
    assert composed.returncode == 0 and "lr: 0.0042" in composed.stdout
    outside = subprocess.run([script, "run", "stage=sft"], cwd=tmp_path, capture_output=True, text=True)
    assert outside.returncode == 2 and "run posttrain from the project root" in outside.stderr


def test_the_inputs_a_choice_reads_are_derived_from_the_choice_and_a_contradicting_edit_is_refused():
    from pipeline.compose import compose as hydra_compose
    from pipeline.stage import resolve_path

    cfg = compose()
    assert cfg.judge.reads == "data/UNREAD.md" and cfg.grpo.reward_input == "UNREAD.md"
    cfg = compose("judge=human", "grpo.reward=model")
    assert cfg.judge.reads == cfg.judge.labels_file and cfg.grpo.reward_input == "reward"
    assert resolve_path(cfg, "${grpo.reward_input}") == Path("data/reward")
    assert resolve_path(cfg, "${judge.reads}", in_data=False) == Path("data/labels/human.jsonl")
    assert compose().dpo.reads == "pairs.jsonl" and compose("dpo.loss=kto").dpo.reads == "unpaired.jsonl"
    assert resolve_path(compose("dpo.loss=kto"), "collect/${dpo.reads}") == Path("data/collect/unpaired.jsonl")
    raw = hydra_compose(["dpo.loss=kto"])
    raw.dpo.reads = "pairs.jsonl"
    with pytest.raises(ConfigError, match="config key 'dpo.reads' = 'pairs.jsonl' must be 'unpaired.jsonl'"):
        validate(raw)
    raw = hydra_compose(["grpo.reward=model"])
    raw.grpo.reward_input = "UNREAD.md"                       # a hand edit of params.yaml
    with pytest.raises(ConfigError, match="config key 'grpo.reward_input' = 'UNREAD.md' must be 'reward'"):
        validate(raw)
    assert (Path(__file__).parent.parent / "data" / "UNREAD.md").is_file()   # the stand-in DVC dep exists


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_tab_completion_of_the_posttrain_script_completes_groups_and_keys_in_bash():
    """`eval "$(posttrain -sc install=bash)"` installs Hydra's completion for the script; a real bash then asks
    it for candidates the way the shell does on Tab (COMP_LINE/COMP_POINT/COMP_CWORD), `run` word included."""
    bindir = Path(sys.executable).parent

    def complete(line: str) -> list[str]:
        words = line.split(" ")
        script = (f'eval "$(posttrain -sc install=bash)"; COMP_LINE={shlex.quote(line)}; COMP_POINT={len(line)}; '
                  f'COMP_CWORD={len(words) - 1}; hydra_bash_completion; printf "%s\\n" "${{COMPREPLY[@]}}"')
        env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
        done = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        return sorted(done.stdout.split())

    assert complete("posttrain run judge=") == ["judge=function", "judge=human", "judge=llm", "judge=verifier"]
    assert complete("posttrain run stage=sft dpo.be") == ["dpo.beta="]
    assert complete("posttrain peft=lo") == ["peft=loha", "peft=lokr", "peft=lora"]


def test_omp_wait_policy_is_set_before_torch_loads_and_a_late_setting_says_it_does_nothing():
    """trainer.omp_wait_policy reaches the OpenMP runtime only through the environment before torch loads."""
    script = """
import os, sys
from pipeline.env import set_omp_wait_policy
os.environ.pop("OMP_WAIT_POLICY", None)
assert set_omp_wait_policy(None) and "OMP_WAIT_POLICY" not in os.environ
assert set_omp_wait_policy("passive") and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
import torch
assert set_omp_wait_policy("passive")             # what torch loaded with: nothing to say
assert not set_omp_wait_policy("active") and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "trainer.omp_wait_policy=active has no effect in this process: torch is already loaded" in proc.stderr
