"""Segmentation keeps the structure: split then reassemble with the same texts is the identity."""

from hypothesis import given, settings
from hypothesis import strategies as st

from babelsynth.segment import reassemble, split

_alphabet = st.sampled_from(list("abc XYZ.!?\n-*1234|)é这。") + ["  ", "\n\n", "1. ", "- "])


@settings(max_examples=300, deadline=None)
@given(st.lists(_alphabet, max_size=60).map("".join))
def test_reassembly_is_exact(text):
    pieces = split(text)
    assert "".join(p.text for p in pieces) == text
    assert reassemble(pieces, [p.text for p in pieces if p.translate]) == text


def test_sentences_lines_and_markers_are_separate_segments():
    text = "First sentence. Second one!\n- item one\n2. item two"
    segs = [p.text for p in split(text) if p.translate]
    assert segs == ["First sentence.", "Second one!", "item one", "item two"]
    out = reassemble(split(text), [s.upper() for s in segs])
    assert out == "FIRST SENTENCE. SECOND ONE!\n- ITEM ONE\n2. ITEM TWO"
