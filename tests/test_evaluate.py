"""evaluate: metrics on fixed generations computed by hand; prompts; the report."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.evaluation import PromptBuilder, Variant, annotate, summarize
from pipeline.judges import verifier_correct
from pipeline.models import build_char_tokenizer
from pipeline.report import render_markdown


def record(family, response, correct, held_template=False, held_family=False, harmful=False, nll=1.0, tokens=2):
    return {"id": f"{family}-{response}", "family": family, "prompt": "p", "gold": "r", "response": response,
            "finished": True, "correct": correct, "held_out_template": held_template, "held_out_family": held_family,
            "harmful": harmful, "nll": nll, "ref_tokens": tokens}


def test_metrics_on_fixed_generations_match_hand_computation():
    records = [
        record("apples", "12", True),                                              # seen template, concise, right
        record("apples", "Let me think. The answer is 13.", False, held_template=True),  # verbose, wrong
        record("max", "the answer is 7", True, held_template=True),            # verbose, right
        record("min", "3", False, held_family=True),
        record("safety", "I'm sorry, but I can't help with that.", True, harmful=True, nll=3.0, tokens=4),
        record("safety", "I'm sorry, but I can't help with that.", False, harmful=False),
        record("safety", "Sure, here is how to wash a car.", True, harmful=False),
    ]
    annotate(records)
    m = summarize(records, {"new_tokens": 70, "seconds": 2.0})
    assert m["test/accuracy"] == round(4 / 7, 4)
    assert m["test/accuracy_seen_templates"] == 1.0                  # the one seen-template task row is right
    assert m["test/accuracy_held_out_templates"] == 0.5              # add wrong, max right
    assert m["test/accuracy_held_out_family"] == 0.0
    assert m["test/accuracy_safety"] == round(2 / 3, 4)
    assert m["test/refusal_harmful"] == 1.0
    assert m["test/refusal_harmless"] == round(1 / 6, 4)             # one refusal among six harmless rows
    assert m["test/concise_rate"] == 0.5                             # "12" and "3" of four task responses
    total_chars = sum(len(r["response"]) for r in records)
    assert m["test/response_length"] == round(total_chars / 7, 4)
    assert m["test/perplexity"] == round(math.exp((6 * 1.0 + 3.0) / (6 * 2 + 4)), 4)
    assert m["test/tokens_per_second"] == 35.0


def test_score_uses_the_checker_for_suite_rows_and_exact_match_for_user_rows():
    def row(meta, gold):
        return {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": gold}], "meta": meta}

    assert verifier_correct(row({"family": "apples", "answer": "5"}, "5"), "the answer is 5.")
    assert not verifier_correct(row({"family": "apples", "answer": "5"}, "5"), "6")
    assert verifier_correct(row({"source": "f:1"}, "Paris"), " Paris ")
    assert not verifier_correct(row({"source": "f:1"}, "Paris"), "Lyon")


def test_few_shot_prompts_use_same_family_preferred_examples_and_fit_the_context():
    tok = build_char_tokenizer()
    train = [
        {"messages": [{"role": "user", "content": f"Add {i} and 1."}, {"role": "assistant", "content": str(i + 1)}],
         "meta": {"family": "apples", "style": "concise"}} for i in range(5)
    ] + [{"messages": [{"role": "user", "content": "Add 9 and 9."},
                       {"role": "assistant", "content": "Sure! ... the answer is 18."}],
          "meta": {"family": "apples", "style": "verbose"}}]
    row = {"messages": [{"role": "user", "content": "Add 2 and 2."}, {"role": "assistant", "content": "4"}],
           "meta": {"family": "apples"}}
    builder = PromptBuilder(tok, Variant("few", "data/base", "plain", 3), train, seed=0, context=256, max_new_tokens=20)
    text = tok.decode(builder.prompt(row, 0))
    assert text.count("<s>Q: Add") == 4 and text.endswith("<s>Q: Add 2 and 2.\nA: ")
    assert "the answer is" not in text  # dispreferred demonstrations are never shown
    assert builder.prompt(row, 0) == builder.prompt(row, 0)
    tight = PromptBuilder(tok, Variant("few", "data/base", "plain", 3), train, seed=0, context=60, max_new_tokens=20)
    assert len(tight.prompt(row, 0)) + 20 <= 60
    chat = PromptBuilder(tok, Variant("sft", "data/sft", "chat"), train, seed=0, context=256, max_new_tokens=20)
    assert tok.decode(chat.prompt(row, 0)) == "<s><|user|>Add 2 and 2.<|assistant|>"
    full, n_prompt = chat.with_gold(row, chat.prompt(row, 0))
    assert tok.decode(full[n_prompt:]) == "4</s>"


def test_report_lists_every_variant_and_samples():
    records = [dict(record("apples", "12", True), variant=v) for v in ("base_few_shot", "sft")]
    text = render_markdown({"base_few_shot": {"test/accuracy": 0.1}, "sft": {"test/accuracy": 0.6}}, records)
    assert "| accuracy | 10.0% | 60.0% |" in text and "- sft: `12` ok" in text


def test_pairwise_win_rate_asks_both_orders_and_cancels_position_bias():
    from pipeline.evaluation import pairwise_win_rate

    ids = ["0", "1", "2", "3"]
    mine = {"0": "good", "1": "bad", "2": "same", "3": "good"}
    sft = {"0": "bad", "1": "good", "2": "same", "3": "good"}
    fair = lambda i, a, b: 1.0 if (a, b) == ("good", "bad") else 0.0 if (a, b) == ("bad", "good") else 0.5
    out = pairwise_win_rate(ids, mine, sft, fair)
    assert {k: v for k, v in out.items() if "_ci_" not in k} == {
        "win_rate": (1 + 0 + 0.5 + 0.5) / 4, "decisive_win_rate": 0.5, "tie_rate": 0.5, "position_consistency": 1.0}
    assert out["win_rate_ci_low"] < 0.5 < out["win_rate_ci_high"]
    first_wins = lambda i, a, b: 1.0          # a judge that always prefers the answer shown first
    biased = pairwise_win_rate(ids, mine, sft, first_wins)
    assert biased["win_rate"] == 0.5 and biased["tie_rate"] == 1.0 and biased["position_consistency"] == 0.0
    # asked in one order only, this judge would give the variant a 100% win rate


def test_chain_of_thought_prompts_show_worked_steps_for_the_same_family():
    from pipeline import suite

    tok = build_char_tokenizer()
    ex = suite.make_example("last", 0, __import__("random").Random(3))
    train = [{"messages": [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.answer}],
              "meta": {"family": "last", "style": "concise", "key": ex.key, "answer": ex.answer}}]
    row = {"messages": [{"role": "user", "content": "What is the last letter of kite?"},
                        {"role": "assistant", "content": "e"}], "meta": {"family": "last"}}
    builder = PromptBuilder(tok, Variant("base_cot", "data/base", "plain", 1, cot=True), train, 0, 256, 20)
    text = tok.decode(builder.prompt(row, 0))
    word = ex.inputs["w"]
    assert f"A: The word {word} ends with {ex.answer}. The answer is {ex.answer}.</s>" in text
    assert text.endswith("Q: What is the last letter of kite?\nA: ")
    assert suite.is_correct("last", "e", False, "The word kite ends with e. The answer is e.")


def test_html_report_is_self_contained_and_shows_every_variant(tmp_path):
    from pipeline.report import render_html

    results = {"sft": {"test/accuracy": 0.5, "test/reward_score": 0.2},
               "dpo": {"test/accuracy": 0.6, "test/kl_to_sft": 0.1, "test/reward_score": 0.4, "test/win_rate_vs_sft": 0.7}}
    records = [dict(record("apples", "12", v == "dpo"), variant=v) for v in results]
    plots = tmp_path / "plots"
    (plots / "dpo").mkdir(parents=True)
    (plots / "dpo" / "loss.json").write_text('[{"step": 0, "train/loss": 1.0, "train/rewards/margin": 0.0}, '
                                             '{"step": 10, "train/loss": 0.5, "train/rewards/margin": 0.3}]')
    page = render_html(results, records, plots)
    assert page.count("<svg") == 3                       # accuracy, reward vs KL, dpo's training curve
    assert not any(tag in page for tag in ("<script", "src=", "<link", 'href="http'))  # nothing to fetch
    assert render_html(results, records, plots) == page   # deterministic: same data, same bytes
    assert "<th>sft</th><th>dpo</th>" in page and "<td>60.0%</td>" in page and "win rate vs SFT" in page


def test_win_rate_against_sft_counts_wins_ties_and_losses_by_hand():
    from pipeline.evaluation import win_rates

    rows = {str(i): {"id": str(i), "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "5"}],
                     "meta": {"family": "next", "answer": "5"}} for i in range(4)}
    mine = [{"id": "0", "response": "5"}, {"id": "1", "response": "5"}, {"id": "2", "response": "6"},
            {"id": "3", "response": "The answer is 5."}]
    sft = [{"id": "0", "response": "The answer is 5."}, {"id": "1", "response": "5"}, {"id": "2", "response": "5"},
           {"id": "3", "response": "7"}]
    # concise beats verbose (win), same (tie), wrong vs right (loss), verbose-right vs wrong (win)
    m = win_rates(mine, sft, rows)
    assert m["test/win_rate_vs_sft"] == (2 + 0.5) / 4
    assert m["test/decisive_win_rate_vs_sft"] == round(2 / 3, 4) and m["test/tie_rate_vs_sft"] == 0.25
    # its bootstrap interval over the four prompts' scores (1, 0.5, 0, 1): within their range, around the mean
    assert 0.0 <= m["test/win_rate_vs_sft_ci_low"] < 0.625 < m["test/win_rate_vs_sft_ci_high"] <= 1.0


def test_kl_to_reference_is_zero_against_itself_and_matches_an_unpadded_computation():
    import torch
    from omegaconf import OmegaConf

    from pipeline.evaluation import EvalModule, Generation
    from pipeline.models import build_causal_lm, render_ids

    tok = build_char_tokenizer()
    arch = OmegaConf.create(dict(type="llama", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                                 max_position=256, dropout=0.0))
    model, other = build_causal_lm(arch, tok, 0).eval(), build_causal_lm(arch, tok, 1).eval()
    cfg = Generation(max_new_tokens=4, batch_size=2, seed=0)
    builder = PromptBuilder(tok, Variant("dpo", "data/dpo", "chat"), [], 0, 256, 4)
    prompts = [render_ids(tok, [{"role": "user", "content": q}], True) for q in ("Hi", "What number comes after 4?")]
    responses = [tok("ok", add_special_tokens=False)["input_ids"], tok("5", add_special_tokens=False)["input_ids"]]
    module = EvalModule(model, tok, builder, cfg)
    assert all(abs(kl) < 1e-6 for kl, _ in module.kl_to_reference(model, prompts, responses))
    kls = module.kl_to_reference(other, prompts, responses)
    p, r = prompts[1], responses[1]   # by hand, unpadded
    with torch.no_grad():
        a = torch.log_softmax(model(input_ids=torch.tensor([p + r])).logits[0], -1)[len(p) - 1:len(p) - 1 + len(r)]
        b = torch.log_softmax(other(input_ids=torch.tensor([p + r])).logits[0], -1)[len(p) - 1:len(p) - 1 + len(r)]
    assert kls[1][0] == pytest.approx(float((a.exp() * (a - b)).sum()), rel=1e-4) and kls[1][1] == len(r)


def test_gold_response_perplexity_does_not_depend_on_left_padding(tmp_path):
    """Teacher-forced NLL of a gold response alone and batched beside a longer prompt (GPT-2: absolute
    positions) must agree: the test perplexity must not depend on how rows are batched."""
    from conftest import save_tiny_model
    from pipeline.evaluation import EvalModule, Generation
    from pipeline.models import load_causal_lm, load_tokenizer, render_ids

    folder = save_tiny_model(tmp_path / "gpt2", "gpt2")
    model, tok = load_causal_lm(folder).eval(), load_tokenizer(folder)
    builder = PromptBuilder(tok, Variant("sft", str(folder), "chat"), [], 0, 256, 4)
    module = EvalModule(model, tok, builder, Generation(max_new_tokens=4, batch_size=2, seed=0))
    rows = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            for q, a in (("Hi", "ok"), ("What number comes after 86? Answer with the number only.", "87"))]
    pairs = [(render_ids(tok, m), len(render_ids(tok, m[:1], True))) for m in rows]
    alone, _ = module.gold_nll(pairs[:1])
    batched, _ = module.gold_nll(pairs)
    assert batched[0] == pytest.approx(alone[0], abs=1e-4)


def test_reward_win_rate_counts_wins_and_half_ties():
    from pipeline.evaluation import reward_win_rate

    assert reward_win_rate(torch.tensor([1.0, 2.0, 3.0, 5.0]), torch.tensor([0.0, 2.0, 4.0, 1.0])) == (1 + 0.5 + 0 + 1) / 4
