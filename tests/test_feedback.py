"""Your own preference feedback (collect.source=files): every accepted format, the errors, and the chain on it.

The fixture writes one small preference file per format from the embedded suite's prompts (the smoke chain's
prompts split): the gold answer is the preferred response, a wordy wrong one the rejected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import copy_chain, run_stage
from pipeline.chat import InputError
from pipeline.feedback import parse_row, read_feedback, to_pairs, to_unpaired

FORMATS = ("standard", "conversational", "implicit_prompt", "scored_rows", "completions")
UNPAIRED_FORMATS = ("unpaired", "unpaired_conversational")   # thumbs up / down: dpo.loss=kto only


def suite_prompts(chain: Path, n: int = 24) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in (chain / "data" / "prepare" / "prompts.jsonl").read_text().splitlines()]
    out = []
    for row in rows:
        gold = row.get("meta", {}).get("gold") or row["messages"][-1]["content"]
        question = next(m["content"] for m in row["messages"] if m["role"] == "user")
        if gold and question:
            out.append((question, gold))
    return out[:n]


def write_format(kind: str, prompts: list[tuple[str, str]], path: Path) -> Path:
    """One preference file in format ``kind`` (the README's mapping, written as a user's export would be)."""
    user = lambda q: [{"role": "user", "content": q}]                    # noqa: E731
    said = lambda a: [{"role": "assistant", "content": a}]                # noqa: E731
    wrong = "Let me think about it for a while. I am not sure, maybe something else."
    rows = []
    for i, (q, gold) in enumerate(prompts):
        if kind == "standard":
            rows.append({"prompt": q, "chosen": gold, "rejected": wrong, "margin": 1.0 + i % 3})
        elif kind == "conversational":
            rows.append({"prompt": user(q), "chosen": said(gold), "rejected": said(wrong)})
        elif kind == "implicit_prompt":
            rows.append({"chosen": user(q) + said(gold), "rejected": user(q) + said(wrong)})
        elif kind == "scored_rows":
            rows += [{"prompt": q, "response": gold, "score": 9.0}, {"prompt": q, "response": wrong, "score": 2.0},
                     {"prompt": q, "response": "No idea.", "score": 2.0}]   # ties the wrong one: that is no pair
        elif kind == "completions":
            rows.append({"prompt": q, "completions": [{"response": gold, "score": 1}, {"response": wrong, "score": 0}]})
        elif kind == "unpaired":       # a product's log: one answer per request, not every request both ways
            rows.append({"prompt": q, "completion": gold, "label": True} if i % 3 else
                        {"prompt": q, "completion": wrong, "label": False})
        elif kind == "unpaired_conversational":
            rows += [{"prompt": user(q), "completion": said(gold), "label": 1},
                     {"prompt": user(q), "completion": said(wrong), "label": 0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_each_format_becomes_the_same_pairs(tmp_path):
    prompts = [("What number comes after 4?", "5"), ("Sort the digits 3 1 2.", "1 2 3")]
    found = {}
    for kind in FORMATS:
        rows, skipped = read_feedback(write_format(kind, prompts, tmp_path / f"{kind}.jsonl"))
        pairs, stats = to_pairs(rows, "all_distinct", 4, seed=0)
        assert not skipped and all(p["judge"] == "file" and p["source"].startswith(str(tmp_path)) for p in pairs)
        found[kind] = sorted((p["messages"][-1]["content"], p["chosen"], p["rejected"]) for p in pairs
                             if p["rejected"] != "No idea.")             # scored rows: gold also beats "No idea."
    assert all(v == found["standard"] for v in found.values())           # one set of pairs, whatever the format
    assert len(found["standard"]) == 2
    rows, _ = read_feedback(tmp_path / "scored_rows.jsonl")
    pairs, stats = to_pairs(rows, "all_distinct", 4, seed=0)
    assert stats["scored_ties"] == 2 and stats["scored_candidate_pairs"] == 6   # per prompt: 3 candidates, 1 tie
    assert len(pairs) == 4 and {(p["score_chosen"], p["score_rejected"]) for p in pairs} == {(9.0, 2.0)}
    assert pairs[0]["source"] == f"{tmp_path / 'scored_rows.jsonl'}:1 + {tmp_path / 'scored_rows.jsonl'}:2"
    rows, _ = read_feedback(tmp_path / "standard.jsonl")
    assert [p["score_chosen"] - p["score_rejected"] for p in to_pairs(rows, "all_distinct", 4, 0)[0]] == [1.0, 2.0]


def test_every_format_is_also_unpaired_feedback_and_unpaired_rows_make_no_pairs(tmp_path):
    prompts = [("What number comes after 4?", "5"), ("Sort the digits 3 1 2.", "1 2 3")]
    expected = sorted((q, answer, good) for q, gold in prompts for answer, good in
                      ((gold, True), ("Let me think about it for a while. I am not sure, maybe something else.", False)))
    for kind in (*FORMATS, "unpaired_conversational"):
        rows, _ = read_feedback(write_format(kind, prompts, tmp_path / f"{kind}.jsonl"))
        unpaired = to_unpaired(rows, desirable_score=5.0 if kind == "scored_rows" else 1.0)   # on each file's scale
        got = sorted((u["messages"][-1]["content"], u["completion"], u["label"]) for u in unpaired
                     if u["completion"] != "No idea.")
        assert got == expected, kind                              # each answer once, with its label
        assert all(u["source"].startswith(f"{tmp_path / kind}.jsonl:") and u["judge"] == "file" for u in unpaired)
    pairs, stats = to_pairs(rows, "all_distinct", 4, seed=0)
    assert not pairs and stats["unpaired_rows"] == 4               # thumbs up / down rows are not pairs
    rows, _ = read_feedback(write_format("scored_rows", prompts, tmp_path / "s.jsonl"))
    assert {u["score"]: u["label"] for u in to_unpaired(rows, 2.0)} == {9.0: True, 2.0: True}   # at the line: desirable


def test_parquet_an_hf_dataset_folder_and_a_folder_of_files_are_read(tmp_path):
    from datasets import Dataset

    rows = [{"prompt": "What number comes after 4?", "chosen": "5", "rejected": "I think 7."}]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "pairs.parquet"))
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "dataset"))
    for path in (tmp_path / "pairs.parquet", tmp_path / "dataset"):
        parsed, _ = read_feedback(path)
        assert parsed[0]["chosen"] == "5" and parsed[0]["source"] == f"{path}:1"
    folder = tmp_path / "many"
    folder.mkdir()
    (folder / "a.jsonl").write_text(json.dumps(rows[0]) + "\n")
    (folder / "b.jsonl").write_text(json.dumps({**rows[0], "prompt": "Next after 5?", "chosen": "6"}) + "\n")
    assert [r["source"] for r in read_feedback(folder)[0]] == [f"{folder / 'a.jsonl'}:1", f"{folder / 'b.jsonl'}:1"]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "q", "chosen": "a"}, "field 'rejected' is missing"),
    ({"prompt": "q", "chosen": "a", "rejected": "a"}, "the same response"),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "field 'chosen' is empty"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "field 'prompt' must be a string or a list"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}], "chosen": "a",
      "rejected": "b"}, "must end with a user turn"),
    ({"prompt": [{"role": "human", "content": "q"}], "chosen": "a", "rejected": "b"}, "field 'prompt[0].role' = 'human'; valid"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "assistant turns only"),
    ({"chosen": "q a", "rejected": "q b"}, "field 'prompt' is missing"),
    ({"chosen": [{"role": "user", "content": "q"}], "rejected": [{"role": "user", "content": "r"}]}, "share no turns"),
    ({"prompt": "q", "response": "a"}, "field 'score' is missing"),
    ({"prompt": "q", "response": "a", "score": "high"}, "field 'score' must be a number"),
    ({"prompt": "q", "completions": [{"response": "a"}]}, "completions[0].score"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": True}, "field 'margin' must be a number"),
    ({"prompt": "q", "completion": "a", "label": "yes"}, "field 'label' must be true or false"),
    ({"prompt": "q", "completion": "a", "label": 2}, "field 'label' must be true or false"),
    ({"prompt": "q", "completion": "a"}, "field 'label' is missing"),
    ({"completion": "a", "label": True}, "field 'prompt' is missing"),
    ({"prompt": "q", "completion": [{"role": "user", "content": "a"}], "label": True},
     "field 'completion' must hold assistant turns only"),
    ({"text": "q"}, "no feedback fields"),
])
def test_a_malformed_row_is_named_by_file_line_and_field(tmp_path, row, message):
    path = tmp_path / "feedback.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(InputError, match=f"^{path}:2: .*" + message.replace("[", r"\[").replace("]", r"\]")):
        read_feedback(path)
    rows, skipped = read_feedback(path, on_bad_row="skip")
    assert len(rows) == 1 and sum(skipped.values()) == 1


def test_parse_row_keeps_a_conversation_and_joins_assistant_turns():
    row = parse_row({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}],
                     "chosen": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}],
                     "rejected": "c"}, "f:1")
    assert row["messages"][0]["role"] == "system" and row["chosen"] == "a\n\nb" and row["margin"] is None


@pytest.mark.slow
@pytest.mark.parametrize("kind", FORMATS)
def test_each_format_goes_through_collect_reward_and_dpo(sft_chain, tmp_path, monkeypatch, kind):
    work = copy_chain(sft_chain, tmp_path / "chain")
    monkeypatch.chdir(work)
    feedback = write_format(kind, suite_prompts(work), work / "data" / "feedback.jsonl")
    stats = run_stage("collect", "collect.source=files", f"collect.files={feedback}")
    pairs = [json.loads(line) for line in Path("data/collect/pairs.jsonl").read_text().splitlines()]
    assert stats["collect/pairs"] == len(pairs) == (48 if kind == "scored_rows" else 24)
    assert all(p["source"].startswith(f"{feedback}:") for p in pairs)
    assert stats["collect/chosen_length"] < stats["collect/rejected_length"]
    reward = run_stage("reward")
    assert reward["val/accuracy"] > 0.5                       # the preferred (gold) answers are learnable
    dpo = run_stage("dpo")
    assert dpo["val/rewards/margin"] > dpo["val/rewards/margin_before"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", UNPAIRED_FORMATS)
def test_unpaired_feedback_goes_through_collect_and_dpo_kto(sft_chain, tmp_path, monkeypatch, kind):
    """Thumbs-up/down rows give no pairs (reward and the pair losses have nothing to learn, and say so) but train
    KTO: the desirable (gold) answers gain on the undesirable ones on held-out prompts."""
    work = copy_chain(sft_chain, tmp_path / "chain")
    monkeypatch.chdir(work)
    feedback = write_format(kind, suite_prompts(work), work / "data" / "feedback.jsonl")
    stats = run_stage("collect", "collect.source=files", f"collect.files={feedback}")
    unpaired = [json.loads(line) for line in Path("data/collect/unpaired.jsonl").read_text().splitlines()]
    assert stats["collect/pairs"] == 0 and stats["collect/unpaired"] == len(unpaired) == (24 if kind == "unpaired" else 48)
    with pytest.raises(InputError, match="data/collect/pairs.jsonl: no preference pairs"):
        run_stage("reward")
    dpo = run_stage("dpo", "dpo.loss=kto", "dpo.beta=0.1", "dpo.lr=1e-3")
    assert dpo["val/rewards/margin"] > dpo["val/rewards/margin_before"] and dpo["val/loss"] < dpo["val/loss_before"]
