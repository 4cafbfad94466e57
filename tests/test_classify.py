"""classify: the K-class head pools the last real token (Llama and GPT-2, left and right padding), the suite's
labelled splits hold out objects and the chain's own prompts, a user's labelled file is checked row by row, the
metrics on known cases, and the stage on the smoke chain: three regimes, the saved guard, and evaluate's guard."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import copy_chain, run_stage, save_tiny_config_model
from pipeline import suite
from pipeline.chat import InputError
from pipeline.classification import class_logits, classification_metrics, file_splits, suite_splits
from pipeline.models import load_sequence_classifier
from pipeline.tokens import pad

LABELS = ["harmless", "harmful"]


@pytest.mark.parametrize("config_class", ["LlamaConfig", "GPT2Config"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_the_head_reads_each_rows_last_real_token_under_either_padding(tmp_path, config_class, side):
    fields = (dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
              if config_class == "LlamaConfig" else dict(n_embd=32, n_layer=2, n_head=2))
    folder = save_tiny_config_model(tmp_path / "lm", config_class, **fields)
    model = load_sequence_classifier(folder, labels=["a", "b", "c"]).eval()
    assert model.config.id2label == {0: "a", 1: "b", 2: "c"}
    torch.manual_seed(0)
    with torch.no_grad():
        model.score.weight.normal_()  # a random head, so every position gives different logits
    pad_id = model.config.pad_token_id
    rows = [[5, 9, 12, 7, 30, 8], [5, 9, 12], [pad_id, 11, 40, 6]]  # the last row holds the pad token as a real token
    with torch.no_grad():
        batched = class_logits(model, *pad(rows, pad_id, side))
        alone = torch.cat([class_logits(model, torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long)) for r in rows])
        # the last real token's logits differ from any other position's: pooling elsewhere would be caught
        other = class_logits(model, torch.tensor([rows[0][:-1]]), torch.ones(1, len(rows[0]) - 1, dtype=torch.long))
    assert batched.shape == (3, 3)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(other[0], alone[0], atol=1e-3)


def test_the_head_agrees_with_transformers_pooling_when_pad_is_not_a_real_token(tmp_path):
    folder = save_tiny_config_model(tmp_path / "lm", "LlamaConfig", hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64)
    model = load_sequence_classifier(folder, labels=LABELS).eval()
    ids, mask = pad([[5, 9, 12, 7], [5, 9]], model.config.pad_token_id, "right")
    with torch.no_grad():
        torch.testing.assert_close(class_logits(model, ids, mask), model(input_ids=ids, attention_mask=mask).logits)


def test_the_suites_splits_hold_out_objects_and_keep_the_chains_prompts_out_of_training():
    exclude = {"safety:t=steal a car", "safety:t=wash a dog"}
    splits = suite_splits(LABELS, 1234, test_objects=6, val_objects=3, task_share=0.5, exclude=exclude)
    objects = {split: {" ".join(r.key.split()[-2:]) for r in rows if r.group == "safety"} for split, rows in splits.items()}
    assert len(objects["test"]) == 6 and len(objects["val"]) == 3
    assert not objects["test"] & objects["train"] and not objects["val"] & objects["train"]
    assert not objects["test"] & objects["val"]
    for split in ("train", "val"):
        assert not {r.key for r in splits[split]} & exclude
    keys = {split: {r.key for r in rows if r.group == "task"} for split, rows in splits.items()}
    assert not keys["test"] & keys["train"] and not keys["val"] & keys["train"]
    test = splits["test"]
    safety = [r for r in test if r.group == "safety"]
    assert len(safety) == 6 * 16 * 4 and sum(r.label for r in safety) == 6 * 8 * 4  # every verb, object and template
    assert all(r.label == 0 for r in test if r.group == "task") and len(test) - len(safety) == round(0.5 * len(safety))
    harmful_verbs = [r for r in safety if r.label == 1]
    assert all(any(v in r.text for v in suite.HARMFUL_VERBS) for r in harmful_verbs)


def write_rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("bad, message", [
    ({"text": "hello"}, "field 'label' is missing"),
    ({"text": "hello", "label": "spam"}, "field 'label' must be one of ['harmless', 'harmful']"),
    ({"text": "", "label": "harmful"}, "field 'text' must be a non-empty string"),
    ({"text": 3, "label": "harmful"}, "field 'text' must be a non-empty string"),
    ("{not json", ""),
])
def test_a_labelled_file_with_a_bad_row_names_the_file_line_and_field(tmp_path, bad, message):
    good = [{"text": f"request number {i}", "label": LABELS[i % 2]} for i in range(40)]
    path = write_rows(tmp_path / "labels.jsonl", [*good[:2], bad, *good[2:]])
    with pytest.raises(InputError) as err:
        file_splits(path, LABELS, 0.2, 0.2)
    assert f"{path}:3" in str(err.value) and message in str(err.value)


def test_a_labelled_file_splits_by_text_and_every_row_lands_once(tmp_path):
    rows = [{"text": f"request number {i}", "label": LABELS[i % 2]} for i in range(200)]
    splits = file_splits(write_rows(tmp_path / "labels.jsonl", rows), LABELS, 0.2, 0.2)
    texts = [r.text for rows in splits.values() for r in rows]
    assert sorted(texts) == sorted(r["text"] for r in rows)
    assert 20 < len(splits["test"]) < 60 and 20 < len(splits["val"]) < 60
    again = file_splits(write_rows(tmp_path / "again.jsonl", rows[::-1]), LABELS, 0.2, 0.2)
    assert {r.text for r in again["test"]} == {r.text for r in splits["test"]}


def test_classification_metrics_on_known_cases():
    labels = torch.tensor([0, 0, 1, 1])
    perfect = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    m = classification_metrics(perfect, labels)
    assert (m["test/accuracy"], m["test/macro_f1"], m["test/auroc"]) == (1.0, 1.0, 1.0)
    m = classification_metrics(-perfect, labels)
    assert (m["test/accuracy"], m["test/macro_f1"], m["test/auroc"]) == (0.0, 0.0, 0.0)
    # one mistake, ranking still perfect: accuracy 3/4, F1 per class 0.8 and 2/3... macro = 0.7333
    ranked = torch.tensor([[2.0, 0.0], [0.0, 0.5], [0.0, 1.0], [0.0, 3.0]])
    m = classification_metrics(ranked, labels)
    assert m["test/accuracy"] == 0.75 and m["test/auroc"] == 1.0 and m["test/macro_f1"] == pytest.approx(0.7333, abs=1e-4)
    three = classification_metrics(torch.eye(3), torch.tensor([0, 1, 2]))
    assert three["test/auroc"] == 1.0 and three["test/macro_f1"] == 1.0


@pytest.fixture(scope="module")
def classified(sft_chain, tmp_path_factory):
    """The smoke chain through classify (three regimes on the SFT backbone), in a private copy."""
    import os

    workdir = copy_chain(sft_chain, tmp_path_factory.mktemp("classify"))
    old = os.getcwd()
    os.chdir(workdir)
    try:
        metrics = run_stage("classify")
    finally:
        os.chdir(old)
    return workdir, metrics


@pytest.mark.slow
def test_the_stage_trains_three_regimes_and_saves_the_guard_that_reproduces_its_test_accuracy(classified):
    from pipeline.classification import Guard, encode, predict

    workdir, metrics = classified
    trainable = {r: metrics[f"{r}/train/trainable_parameters"] for r in ("frozen", "peft", "full")}
    assert trainable["frozen"] < trainable["peft"] < trainable["full"]
    assert trainable["frozen"] == 2 * 64  # the head alone: hidden size x 2 labels (the smoke model is 64 wide)
    for regime in ("frozen", "peft", "full"):
        low, mid, high = (metrics[f"{regime}/test/accuracy{s}"] for s in ("_ci_low", "", "_ci_high"))
        assert low <= mid <= high
        assert 0 <= metrics[f"{regime}/test/auroc"] <= 1 and 0 <= metrics[f"{regime}/test/macro_f1"] <= 1
    for regime in ("peft", "full"):
        assert metrics[f"{regime}/test/accuracy_vs_frozen"] == pytest.approx(
            metrics[f"{regime}/test/accuracy"] - metrics["frozen/test/accuracy"], abs=2e-4)
    saved = json.loads((workdir / "data/metrics/classify.json").read_text())
    assert saved == {k: v for k, v in saved.items()} and "peft/test/accuracy" in saved
    guard = Guard(workdir / "data/classify")
    about = json.loads((workdir / "data/classify/guard.json").read_text())
    assert about["regime"] == "peft" and about["test"]["test/accuracy"] == metrics["peft/test/accuracy"]
    splits = suite_splits(LABELS, 1234, 6, 3, 0.5, set())
    test = splits["test"]
    ids, _ = encode(guard.tokenizer, test, 64)
    predicted = predict(guard.model, ids, guard.tokenizer.pad_token_id, 32).argmax(-1)
    assert guard.flags([r.text for r in test]) == (predicted == 1).tolist()
    plot = (workdir / "data/plots/classify/regimes.csv").read_text().splitlines()
    assert plot[0] == "regime,metric,value" and len(plot) == 1 + 3 * 3
    curve = json.loads((workdir / "data/plots/classify/val_accuracy.json").read_text())
    assert curve and set(curve[-1]) == {"step", "frozen", "peft", "full"}


@pytest.mark.slow
def test_the_suite_guard_is_trained_on_other_requests_than_the_chains_test_prompts(classified):
    workdir, metrics = classified
    chain = {json.loads(line)["meta"]["key"] for split in ("val", "test")
             for line in (workdir / f"data/prepare/{split}.jsonl").read_text().splitlines()}
    train = suite_splits(LABELS, 1234, 6, 3, 0.5, chain)["train"]
    assert metrics["data/train"] == len(train) < len(suite_splits(LABELS, 1234, 6, 3, 0.5, set())["train"])
    assert not {r.key for r in train} & chain


def test_behind_the_guard_a_flagged_request_is_refused_and_counts_as_correct_only_when_harmful():
    from stages.evaluate import guarded

    records = [{"id": "a", "harmful": True, "correct": False, "refused": False},   # flagged: now refused, correct
               {"id": "b", "harmful": True, "correct": True, "refused": True},     # not flagged: unchanged
               {"id": "c", "harmful": False, "correct": True, "refused": False},   # flagged harmless: refused, wrong
               {"id": "d", "harmful": False, "correct": True, "refused": False}]   # not flagged: unchanged
    m = guarded(records, {"a": True, "b": False, "c": True, "d": False})
    assert m["test/guarded_refusal_harmful"] == 1.0 and m["test/guarded_refusal_harmless"] == 0.5
    assert m["test/guarded_accuracy"] == 0.75
    assert m["test/guarded_accuracy_vs_unguarded"] == 0.0  # one gained (a), one lost (c)
    assert m["test/guarded_refusal_harmful_vs_unguarded"] == 0.5


@pytest.mark.slow
def test_evaluate_puts_the_guard_in_front_of_each_variant(classified, tmp_path_factory):
    import os

    workdir = copy_chain(classified[0], tmp_path_factory.mktemp("guarded"))
    # A guard that refuses the other label: whatever the smoke guard predicts, it flags some of the test prompts
    about = workdir / "data/classify/guard.json"
    about.write_text(json.dumps({**json.loads(about.read_text()), "flag": "harmless"}))
    old = os.getcwd()
    os.chdir(workdir)
    try:
        results = run_stage("evaluate", "evaluate.variants=[sft]", "evaluate.sampled_accuracy=false")
    finally:
        os.chdir(old)
    m = results["sft"]
    records = [json.loads(line) for line in (workdir / "data/evaluate/generations.jsonl").read_text().splitlines()]
    assert any(r["guard_flagged"] for r in records) and not all(r["guard_flagged"] for r in records)
    for key, rows in (("harmful", [r for r in records if r["harmful"]]), ("harmless", [r for r in records if not r["harmful"]])):
        expected = sum(r["refused"] or r["guard_flagged"] for r in rows) / len(rows)
        assert m[f"test/guarded_refusal_{key}"] == pytest.approx(expected, abs=1e-4)
        assert m[f"test/guarded_refusal_{key}"] >= m[f"test/refusal_{key}"]  # a guard only adds refusals
    expected = sum(r["harmful"] if r["guard_flagged"] else r["correct"] for r in records) / len(records)
    assert m["test/guarded_accuracy"] == pytest.approx(expected, abs=1e-4)
    report = (workdir / "data/evaluate/report.html").read_text()
    assert "Guard (classify stage) in front of each variant" in report and "refusal, harmful, guarded" in report


@pytest.mark.slow
def test_a_users_labelled_file_on_a_local_gpt2_folder_trains_and_a_bad_row_stops_the_stage(smoke_chain, tmp_path):
    import os
    import shutil
    import subprocess
    import sys

    from conftest import ROOT, save_tiny_model, subprocess_env

    workdir = copy_chain(smoke_chain, tmp_path / "chain")
    backbone = save_tiny_model(tmp_path / "gpt2", "gpt2")
    verbs = {"buy": "I would like to buy", "other": "Tell me about", "stop": "Please stop sending"}
    rows = [{"text": f"{verbs[label]} the item number {i}", "label": label}
            for i in range(40) for label in ("buy", "other", "stop")]
    labelled = write_rows(tmp_path / "labels.jsonl", rows)
    overrides = [f"classify.backbone={backbone}", f"classify.data={labelled}", "classify.labels=[buy,other,stop]",
                 "classify.flag=stop", "~classify.regimes.peft", "classify.regime=full", "classify.max_steps=4",
                 "classify.val_every_n_steps=4", "classify.checkpoint_every_n_steps=2"]
    old = os.getcwd()
    os.chdir(workdir)
    try:
        metrics = run_stage("classify", *overrides)
    finally:
        os.chdir(old)
    assert {k.split("/")[0] for k in metrics if "/test/" in k} == {"frozen", "full"}
    assert metrics["data/train"] + metrics["data/val"] + metrics["data/test"] == len(rows)
    about = json.loads((workdir / "data/classify/guard.json").read_text())
    assert about["labels"] == ["buy", "other", "stop"] and about["regime"] == "full"
    model = load_sequence_classifier(workdir / "data/classify", labels=about["labels"])
    assert type(model).__name__ == "GPT2ForSequenceClassification" and model.config.num_labels == 3
    # the same file with one bad row: the stage exits non-zero naming the file, line and field
    shutil.copytree(ROOT / "conf", workdir / "conf")  # the entry point runs from a project root
    bad = write_rows(tmp_path / "bad.jsonl", [*rows[:4], {"text": "no label here"}, *rows[4:]])
    proc = subprocess.run([sys.executable, "-m", "pipeline.run", "stage=classify", "experiment=smoke",
                           *[o.replace(str(labelled), str(bad)) for o in overrides]],
                          cwd=workdir, capture_output=True, text=True, env=subprocess_env())
    assert proc.returncode != 0 and f"{bad}:5: field 'label' is missing" in proc.stderr
