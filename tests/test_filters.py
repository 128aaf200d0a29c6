"""Stage-1 rules: each with a case that fires and a case that must not."""

import pytest

from babelsynth.filters import (
    Candidate,
    check_recaption,
    extract_tag,
    make_rule_empty,
    merge_task_stats,
    rule_gt_contradiction,
    rule_missing_tag,
    rule_prompt_echo,
    rule_refusal,
    rule_repetition_loop,
    rule_truncated,
    task_stats,
)


def cand(text, raw=None, finish="stop", q="How many dogs are in the picture?", gt="3"):
    return Candidate(raw if raw is not None else f"<answer>{text}</answer>", text, finish, q, gt)


GOOD = "There are three dogs sitting on the grass in the picture, so the answer is 3."


def test_good_recaption_passes_every_rule():
    assert check_recaption(cand(GOOD)) == []


@pytest.mark.parametrize(
    "text",
    [
        "I'm sorry, I cannot help with that.",
        "As an AI, I cannot see images.",
        "I am unable to view the image provided.",
    ],
)
def test_refusal_fires(text):
    assert rule_refusal(cand(text)) == "refusal"


def test_refusal_quiet_on_normal_text():
    assert rule_refusal(cand("The shop sign reads OPEN in large green letters.")) is None
    assert rule_refusal(cand(GOOD)) is None


@pytest.mark.parametrize(
    "text",
    [
        "Given the reference answer, there are 3 dogs.",
        "The original caption says a dog.",
        "Based on the ground truth the count is 3.",
    ],
)
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


@pytest.mark.parametrize(
    "text,gt,fires",
    [
        ("There are six people in the photo.", "5", True),
        ("I count 5 people standing in a row.", "5", False),
        ("Five people are standing in a row.", "5", False),
        ("No, the light is not on.", "yes", True),
        ("Yes, the light is on.", "yes", False),
        ("The bar labelled C is the tallest.", "C", False),
    ],
)
def test_gt_contradiction(text, gt, fires):
    assert (rule_gt_contradiction(cand(text, gt=gt)) == "gt_contradiction") is fires


def test_extract_tag_takes_rest_when_unclosed():
    assert extract_tag("x <answer> a b", "answer") == "a b"
    assert extract_tag("no tag", "answer") is None
    assert extract_tag("<translation>Bonjour</translation> trailing", "translation") == "Bonjour"


@pytest.mark.parametrize(
    "text,gt,fires",
    [
        ("The answer is B because the bar is the tallest.", "C", True),
        ("B) shows the tallest bar.", "(C)", True),
        ("The answer is (C): that bar is the tallest.", "C", False),
        ("Option C shows it, not option A.", "C.", False),  # the GT letter is among the picks
        ("The answer is a red square.", "C", False),  # the article "a" is not an option letter
        ("The tallest bar is the third one.", "C", False),  # no pick named: nothing to contradict
    ],
)
def test_gt_contradiction_multiple_choice_letter(text, gt, fires):
    assert (rule_gt_contradiction(cand(text, gt=gt)) == "gt_contradiction") is fires


def test_repetition_loop():
    loop = "the red square is " * 12
    assert rule_repetition_loop(cand(loop)) == "repetition_loop"
    assert rule_repetition_loop(cand(GOOD)) is None
    assert rule_repetition_loop(cand("yes yes yes yes")) is None  # too short to call a loop
    assert "repetition_loop" in check_recaption(cand(loop))


def test_refusal_fires_on_apologies():
    assert rule_refusal(cand("I apologize, but the picture is too dark to count.")) == "refusal"


def test_prompt_echo_quiet_on_the_plain_answer():
    assert rule_prompt_echo(cand("The original shape is a circle drawn in red ink.")) is None


def test_task_stats_merge_sums_counters_and_recomputes_ratios():
    a = task_stats(
        {
            "vqa": {
                "records": 4,
                "stage1_dropped": 1,
                "measured": 3,
                "words_before": 3,
                "words_after": 60,
                "mtld_after_sum": 90.0,
                "mtld_after_n": 3,
            }
        }
    )
    b = task_stats(
        {
            "vqa": {
                "records": 6,
                "stage1_dropped": 0,
                "measured": 6,
                "words_before": 6,
                "words_after": 60,
                "mtld_after_sum": 60.0,
                "mtld_after_n": 6,
            },
            "ocr": {"records": 2, "stage1_dropped": 2, "measured": 0, "words_before": 0, "words_after": 0},
        }
    )
    assert a["vqa"]["stage1_drop_rate"] == 0.25 and a["vqa"]["words_after_mean"] == 20.0
    assert b["all"]["records"] == 8 and b["ocr"]["words_before_mean"] is None  # nothing measured: no mean
    acc = merge_task_stats(merge_task_stats({}, a), b)
    assert acc["vqa"]["records"] == 10 and acc["vqa"]["stage1_drop_rate"] == 0.1  # not 0.25 + 0.0
    assert acc["vqa"]["words_after_mean"] == round(120 / 9, 4) and acc["vqa"]["mtld_after_mean"] == round(
        150 / 9, 4
    )
    assert acc["all"]["records"] == 12 and acc["all"]["stage1_drop_rate"] == 0.25


def test_runner_merges_by_task_into_the_manifest_stats():
    from babelsynth.runner import merge_stats

    shard = {
        "in": 4,
        "out": 3,
        "rejected": 1,
        "seconds": 1.0,
        "reasons": {"refusal": 1},
        "by_lang": {},
        "requests_sent": 5,
        "by_task": task_stats({"vqa": {"records": 4, "stage1_dropped": 1}}),
    }
    acc: dict = {}
    merge_stats(acc, shard)
    merge_stats(acc, shard)
    assert acc["requests_sent"] == 10 and acc["by_task"]["vqa"] == {
        "records": 8,
        "stage1_dropped": 2,
        "stage1_drop_rate": 0.25,
    }
