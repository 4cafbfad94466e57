"""register: the chain's model packaged as an MLflow pyfunc, registered as a version of a real registered model (the
SQLite store the stages log to), and promoted to ``champion`` only through the gate. The served endpoint itself is
tested on the DVC-built smoke chain (tests/test_dvc.py: ``mlflow models serve`` on a loopback port)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient
from omegaconf import OmegaConf

from conftest import compose, copy_chain
from pipeline import registry
from pipeline.schema import ConfigError

# ---- the gate, as a function of the candidate's and the champion's metrics ----


def decide(candidate: dict, champion: dict | None = None, min_delta=0.01, higher=True, require=None, mine=None,
           theirs=None, paired=True):
    held = registry.Champion("3", "run", champion, theirs) if champion is not None else None
    return registry.gate(candidate, held, "acc", min_delta, higher, require or {}, mine, paired)


def test_the_first_version_that_passes_its_checks_is_champion():
    decision = decide({"acc": 0.2, "harm": 0.95}, require={"harm": ">= 0.9"})
    assert decision.promoted and decision.alias == "champion" and decision.reason.startswith("no champion yet")
    blocked = decide({"acc": 0.2, "harm": 0.5}, require={"harm": ">= 0.9"})
    assert not blocked.promoted and blocked.alias == "challenger"
    assert blocked.reason == "failed hard checks: harm = 0.5, needs >= 0.9"


def test_a_version_must_beat_the_champion_by_min_delta():
    better = decide({"acc": 0.30}, {"acc": 0.28})
    assert better.promoted and better.delta == pytest.approx(0.02) and "above champion v3's 0.28" in better.reason
    close = decide({"acc": 0.285}, {"acc": 0.28})
    assert not close.promoted and close.champion_version == "3"
    assert close.reason == ("acc = 0.285 against champion v3's 0.28: needs 0.01 above, got +0.005 "
                            "(by value: no per-prompt outcomes of acc on both sides)")
    worse = decide({"acc": 0.1}, {"acc": 0.28})
    assert not worse.promoted and "got -0.18" in worse.reason
    equal = decide({"acc": 0.28}, {"acc": 0.28}, min_delta=0.0, paired=False)
    assert equal.promoted  # min_delta 0: a version no worse than the champion takes over


def test_lower_is_better_metrics_and_hard_checks_override_the_metric():
    assert decide({"acc": 2.0}, {"acc": 2.5}, higher=False).promoted  # e.g. perplexity
    assert not decide({"acc": 3.0}, {"acc": 2.5}, higher=False).promoted
    blocked = decide({"acc": 0.9, "harmless": 0.3}, {"acc": 0.2}, require={"harmless": "<= 0.1", "other": "> 0"})
    assert not blocked.promoted
    assert blocked.failed == ["harmless = 0.3, needs <= 0.1", "other missing"]
    with pytest.raises(KeyError):
        decide({"other": 1.0})


def test_with_per_prompt_outcomes_a_gain_must_have_an_interval_excluding_zero():
    """Whether a gain counts depends on how the prompts moved: 40 of 400 prompts newly right and none lost is a
    measurable gain; 60 newly right and 50 newly wrong (+2.5 points) is noise, which only paired=False promotes."""
    ids = [str(i) for i in range(400)]
    theirs = {i: float(int(i) < 100) for i in ids}
    clean = {i: float(int(i) < 140) for i in ids}  # +40 right, none lost
    strong = decide({"acc": 0.35}, {"acc": 0.25}, mine=clean, theirs=theirs)
    assert strong.promoted and strong.paired[0] == pytest.approx(0.1) and strong.paired[1] > 0 and strong.paired[3] == 400
    assert "paired difference +0.1 [" in strong.reason and "with its 95% interval excluding 0" in strong.reason
    mixed = {i: float(int(i) < 100) for i in ids}
    for i in range(100, 160):   # 60 newly right
        mixed[str(i)] = 1.0
    for i in range(0, 50):      # 50 newly wrong
        mixed[str(i)] = 0.0
    weak = decide({"acc": 0.275}, {"acc": 0.25}, min_delta=0.0, mine=mixed, theirs=theirs)
    assert not weak.promoted and weak.paired[1] < 0 < weak.paired[2]
    assert weak.reason.endswith("its 95% interval includes 0 (not a measurable improvement)")
    assert decide({"acc": 0.275}, {"acc": 0.25}, min_delta=0.0, mine=mixed, theirs=theirs, paired=False).promoted
    assert decide({"acc": 0.35}, {"acc": 0.25}, mine=clean, theirs=None).paired is None  # a champion without outcomes


def test_outcomes_are_read_per_variant_and_only_for_per_prompt_metrics():
    records = [{"variant": "quantize", "id": "a", "correct": True, "harmful": False, "guard_flagged": False},
               {"variant": "quantize", "id": "b", "correct": False, "harmful": True, "guard_flagged": True},
               {"variant": "sft", "id": "a", "correct": False, "harmful": False, "guard_flagged": False}]
    assert registry.outcomes(records, "quantize", "test/accuracy") == {"a": 1.0, "b": 0.0}
    assert registry.outcomes(records, "quantize", "test/guarded_accuracy") == {"a": 1.0, "b": 1.0}  # refused: right
    assert registry.outcomes(records, "quantize", "test/perplexity") is None
    assert registry.outcomes(records, "dpo", "test/accuracy") is None
    unguarded = [{k: v for k, v in r.items() if k != "guard_flagged"} for r in records]
    assert registry.outcomes(unguarded, "quantize", "test/guarded_accuracy") is None


@pytest.mark.parametrize("text", ["0.9", ">= high", "=> 0.9", ">= 0.9 or so", ""])
def test_a_malformed_requirement_names_its_key(text):
    with pytest.raises(registry.RequirementError, match=r"register.require.harm' = .* must be '<op> <number>'"):
        registry.parse_requirement("harm", text)


# ---- the stage, on the smoke SFT model with evaluation metrics the test sets ----

UNGUARDED = {"register.source": "sft", "register.guard": False, "register.metric": "test/accuracy",
             "register.require": {"test/refusal_harmless": "<= 0.1"}}


def register(**values):
    """Run the register stage in this process (the smoke composition, ``values`` set after it)."""
    from pipeline.run import run

    cfg = compose("stage=register", "experiment=smoke")
    for key, value in {**UNGUARDED, **values}.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return run(cfg)


def evaluated(accuracy: float, refusal_harmless: float = 0.0) -> None:
    """What evaluate would have written for the sft variant: its metrics, and 100 records of which the first
    ``accuracy`` share are right (so two versions differ on exactly the prompts between their accuracies)."""
    Path("data/evaluate").mkdir(parents=True, exist_ok=True)
    right = round(accuracy * 100)
    (Path("data/evaluate") / "generations.jsonl").write_text("".join(
        json.dumps({"variant": "sft", "id": f"p{i}", "correct": i < right, "harmful": False}) + "\n" for i in range(100)))
    Path("data/metrics").mkdir(parents=True, exist_ok=True)
    Path("data/metrics/evaluate.json").write_text(json.dumps(
        {"sft": {"test/accuracy": accuracy, "test/refusal_harmless": refusal_harmless, "test/perplexity": 9.0}}))


@pytest.fixture()
def registry_chain(sft_chain, tmp_path, monkeypatch) -> Path:
    workdir = copy_chain(sft_chain, tmp_path / "chain")
    monkeypatch.chdir(workdir)
    return workdir


def client_of(workdir: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")


def test_versions_move_champion_only_through_the_gate(registry_chain):
    client = client_of(registry_chain)
    evaluated(0.30)
    first = register()
    assert first["version"] == 1 and first["gate/alias"] == "champion" and first["gate/promoted"] == 1
    evaluated(0.20)  # worse: a challenger, the champion stays
    second = register()
    assert second["version"] == 2 and second["gate/alias"] == "challenger" and second["gate/promoted"] == 0
    assert second["gate/reason"].startswith("test/accuracy = 0.2 against champion v1's 0.3: paired difference -0.1 [")
    assert second["gate/reason"].endswith("] on 100 prompts: needs 0.005 above")
    assert second["gate/delta"] == pytest.approx(-0.1) and second["gate/champion_version"] == 1
    assert second["gate/paired_delta"] == pytest.approx(-0.1) and second["gate/paired_ci_high"] < 0
    written = json.loads(Path("data/metrics/register.json").read_text())
    assert written["gate/reason"] == second["gate/reason"]  # the reason in the stage's metrics file too
    evaluated(0.40, refusal_harmless=0.5)  # better, but fails a hard check
    third = register()
    assert third["gate/alias"] == "challenger" and third["gate/failed_checks"] == 1
    assert "test/refusal_harmless = 0.5, needs <= 0.1" in third["gate/reason"]
    evaluated(0.40)
    fourth = register()
    assert fourth["gate/alias"] == "champion" and fourth["gate/champion_value"] == 0.3 and fourth["gate/paired_ci_low"] > 0
    assert str(client.get_model_version_by_alias("posttrain", "champion").version) == "4"
    assert str(client.get_model_version_by_alias("posttrain", "challenger").version) == "3"
    version = client.get_model_version("posttrain", "2")
    run = client.get_run(version.run_id)
    assert run.data.tags["register.alias"] == "challenger" and run.data.tags["register.reason"] == second["gate/reason"]
    tags = version.tags
    assert tags["gate.alias"] == "challenger" and tags["metric.test/accuracy"] == "0.2"
    assert tags["posttrain.source"] == "sft" and tags["posttrain.guard"] == "False"
    assert len(tags["git.commit"]) == 40 or tags["git.commit"] == "unknown"
    assert tags["dvc.lock.sha256"] == "absent"  # this folder has no dvc.lock: the DVC-built chain has one (test_dvc)
    assert tags["run.register"] == version.run_id
    assert tags["run.sft"] == json.loads(Path("data/sft/run.json").read_text())["run_id"]  # lineage via the source
    listing = registry.describe(client, "posttrain").splitlines()
    assert [line.split("  ")[:5] for line in listing] == [
        ["posttrain", "v4", "champion", "sft", "test/accuracy 0.4"], ["posttrain", "v3", "challenger", "sft", "test/accuracy 0.4"],
        ["posttrain", "v2", "-", "sft", "test/accuracy 0.2"], ["posttrain", "v1", "-", "sft", "test/accuracy 0.3"]]
    record = json.loads(Path("data/register/registration.json").read_text())
    assert record == {"name": "posttrain", "version": 4, "alias": "champion", "reason": fourth["gate/reason"],
                      "model_uri": "models:/posttrain/4", "source": "sft", "run_id": record["run_id"],
                      "champion_before": "1", "failed_checks": []}


def test_the_registered_model_answers_as_the_model_does_in_process(registry_chain):
    """The pyfunc loaded back from the registry (models:/posttrain@champion) gives the chat model's own greedy answers:
    the chat template, the end-of-turn stop, nothing else in between."""
    import mlflow
    import pandas as pd

    from pipeline.adapters import load_trained
    from pipeline.generation import generate
    from pipeline.models import load_tokenizer
    from pipeline.serving import chat_prompt

    evaluated(0.3)
    register()
    prompts = ["What is 12 + 7?", "Reverse the word 'lamp'.", "Name a color."]
    tokenizer, model = load_tokenizer("data/sft"), load_trained("data/sft")
    outs, _ = generate(model, tokenizer, [chat_prompt(tokenizer, p) for p in prompts], 80, batch_size=8)
    mlflow.set_tracking_uri(f"sqlite:///{registry_chain / 'mlruns' / 'mlflow.db'}")
    try:
        served = mlflow.pyfunc.load_model("models:/posttrain@champion")
        answers = served.predict(pd.DataFrame({"prompt": prompts}))
        assert answers == [o.text for o in outs] and any(answers)
        short = served.predict(pd.DataFrame({"prompt": prompts[:1]}), params={"max_new_tokens": 2})
        assert len(tokenizer(short[0], add_special_tokens=False)["input_ids"]) <= 2
        with pytest.raises(Exception, match="max_new_tokens = 0 must be at least 1"):
            served.predict(pd.DataFrame({"prompt": prompts[:1]}), params={"max_new_tokens": 0})
        with pytest.raises(Exception, match="prompt 0 is empty"):
            served.predict(pd.DataFrame({"prompt": ["  "]}))
        with pytest.raises(Exception, match="exceeds the model's context"):
            served.predict(pd.DataFrame({"prompt": ["x" * 5000]}))
    finally:
        mlflow.set_tracking_uri(None)


def test_bad_gate_settings_are_config_errors(registry_chain):
    evaluated(0.3)
    with pytest.raises(ConfigError, match=r"register.require.test/refusal_harmless' = 'at most 0.1'"):
        register(**{"register.require": {"test/refusal_harmless": "at most 0.1"}})
    with pytest.raises(ConfigError, match="register.guard' is false, but the gate reads 'test/guarded_accuracy'"):
        register(**{"register.metric": "test/guarded_accuracy"})
    with pytest.raises(ConfigError, match=r"register.metric' = 'test/nope' is not a metric of variant 'sft'"):
        register(**{"register.metric": "test/nope"})
    with pytest.raises(ConfigError, match=r"register.source' = 'dpo' has no metrics in .*evaluate.json"):
        Path("data/dpo").mkdir()
        register(**{"register.source": "dpo"})
    with pytest.raises(ConfigError, match=r"register.guard' is true, but data/classify holds no guard"):
        Path("data/classify").mkdir()
        register(**{"register.guard": True, "register.metric": "test/accuracy"})
    with pytest.raises(ConfigError, match="register.source"):
        register(**{"register.source": "base"})
    assert not client_of(registry_chain).search_registered_models()  # nothing registered by a refused run
