"""Pure quality metrics stored on every row: MTLD, language-ID confidence, length ratio, repetition.

Word tokens come from a Unicode-aware regex for spaced scripts and from characters for Chinese and
Japanese: lexicalrichness's own splitter gives MTLD 1.0 for any CJK text (notes/translation-and-scoring.md).
"""

from __future__ import annotations

import functools

import regex

from babelsynth.languages import SOURCE_LANG

_SPACED = regex.compile(r"[\p{L}\p{M}\p{N}]+(?:['’][\p{L}\p{M}]+)*")
_CJK_CHAR = regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}]|[\p{L}\p{M}\p{N}]+")
_NO_SPACES = {"zho_Hans", "zho_Hant", "jpn_Jpan", "yue_Hant"}


def tokenize(text: str, lang: str) -> list[str]:
    pat = _CJK_CHAR if lang in _NO_SPACES else _SPACED
    return pat.findall(text.lower())


def mtld(text: str, lang: str, threshold: float = 0.72) -> tuple[float | None, int]:
    """(MTLD, token count); MTLD is None on empty text."""
    toks = tokenize(text, lang)
    if not toks:
        return None, 0
    from lexicalrichness import LexicalRichness  # lazy: imports matplotlib/pandas (about 1 s)

    lex = LexicalRichness(toks, preprocessor=None, tokenizer=None)
    return float(lex.mtld(threshold=threshold)), len(toks)


def length_ratio(text: str, source: str) -> float | None:
    return len(text) / len(source) if source else None


def repetition(text: str, lang: str, n: int = 3) -> float:
    """Share of n-grams that repeat an earlier one: 0 for fresh text, near 1 for 'sorry sorry sorry'."""
    toks = tokenize(text, lang)
    if len(toks) < n + 1:
        return 0.0
    grams = [tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams)


# Characters that differ between Simplified and Traditional Chinese (common ones), for the script check.
_SIMP = set("这个们来时说会对过为学国发后经现动还进开关问长门见车东马书头边从样办区级产华电话写")
_TRAD = set("這個們來時說會對過為學國發後經現動還進開關問長門見車東馬書頭邊從樣辦區級產華電話寫")

_LINGUA = {
    "eng_Latn": "ENGLISH", "arb_Arab": "ARABIC", "ces_Latn": "CZECH", "deu_Latn": "GERMAN", "ell_Grek": "GREEK",
    "fra_Latn": "FRENCH", "heb_Hebr": "HEBREW", "hin_Deva": "HINDI", "ind_Latn": "INDONESIAN",
    "ita_Latn": "ITALIAN", "jpn_Jpan": "JAPANESE", "kor_Hang": "KOREAN", "nld_Latn": "DUTCH",
    "pes_Arab": "PERSIAN", "pol_Latn": "POLISH", "por_Latn": "PORTUGUESE", "ron_Latn": "ROMANIAN",
    "rus_Cyrl": "RUSSIAN", "spa_Latn": "SPANISH", "tur_Latn": "TURKISH", "ukr_Cyrl": "UKRAINIAN",
    "vie_Latn": "VIETNAMESE", "zho_Hans": "CHINESE", "zho_Hant": "CHINESE",
}  # fmt: skip


@functools.cache
def _detector(langs: tuple[str, ...]):
    from lingua import Language, LanguageDetectorBuilder  # the model ships in the wheel: offline

    names = sorted({_LINGUA[c] for c in langs if c in _LINGUA} | {_LINGUA[SOURCE_LANG]})
    return LanguageDetectorBuilder.from_languages(*[getattr(Language, n) for n in names]).build()


def langid_confidence(text: str, lang: str, candidates: tuple[str, ...]) -> float | None:
    """Confidence that text is in lang (script included for Chinese); None for languages lingua lacks."""
    if lang not in _LINGUA:
        return None
    from lingua import Language

    det = _detector(tuple(sorted(candidates)))
    conf = det.compute_language_confidence(text, getattr(Language, _LINGUA[lang]))
    if lang in ("zho_Hans", "zho_Hant"):
        s = sum(ch in _SIMP for ch in text)
        t = sum(ch in _TRAD for ch in text)
        wrong = t > s if lang == "zho_Hans" else s > t
        if wrong:
            conf = 0.0
    return float(conf)
