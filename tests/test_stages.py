"""base and prepare on the smoke experiment: outputs, metrics, lineage, splits, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_stage
from pipeline.outputs import digest


def load_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def mlflow_runs(workdir: Path) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("posttrain")
    return {r.info.run_id: r for r in client.search_runs([exp.experiment_id])}


def test_base_is_an_hf_folder_that_learned(smoke_chain):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = smoke_chain / "data" / "base"
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True) == "<s><|user|>hi<|assistant|>"
    assert model.config.vocab_size == len(tokenizer)
    metrics = json.loads((smoke_chain / "data" / "metrics" / "base.json").read_text())
    assert metrics["val/perplexity"] < 0.5 * metrics["val/perplexity_before"]
    loss = json.loads((smoke_chain / "data" / "plots" / "base" / "loss.json").read_text())
    assert loss and loss[0]["step"] == 0


def test_mlflow_curves_have_a_point_per_step_and_the_summary_at_their_end(smoke_chain):
    """The MLflow charts of a training stage: train/loss at every optimizer step, and the final summary logged at
    the last step, never back at step 0 (where the chart would run from the final value to the first)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{smoke_chain / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("posttrain")  # the UI opens it on the runs table, not GenAI traces
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    run_id = json.loads((smoke_chain / "data" / "base" / "run.json").read_text())["run_id"]
    metrics = json.loads((smoke_chain / "data" / "metrics" / "base.json").read_text())
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert sorted(steps) == list(range(30))  # smoke: 30 optimizer steps, one point each
    history = sorted(client.get_metric_history(run_id, "val/loss"), key=lambda m: (m.timestamp, m.step))
    assert [m.step for m in history] == sorted(m.step for m in history)  # logged in step order
    assert history[0].step == 0 and history[0].value == pytest.approx(metrics["val/loss_before"], abs=1e-4)
    assert history[-1].step == 30 and history[-1].value == pytest.approx(metrics["val/loss"], abs=1e-4)


def test_prepare_splits_are_disjoint_and_hold_what_they_promise(smoke_chain):
    out = smoke_chain / "data" / "prepare"
    splits = {name: load_jsonl(out / f"{name}.jsonl") for name in ("train", "val", "test", "prompts")}
    keys = {name: {r["meta"]["key"] for r in rows} for name, rows in splits.items()}
    for a in keys:
        for b in keys:
            if a < b:
                assert not keys[a] & keys[b], f"instances shared by {a} and {b}"
    train_meta = [r["meta"] for r in splits["train"]]
    assert not any(m["held_out_template"] or m["held_out_family"] for m in train_meta)
    assert {m["style"] for m in train_meta} == {"concise", "verbose", "refusal", "compliance"}
    test_meta = [r["meta"] for r in splits["test"]]
    assert any(m["held_out_template"] for m in test_meta) and any(m["held_out_family"] for m in test_meta)
    assert {m["style"] for m in test_meta if m["family"] != "safety"} == {"concise"}
    card = json.loads((out / "card.json").read_text())
    assert card["splits"]["train"]["rows"] == len(splits["train"])
    assert (smoke_chain / "data" / "plots" / "prepare" / "token_lengths.png").stat().st_size > 1000


def test_tokenized_splits_mask_prompts(smoke_chain):
    from safetensors.torch import load_file

    from pipeline.models import load_tokenizer

    tokens = load_file(str(smoke_chain / "data" / "prepare" / "train.safetensors"))
    rows = load_jsonl(smoke_chain / "data" / "prepare" / "train.jsonl")
    tokenizer = load_tokenizer(smoke_chain / "data" / "base")
    lo, hi = tokens["offsets"][0].item(), tokens["offsets"][1].item()
    labels = tokens["labels"][lo:hi].tolist()
    response = tokenizer.decode([t for t in labels if t != -100])
    assert response == rows[0]["messages"][-1]["content"] + "</s>"
    assert len(tokens["offsets"]) == len(rows) + 1


def test_lineage_prepare_names_base_run_and_digests(smoke_chain):
    base_run = json.loads((smoke_chain / "data" / "base" / "run.json").read_text())
    prepare_run = json.loads((smoke_chain / "data" / "prepare" / "run.json").read_text())
    assert prepare_run["inputs"]["base"]["run_id"] == base_run["run_id"]
    assert prepare_run["inputs"]["base"]["digest"] == digest(smoke_chain / "data" / "base")
    runs = mlflow_runs(smoke_chain)
    prep = runs[prepare_run["run_id"]]
    assert prep.data.tags["upstream.base.run_id"] == base_run["run_id"]
    assert prep.data.tags["input.base.digest"] == prepare_run["inputs"]["base"]["digest"]
    assert prep.data.tags["output.prepare.train.digest"] == digest(smoke_chain / "data" / "prepare" / "train.jsonl")
    assert prep.data.params["data.verbose_share"] == "0.3"
    assert prep.data.tags["env.torch"].startswith("2.")
    assert {d.dataset.name for d in prep.inputs.dataset_inputs} >= {"prepare.train", "prepare.test"}
    assert prep.data.metrics["data/train_rows"] > 0
    assert runs[base_run["run_id"]].info.status == "FINISHED"


def test_same_seed_same_data_and_metrics(smoke_chain, in_tmp):
    run_stage("base")
    run_stage("prepare")
    for name in ("train.jsonl", "test.jsonl", "train.safetensors"):
        assert digest(in_tmp / "data" / "prepare" / name) == digest(smoke_chain / "data" / "prepare" / name)
    for stage in ("base", "prepare"):  # byte for byte: the machine's timings live in data/timings
        ours = (in_tmp / "data" / "metrics" / f"{stage}.json").read_bytes()
        assert ours == (smoke_chain / "data" / "metrics" / f"{stage}.json").read_bytes()
    assert "train/seconds" in json.loads((in_tmp / "data" / "timings" / "base.json").read_text())


def test_user_files_with_a_bad_row_fail_or_skip(smoke_chain, in_tmp):
    import shutil

    shutil.copytree(smoke_chain / "data" / "base", in_tmp / "data" / "base")
    rows = [json.dumps({"prompt": f"Say {i}.", "response": str(i)}) for i in range(300)]
    rows[41] = json.dumps({"prompt": "Say x.", "response": None})
    (in_tmp / "user.jsonl").write_text("\n".join(rows) + "\n")
    from pipeline.chat import InputError

    with pytest.raises(InputError, match=r"user.jsonl:42: field 'response' must be a string \(NoneType\)"):
        run_stage("prepare", "data=files", "data.paths=[user.jsonl]")
    assert not (in_tmp / "data" / "prepare").exists()
    metrics = run_stage("prepare", "data=files", "data.paths=[user.jsonl]", "data.on_bad_row=skip",
                        "data.split.val=20", "data.split.test=20", "data.split.prompts=20")
    assert metrics["data/skipped_bad_rows"] == 1
    assert metrics["data/train_rows"] + 60 == 299


def test_an_empty_split_says_why(smoke_chain, in_tmp):
    """A split whose rows were all dropped and a split that got no rows give their reasons, never '{}'."""
    import shutil

    from pipeline.chat import InputError

    shutil.copytree(smoke_chain / "data" / "base", in_tmp / "data" / "base")
    (in_tmp / "long.jsonl").write_text(json.dumps({"prompt": "Say it " * 100, "response": "it"}) + "\n")
    with pytest.raises(InputError, match=r"split 'train' is empty: all 1 row\(s\) it got were dropped: 1 longer "
                                         r"than data.max_tokens = 256 tokens"):
        run_stage("prepare", "data=files", "data.paths=[long.jsonl]")
    (in_tmp / "one.jsonl").write_text(json.dumps({"prompt": "Say it.", "response": "it"}) + "\n")
    with pytest.raises(InputError, match=r"split 'train' got no rows: 1 row\(s\) in all.*data.holdout_share = 0.3"):
        run_stage("prepare", "data=files", "data.paths=[one.jsonl]")


def test_a_crash_leaves_no_half_written_output(smoke_chain, in_tmp, monkeypatch):
    import shutil

    from stages import prepare

    shutil.copytree(smoke_chain / "data" / "base", in_tmp / "data" / "base")
    run_stage("prepare")
    before = digest(in_tmp / "data" / "prepare")

    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(prepare, "save_tokenized", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        run_stage("prepare", "seed=7")
    assert digest(in_tmp / "data" / "prepare") == before
    assert [p.name for p in (in_tmp / "data").iterdir() if p.name.startswith(".")] == []


def test_a_training_run_carries_its_plots_a_curves_picture_and_sample_answers_as_artifacts(sft_chain):
    """MLflow's artifact view of a training stage: its plot files, the curves drawn as one PNG, and a table of
    held-out prompts answered by the trained model (prompt, reference, response)."""
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from pipeline.training import SAMPLES

    client = MlflowClient(f"sqlite:///{sft_chain / 'mlruns' / 'mlflow.db'}")
    run_id = json.loads((sft_chain / "data" / "sft" / "run.json").read_text())["run_id"]
    plots = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert plots == {"plots/loss.json", "plots/val_loss.json", "plots/curves.png"}
    picture = Image.open(client.download_artifacts(run_id, "plots/curves.png"))
    assert picture.width > 300 and len(set(picture.convert("L").getdata())) > 10   # drawn, not blank
    samples = json.loads(Path(client.download_artifacts(run_id, "samples.json")).read_text())
    assert samples["columns"] == ["prompt", "reference", "response", "finished"] and len(samples["data"]) == SAMPLES
    val = load_jsonl(sft_chain / "data" / "prepare" / "val.jsonl")[:SAMPLES]
    assert [row[1] for row in samples["data"]] == [r["messages"][-1]["content"] for r in val]
    assert all(val[i]["messages"][-2]["content"] in row[0] for i, row in enumerate(samples["data"]))
    assert any(row[2] for row in samples["data"])                            # the model answered something
