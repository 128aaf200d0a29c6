"""Stage-1 rules: each with a case that fires and a case that must not."""

import pytest

from babelsynth.filters import Candidate, check_recaption, extract_tag, rule_gt_contradiction, rule_missing_tag
from babelsynth.filters import rule_prompt_echo, rule_refusal, rule_truncated, make_rule_empty


def cand(text, raw=None, finish="stop", q="How many dogs are in the picture?", gt="3"):
    return Candidate(raw if raw is not None else f"<answer>{text}</answer>", text, finish, q, gt)


GOOD = "There are three dogs sitting on the grass in the picture, so the answer is 3."


def test_good_recaption_passes_every_rule():
    assert check_recaption(cand(GOOD)) == []


@pytest.mark.parametrize("text", ["I'm sorry, I cannot help with that.", "As an AI, I cannot see images.",
                                  "I am unable to view the image provided."])
def test_refusal_fires(text):
    assert rule_refusal(cand(text)) == "refusal"


def test_refusal_quiet_on_normal_text():
    assert rule_refusal(cand("The shop sign reads OPEN in large green letters.")) is None
    assert rule_refusal(cand(GOOD)) is None


@pytest.mark.parametrize("text", ["Given the reference answer, there are 3 dogs.", "The original caption says a dog.",
                                  "Based on the ground truth the count is 3."])
def test_prompt_echo_fires_on_template_words(text):
    assert rule_prompt_echo(cand(text)) == "prompt_echo"


def test_prompt_echo_fires_on_long_verbatim_instruction():
    q = "Look at the photograph carefully and tell me how many brown dogs are sitting on the green grass"
    text = "Sure: look at the photograph carefully and tell me how many brown dogs are sitting, it is 3."
    assert rule_prompt_echo(cand(text, q=q)) == "prompt_echo"
    assert rule_prompt_echo(cand(GOOD, q=q)) is None


def test_truncated_uses_finish_reason():
    assert rule_truncated(cand(GOOD, finish="length")) == "truncated"
    assert rule_truncated(cand(GOOD, finish="stop")) is None


def test_missing_tag():
    assert rule_missing_tag(cand(GOOD, raw=GOOD)) == "missing_answer_tag"
    assert rule_missing_tag(cand(GOOD)) is None


def test_empty_output():
    rule = make_rule_empty(3)
    assert rule(cand("  ")) == "empty_output"
    assert rule(cand("Three.")) == "empty_output"
    assert rule(cand(GOOD)) is None


@pytest.mark.parametrize("text,gt,fires", [
    ("There are six people in the photo.", "5", True),
    ("I count 5 people standing in a row.", "5", False),
    ("Five people are standing in a row.", "5", False),
    ("No, the light is not on.", "yes", True),
    ("Yes, the light is on.", "yes", False),
    ("The bar labelled C is the tallest.", "C", False),
])  # fmt: skip
def test_gt_contradiction(text, gt, fires):
    assert (rule_gt_contradiction(cand(text, gt=gt)) == "gt_contradiction") is fires


def test_extract_tag_takes_rest_when_unclosed():
    assert extract_tag("x <answer> a b", "answer") == "a b"
    assert extract_tag("no tag", "answer") is None
    assert extract_tag("<translation>Bonjour</translation> trailing", "translation") == "Bonjour"
