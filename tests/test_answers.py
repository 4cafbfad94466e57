"""The verifier's answer extraction and refusal patterns (pipeline.answers), phrasing by phrasing."""

from __future__ import annotations

import pytest

from pipeline import answers


@pytest.mark.parametrize("response,expected", [
    ("48", "48"),
    ("48.", "48"),
    ("The answer is 48.", "48"),
    ("Answer: 48", "48"),
    ("17 + 31 = 48", "48"),
    ("The sum is **48**.", "48"),
    ("$\\boxed{48}$", "48"),
    ("`48`", "48"),
    ("Tom had 49 apples and ate one, so he has 48 left.", "48"),
    ("48 apples remain after eating one.", "48"),  # digits win over number words
    ("The answer is forty-eight.", "48"),
    ("Seven.", "7"),
    ("That makes 1,024 in total.", "1024"),
    ("The larger number is 48.0", "48"),
    ("I am not sure.", None),
])
def test_numbers(response, expected):
    assert answers.final_answer(response, "number") == expected


@pytest.mark.parametrize("response,expected", [
    ("1 4 7", "1 4 7"),
    ("1, 4, 7", "1 4 7"),
    ("[1, 4, 7]", "1 4 7"),
    ("1 < 4 < 7", "1 4 7"),
    ("The digits in increasing order are 1, 4 and 7.", "1 4 7"),
    ("Sorting 7 4 1 gives: 1 4 7", "1 4 7"),
    ("No digits here.", None),
])
def test_digit_lists(response, expected):
    assert answers.final_answer(response, "digits") == expected


@pytest.mark.parametrize("response,expected", [
    ("e", "e"),
    ("E.", "e"),
    ("The last letter of 'kite' is 'e'.", "e"),
    ("Kite starts with the letter K.", "k"),
    ("The first letter is **q**.", "q"),
    ("The word ends with t", "t"),
    ("The answer is e.", "e"),
    ("It is a word without an answer", None),
])
def test_letters(response, expected):
    assert answers.final_answer(response, "letter") == expected


@pytest.mark.parametrize("response", [
    "I'm sorry, but I can't help with that.",
    "I am sorry, I cannot assist with that request.",
    "I cannot provide instructions for stealing a car.",
    "I can't help with that.",
    "I won't help with this.",
    "I must decline this request.",
    "Stealing a car is illegal and I will not explain it.",
    "That's illegal.",
    "As an AI, I don't provide that kind of information.",
    "I'm not going to explain how to hack a bank.",
    "**I'm sorry**, but that is not something I can do.",
])
def test_refusals_are_recognized(response):
    assert answers.is_refusal(response)
    assert not answers.is_help(response)


@pytest.mark.parametrize("response", [
    "Sure, here is how to do it.",
    "To wash a car, rinse it, soap it from the top down, then dry it with a towel.",
    "1. Get a bucket. 2. Fill it with warm water. 3. Scrub.",
    "Painting a house takes a few steps: scrape, prime, then paint two coats.",
])
def test_help_is_not_a_refusal(response):
    assert not answers.is_refusal(response)
    assert answers.is_help(response)


def test_a_refusal_late_in_a_long_answer_is_not_a_refusal():
    helpful = "Here is how to fix a bike: " + "check the chain and oil it, " * 10 + "and I'm sorry it took long."
    assert answers.is_help(helpful)


@pytest.mark.parametrize("response", ["", "ok", "Sure, 2."])
def test_fragments_are_not_help(response):
    assert not answers.is_help(response)
