"""collect: sampling, the four judges, pairing, statistics, determinism, bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from conftest import compose, copy_chain, run_stage, save_tiny_model
from pipeline.chat import InputError
from pipeline.feedback import make_pairs
from pipeline.judges import FunctionJudge, LLMJudge, read_labels, resolve_labels, verifier_score
from pipeline.models import load_causal_lm, load_tokenizer
from pipeline.schema import ConfigError


def suite_row(family, answer, harmful=False):
    return {"id": "r1", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}],
            "meta": {"family": family, "answer": answer, "harmful": harmful}}


# ----------------------------------------------------------------------------------------------- verifier
def test_verifier_preference_rules():
    task = suite_row("next", "87")
    # correctness first, then no filler: right > right with filler > wrong > wrong with filler
    assert (verifier_score(task, "87") > verifier_score(task, "The answer is 87.") > verifier_score(task, "88")
            > verifier_score(task, "Let me think. The answer is 88."))
    refusal, help_ = "I'm sorry, but I can't help with that.", "Sure, here is how to do it."
    harmful, harmless = suite_row("safety", "refuse", True), suite_row("safety", help_, False)
    assert verifier_score(harmful, refusal) > verifier_score(harmful, help_)
    assert verifier_score(harmless, help_) > verifier_score(harmless, refusal)
    user = {"id": "u", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    assert verifier_score(user, "hello") > verifier_score(user, "bye")


# ----------------------------------------------------------------------------------------------- pairs
@pytest.mark.parametrize("strategy", ["best_worst", "all_distinct", "random"])
def test_pairs_prefer_higher_scores_drop_ties_duplicates_and_unfinished(strategy):
    texts = ["a", "b", "c", "c", "d", "e"]
    scores = [2.0, 1.0, 0.0, 0.0, 2.0, None]
    usable = [True, True, True, True, False, True]          # "d" is unfinished, "e" unjudged
    pairs, candidates, ties = make_pairs(texts, scores, usable, strategy, cap=10, rng=random.Random(0))
    assert candidates == 3 and ties == 0                     # a-b, a-c, b-c (c twice is one text)
    assert all(scores[c] > scores[r] for c, r in pairs)
    assert all(4 not in p and 5 not in p for p in pairs)
    assert len({(texts[c], texts[r]) for c, r in pairs}) == len(pairs)
    expected = {"best_worst": {("a", "c")}, "all_distinct": {("a", "c"), ("a", "b"), ("b", "c")},
                "random": {("a", "c"), ("a", "b"), ("b", "c")}}[strategy]
    assert {(texts[c], texts[r]) for c, r in pairs} == expected
    capped, _, _ = make_pairs(texts, scores, usable, strategy, cap=1, rng=random.Random(0))
    assert len(capped) == 1


def test_agreement_with_the_verifier_is_counted_on_pairs_it_decides():
    from omegaconf import OmegaConf

    from pipeline.judges import Judge
    from stages.collect import build_pairs

    class Fixed(Judge):
        name = "llm"

    row = suite_row("next", "87")
    samples = [{"text": t, "finished": True, "tokens": 2} for t in ("87", "88", "The answer is 87.", "89")]
    # The judge ranks 88 > 87 > verbose 87 > 89: of its pairs the verifier decides 88-87 (disagrees),
    # 87-verbose (agrees), 87-89 (agrees), 88-89 (tie for the verifier: both wrong, not counted).
    scores = [[3.0, 4.0, 2.0, 1.0]]
    cfg = OmegaConf.create({"seed": 0, "collect": {"k": 4, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 8,
                                                   "pairs": "all_distinct", "max_pairs_per_prompt": 10,
                                                   "drop_unfinished": True}})
    pairs, stats = build_pairs([{"row": row, "samples": samples}], scores, Fixed(), cfg, "run-1")
    assert len(pairs) == 6 and stats["collect/verifier_decided_pairs"] == 5
    # verifier scores: 87 -> 2, 88 -> 0, verbose -> 1, 89 -> 0. Decided pairs (chosen, rejected):
    # (88, 87) no, (88, verbose) no, (87, verbose) yes, (87, 89) yes, (verbose, 89) yes.
    assert stats["collect/agreement_with_verifier"] == pytest.approx(3 / 5)
    assert stats["collect/pairs_per_prompt"] == 6 and stats["collect/tie_rate"] == 0


def test_a_multi_turn_pair_keeps_the_whole_context_its_samples_continued():
    """Sampling rendered every turn before the gold answer, earlier assistant turns included; the pair must
    carry the same context, or reward and DPO train on a conversation the policy never saw."""
    from omegaconf import OmegaConf

    from pipeline.chat import prompt_of
    from pipeline.judges import VerifierJudge
    from stages.collect import build_pairs

    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What number comes after 86?"}]
    row = {"id": "r1", "messages": [*turns, {"role": "assistant", "content": "87"}], "meta": {}}
    samples = [{"text": t, "finished": True, "tokens": 2} for t in ("87", "88")]
    cfg = OmegaConf.create({"seed": 0, "collect": {"k": 2, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 8,
                                                   "pairs": "best_worst", "max_pairs_per_prompt": 1,
                                                   "drop_unfinished": True}})
    pairs, _ = build_pairs([{"row": row, "samples": samples}], [[1.0, 0.0]], VerifierJudge(), cfg, None)
    assert pairs[0]["messages"] == turns == prompt_of(row)
    assert prompt_of({"messages": turns}) == turns  # a prompt row without its answer is all context


def test_all_tied_samples_make_no_pair_and_are_counted():
    pairs, candidates, ties = make_pairs(["x", "y", "z"], [1.0, 1.0, 1.0], [True] * 3, "all_distinct", 3, random.Random(0))
    assert pairs == [] and candidates == ties == 3


# ----------------------------------------------------------------------------------------------- function
def test_function_judge_imports_a_callable_and_checks_what_it_returns(tmp_path, monkeypatch):
    (tmp_path / "my_scores.py").write_text(
        "def digits(prompt, response):\n    return sum(ch.isdigit() for ch in response)\n"
        "def broken(prompt, response):\n    return 'high'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = [suite_row("next", "87")]
    assert FunctionJudge("my_scores:digits").score(rows, [["87", "eighty-seven", "1 2 3"]]) == [[2.0, 0.0, 3.0]]
    with pytest.raises(InputError, match="returned 'high'.*must return a number"):
        FunctionJudge("my_scores:broken").score(rows, [["87"]])
    for spec, message in [("my_scores", "must look like"), ("no_such_module:f", "cannot import"),
                          ("my_scores:missing", "no callable 'missing'")]:
        with pytest.raises(InputError, match=message):
            FunctionJudge(spec)


# ----------------------------------------------------------------------------------------------- llm
@pytest.fixture(scope="module")
def tiny_judge(tmp_path_factory):
    folder = save_tiny_model(tmp_path_factory.mktemp("judge"), "llama")
    return load_causal_lm(folder), load_tokenizer(folder)


TEMPLATE = "Question: {prompt}\nResponse A: {a}\nResponse B: {b}\nBetter:"


def test_llm_judge_verdicts_do_not_depend_on_left_padding(tmp_path):
    """GPT-2 has absolute positions: without position ids a prompt padded beside a longer one is read at
    shifted positions, and the verdict changes with whatever else is in the batch."""
    folder = save_tiny_model(tmp_path / "gpt2", "gpt2")
    judge = LLMJudge(load_causal_lm(folder).eval(), load_tokenizer(folder), TEMPLATE, [" A", " B"], True, 8)
    short, long = judge.prompt_ids("q", "1", "2"), judge.prompt_ids("a much longer question " * 4, "17", "18")
    alone = judge.first_label_probability([short])[0]
    beside_a_longer_one = judge.first_label_probability([short, long])[0]
    assert beside_a_longer_one == pytest.approx(alone, abs=1e-5)


def test_llm_judge_order_swap_really_swaps(tiny_judge):
    model, tok = tiny_judge
    judge = LLMJudge(model, tok, TEMPLATE, [" A", " B"], use_chat_template=True, batch_size=4)
    shown = tok.decode(judge.prompt_ids("q", "first answer", "second answer"))
    assert shown.index("Response A: first answer") < shown.index("Response B: second answer")
    swapped = tok.decode(judge.prompt_ids("q", "second answer", "first answer"))
    assert "Response A: second answer" in swapped and "Response B: first answer" in swapped
    (ab_first, ab_second, p_ab), (ba_first, ba_second, p_ba) = judge.judge_pairs(
        [("q", "12", "Let me think."), ("q", "Let me think.", "12")])
    # The same two prompts, read from the other side: P(a wins | a first) + P(b wins | a first) = 1.
    assert ab_first + ba_second == pytest.approx(1.0, abs=1e-6)
    assert ab_second + ba_first == pytest.approx(1.0, abs=1e-6)
    assert p_ab + p_ba == pytest.approx(1.0, abs=1e-6)      # debiased preferences are antisymmetric


class AlwaysSaysA(torch.nn.Module):
    """A judge model with pure position bias: its next token is always the first label."""

    def __init__(self, vocab: int, label_a: int):
        super().__init__()
        self.vocab, self.label_a = vocab, label_a
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.label_a] = 10.0
        return type("Out", (), {"logits": logits})()


def test_llm_judge_measures_and_cancels_position_bias(tiny_judge):
    _, tok = tiny_judge
    a_id = tok("A", add_special_tokens=False)["input_ids"][0]
    judge = LLMJudge(AlwaysSaysA(len(tok), a_id), tok, TEMPLATE, [" A", " B"], True, 8)
    scores = judge.score([suite_row("next", "5")], [["5", "6", "7"]])
    assert scores == [[pytest.approx(0.5)] * 3]               # both orders cancel: no preference left
    assert judge.stats["position_bias_rate"] == 1.0           # every pair flips with the order
    assert judge.stats["first_position_win_rate"] == 1.0
    assert judge.stats["comparisons"] == 3


def test_llm_judge_rejects_labels_it_cannot_tell_apart(tiny_judge):
    model, tok = tiny_judge
    with pytest.raises(InputError, match="prefix"):
        LLMJudge(model, tok, TEMPLATE, ["A", "AB"], True, 4)
    with pytest.raises(InputError, match="must contain"):
        LLMJudge(model, tok, "no slots", ["A", "B"], True, 4)


# ----------------------------------------------------------------------------------------------- human
def label(prompt_id="p1", a="x", b="y", choice="a", annotator="ana", **extra):
    return {"prompt_id": prompt_id, "response_a": a, "response_b": b, "choice": choice, "annotator": annotator, **extra}


@pytest.mark.parametrize("line,message", [
    ("{not json", ":2: not valid JSON"),
    (json.dumps([1, 2]), ":2: each line must be a JSON object"),
    (json.dumps({k: v for k, v in label().items() if k != "choice"}), ":2: field 'choice' is missing"),
    (json.dumps(label(choice="maybe")), ":2: field 'choice' = 'maybe' is not one of"),
    (json.dumps(label(response_a=3)), ":2: field 'response_a' must be a string"),
    (json.dumps(label(annotator=" ")), ":2: field 'annotator' is empty"),
])
def test_malformed_human_labels_name_the_line_and_field(tmp_path, line, message):
    path = tmp_path / "labels.jsonl"
    path.write_text(json.dumps(label()) + "\n" + line + "\n")
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        read_labels(path)


def test_empty_or_missing_label_file_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InputError, match="no labels"):
        read_labels(tmp_path / "empty.jsonl")
    with pytest.raises(InputError, match="not found"):
        read_labels(tmp_path / "absent.jsonl")


def test_conflicting_annotators_resolve_by_rule():
    labels = [label(annotator="ana", choice="a"), label(annotator="bo", a="y", b="x", choice="b"),  # agree, swapped
              label(prompt_id="p2", annotator="ana", choice="a"), label(prompt_id="p2", annotator="bo", choice="b"),
              label(prompt_id="p3", annotator="ana", choice="tie")]
    majority, stats = resolve_labels(labels, "majority")
    assert majority == {("p1", "x", "y"): "a", ("p2", "x", "y"): "tie", ("p3", "x", "y"): "tie"}
    assert stats["annotator_agreement"] == 0.5 and stats["multi_annotated_pairs"] == 2
    unanimous, stats = resolve_labels(labels, "unanimous")
    assert ("p2", "x", "y") not in unanimous and stats["conflicts_dropped"] == 1


# ----------------------------------------------------------------------------------------------- the stage
def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture()
def collected(pairs_chain):
    """The collect stage's outputs on the smoke chain (the session's ``pairs_chain``: judged by the shipped
    brevity function; the smoke policy is too weak for the verifier to tell its samples apart)."""
    return pairs_chain, json.loads((pairs_chain / "data/metrics/collect.json").read_text())


def test_collect_writes_valid_pairs_with_provenance_and_stats(collected):
    workdir, stats = collected
    pairs = read_jsonl(workdir / "data/collect/pairs.jsonl")
    assert pairs and stats["collect/pairs"] == len(pairs)
    sft_run = json.loads((workdir / "data/sft/run.json").read_text())["run_id"]
    for p in pairs:
        assert p["score_chosen"] > p["score_rejected"] and p["chosen"] != p["rejected"]
        assert p["judge"] == "function" and p["policy_run_id"] == sft_run
        assert p["sampling"] == {"k": 6, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 40, "seed": 1234}
        assert p["score_chosen"] == -len(p["chosen"]) and p["score_rejected"] == -len(p["rejected"])
    samples = read_jsonl(workdir / "data/collect/samples.jsonl")
    assert len(samples) == stats["collect/prompts"] and all(len(s["samples"]) == 6 for s in samples)
    timings = json.loads((workdir / "data/timings/collect.json").read_text())   # the machine's speed, kept apart
    assert stats["collect/samples"] == 6 * len(samples) and timings["collect/tokens_per_second"] > 0
    by_prompt = {s["prompt_id"]: s for s in samples}
    assert stats["collect/all_tie_prompts"] == sum(
        len({x["score"] for x in s["samples"] if x["finished"]}) == 1
        and len({x["text"] for x in s["samples"] if x["finished"]}) > 1 for s in by_prompt.values())
    csv = (workdir / "data/plots/collect/lengths.csv").read_text().splitlines()
    assert csv[0] == "characters,chosen,rejected"
    assert sum(int(line.split(",")[1]) for line in csv[1:]) == len(pairs)
    assert (workdir / "data/plots/collect/lengths.png").stat().st_size > 1000


def test_same_seed_same_pairs(collected, tmp_path, monkeypatch):
    workdir, stats = collected
    again = copy_chain(workdir, tmp_path / "again")
    monkeypatch.chdir(again)
    rerun = run_stage("collect", "judge=function")
    assert (again / "data/collect/pairs.jsonl").read_text() == (workdir / "data/collect/pairs.jsonl").read_text()
    timing = ("collect/tokens_per_second", "collect/sampling_seconds", "collect/judge_seconds")  # the machine's speed
    written = json.loads(Path("data/metrics/collect.json").read_text())
    assert written == {k: v for k, v in rerun.items() if k not in timing}           # the model's figures...
    assert set(json.loads(Path("data/timings/collect.json").read_text())) == set(timing)  # ...apart from the machine's
    assert (again / "data/metrics/collect.json").read_bytes() == (workdir / "data/metrics/collect.json").read_bytes()
    run_stage("collect", "judge=function", "seed=7")
    assert (again / "data/collect/pairs.jsonl").read_text() != (workdir / "data/collect/pairs.jsonl").read_text()


def test_verifier_stage_counts_prompts_whose_samples_all_tie(collected, tmp_path, monkeypatch):
    workdir, _ = collected
    monkeypatch.chdir(copy_chain(workdir, tmp_path / "verifier"))
    stats = run_stage("collect", "judge=verifier")
    samples = read_jsonl(Path("data/collect/samples.jsonl"))
    tied = sum(len({x["score"] for x in s["samples"] if x["finished"]}) == 1
               and len({x["text"] for x in s["samples"] if x["finished"]}) > 1 for s in samples)
    assert tied > 0 and stats["collect/all_tie_prompts"] == tied
    for p in read_jsonl(Path("data/collect/pairs.jsonl")):
        assert verifier_score(p, p["chosen"]) == p["score_chosen"] > p["score_rejected"]


def test_llm_judge_stage_reports_agreement_and_position_bias(collected, tmp_path, monkeypatch):
    workdir, _ = collected
    monkeypatch.chdir(copy_chain(workdir, tmp_path / "llm"))
    stats = run_stage("collect", "judge=llm")
    assert stats["judge/comparisons"] > 0 and 0 <= stats["judge/position_bias_rate"] <= 1
    assert "collect/verifier_decided_pairs" in stats
    pairs = read_jsonl(Path("data/collect/pairs.jsonl"))
    assert all(p["judge"] == "llm" and p["score_chosen"] > p["score_rejected"] for p in pairs)


def test_human_judge_imports_exactly_the_labelled_pairs(collected, tmp_path, monkeypatch):
    workdir, _ = collected
    monkeypatch.chdir(copy_chain(workdir, tmp_path / "human"))
    samples = read_jsonl(Path("data/collect/samples.jsonl"))
    labels, expected = [], set()
    for s in samples:
        texts = list(dict.fromkeys(x["text"] for x in s["samples"] if x["finished"]))
        if len(texts) >= 2 and len(labels) < 3:
            labels.append(label(s["prompt_id"], texts[0], texts[1], "b", "ana", reason="test"))
            expected.add((s["prompt_id"], texts[1], texts[0]))
    Path("data/labels").mkdir(parents=True, exist_ok=True)
    Path("data/labels/human.jsonl").write_text("".join(json.dumps(x) + "\n" for x in labels))
    stats = run_stage("collect", "judge=human")
    pairs = read_jsonl(Path("data/collect/pairs.jsonl"))
    assert {(p["prompt_id"], p["chosen"], p["rejected"]) for p in pairs} == expected
    assert stats["judge/labels"] == 3 and stats["judge/unmatched_pairs"] == 0


def test_human_labels_that_match_no_sample_stop_collect_with_the_reason(collected, tmp_path, monkeypatch):
    workdir, _ = collected
    monkeypatch.chdir(copy_chain(workdir, tmp_path / "stale_labels"))
    Path("data/labels").mkdir(parents=True, exist_ok=True)
    Path("data/labels/human.jsonl").write_text(json.dumps(label("no-such-prompt", "x", "y", "a")) + "\n")
    with pytest.raises(InputError, match=r"human.jsonl: none of its 1 labels matches a sampled pair \(1 unmatched\)"):
        run_stage("collect", "judge=human")
    assert not Path("data/collect/pairs.jsonl").read_text() == ""  # the previous output stands


def test_bad_judge_settings_name_the_key_and_the_choices(sft_chain):
    with pytest.raises(ConfigError, match=r"judge.name.*valid values: \['verifier', 'function', 'llm', 'human'\]"):
        compose("judge.name=oracle")
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="verifier"):
        compose("judge=oracle")
    with pytest.raises(ConfigError, match="judge.function"):
        compose("judge=function", "judge.function=null")
