"""Segmentation keeps the structure: split then reassemble with the same texts is the identity."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from babelsynth.segment import reassemble, segments, split

_atoms = list("abc XYZ.!?\n-*1234|)(é这。`$\\{}%<>@:/#~[]\t") + [
    "  ",
    "\n\n",
    "1. ",
    "- ",
    "> ",
    "# ",
    "```",
    "~~~",
    "$$",
    "\\[",
    "\\]",
    "\\(",
    "\\)",
    "https://",
    "www.x.",
    "a@b.co",
    "<answer>",
    "</answer>",
    "{name}",
    "%s",
    "|---|",
    "\\begin{x}",
    "\\end{x}",
    "e.g. ",
    "Dr. ",
    "\r\n",
]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(_atoms), max_size=80).map("".join))
def test_reassembly_is_exact(text):
    pieces = split(text)
    assert "".join(p.text for p in pieces) == text
    assert reassemble(pieces, [p.text for p in pieces if p.translate]) == text
    for p in pieces:  # a segment is trimmed and holds a letter; nothing else goes to the model
        assert not p.translate or (p.text == p.text.strip() and any(c.isalpha() for c in p.text))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_reassembly_is_exact_on_any_unicode(text):
    pieces = split(text)
    assert reassemble(pieces, [p.text for p in pieces if p.translate]) == text


def test_sentences_lines_and_markers_are_separate_segments():
    text = "First sentence. Second one!\n- item one\n2. item two"
    segs = segments(text)
    assert segs == ["First sentence.", "Second one!", "item one", "item two"]
    out = reassemble(split(text), [s.upper() for s in segs])
    assert out == "FIRST SENTENCE. SECOND ONE!\n- ITEM ONE\n2. ITEM TWO"


def test_abbreviations_initials_and_decimals_do_not_end_a_sentence():
    assert segments("Dr. Smith said e.g. this works. J. Smith paid 3.5 dollars. then it ended.") == [
        "Dr. Smith said e.g. this works.",
        "J. Smith paid 3.5 dollars. then it ended.",
    ]


@pytest.mark.parametrize(
    "span",
    [
        "`x = 1. Done`",
        "``a`b``",
        "$a. B$",
        "\\(x. Y\\)",
        "\\frac{a}{b}",
        "https://a.org/x_(y)?q=1",
        "www.site.org/p",
        "jo.doe+tag@mail.example.com",
        "<answer>",
        "</translation>",
        '<img src="a.png"/>',
        "{name}",
        "{0}",
        "{{var}}",
        "%s",
        "%(count)d",
        "%.2f",
    ],
)
def test_inline_protected_spans_are_kept_out_of_segments(span):
    text = f"Look at {span} now. It is fine."
    pieces = split(text)
    assert any(p.text == span and not p.translate for p in pieces)
    assert not any(span in s for s in segments(text))


def test_block_protected_spans_and_trailing_url_punctuation():
    text = "Intro.\n```py\nprint('Hi. There')\n```\nMid $$\nx. Y\n$$ and\n\\begin{align}a. B\\end{align}\nSee https://a.org."
    assert segments(text) == ["Intro.", "Mid", "and", "See"]
    assert [p.text for p in split(text) if p.kind == "protected"] == [
        "```py\nprint('Hi. There')\n```",
        "$$\nx. Y\n$$",
        "\\begin{align}a. B\\end{align}",
        "https://a.org",
    ]
    assert segments("Code:\n~~~\nnever. Closed.") == ["Code:"]  # an unclosed fence runs to the end


def test_currency_is_not_math_and_numbers_are_not_sent():
    assert segments("It costs $5 and $6 in total.") == ["It costs $5 and $6 in total."]
    assert segments("42\n3.14 | 7") == []


def test_markdown_table_cells_are_segments_and_separators_are_kept():
    text = "| Name | Note |\n|:--|--:|\n| Bob | Likes tea. Hates coffee. |\nAfter."
    assert segments(text) == ["Name", "Note", "Bob", "Likes tea.", "Hates coffee.", "After."]
    assert "|:--|--:|" in [p.text for p in split(text)]
    out = reassemble(split(text), ["N", "O", "B", "L.", "H.", "A."])
    assert out == "| N | O |\n|:--|--:|\n| B | L. H. |\nA."


def test_headings_quotes_and_task_lists_keep_their_markers():
    text = "## Title here\n> Quoted line.\n  * [x] Done task\nA) first choice"
    assert segments(text) == ["Title here", "Quoted line.", "Done task", "first choice"]


def test_reassemble_refuses_a_count_mismatch():
    with pytest.raises(ValueError, match="2 translatable segments but 1"):
        reassemble(split("One. Two."), ["Un."])
