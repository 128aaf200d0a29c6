"""Pure quality metrics stored on every row: MTLD, language + script ID, length ratio, repetition.

Word tokens: a Unicode-aware regex for space-delimited scripts, and ICU's dictionary-based word
breaker (icu4py, a wheel that bundles ICU and its data: offline) for scripts written without spaces.
lexicalrichness's own splitter gives MTLD 1.0 for any Chinese or Japanese text, and characters are not
words (notes/translation-and-scoring.md, section 4: ICU was the best single option measured there).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence

import regex

from babelsynth.languages import AYA_TARGETS, SOURCE_LANG

_SPACED = regex.compile(r"[\p{L}\p{M}\p{N}]+(?:['’][\p{L}\p{M}]+)*")
_WORDISH = regex.compile(r"[\p{L}\p{N}]")
_NUMERIC = regex.compile(r"^[\p{N}.,]+$")
# Scripts written without spaces between words -> ICU locale for the dictionary word breaker.
_ICU_LOCALE = {
    "Hans": "zh_Hans",
    "Hant": "zh_Hant",
    "Jpan": "ja",
    "Thai": "th",
    "Laoo": "lo",
    "Khmr": "km",
    "Mymr": "my",
    "Tibt": "bo",
}


def _script(lang: str) -> str:
    return lang.rsplit("_", 1)[-1]


def tokenize(text: str, lang: str) -> list[str]:
    """Lower-cased word tokens (punctuation dropped); dictionary words for zh/ja/th, never characters."""
    loc = _ICU_LOCALE.get(_script(lang))
    if loc is None:
        return _SPACED.findall(text.lower())
    from icu4py.breakers import WordBreaker

    return [w for w in WordBreaker(text.lower(), loc) if _WORDISH.search(w)]


def mtld(text: str, lang: str, threshold: float = 0.72) -> tuple[float | None, int]:
    """(MTLD, token count) of one document; MTLD is None on empty text. Gate only long enough documents."""
    toks = tokenize(text, lang)
    if not toks:
        return None, 0
    from lexicalrichness import LexicalRichness  # lazy: imports matplotlib/pandas (about 1 s)

    lex = LexicalRichness(toks, preprocessor=None, tokenizer=None)
    return float(lex.mtld(threshold=threshold)), len(toks)


def length_ratio(text: str, source: str) -> float | None:
    """Characters of the translation over characters of the English source, both without protected spans
    (code, URLs, e-mails, tags, placeholders) and whitespace: those are copied verbatim and do not scale with
    the language, so a zh/ja/ko answer made mostly of code would otherwise fall below its band.
    None when the source has no prose (nothing to compare; the gate does not apply)."""
    src = _prose_chars(source)
    return _prose_chars(text) / src if src else None


def _prose_chars(text: str) -> int:
    return len(regex.sub(r"\s+", "", _PROTECTED.sub("", text)))


def repetition(text: str, lang: str, max_unit: int = 8) -> float:
    """Repetition-loop score in [0, 1]: 0 for fresh text, 1 for 'sorry sorry sorry' / 'I'm sorry I'm sorry'.

    The max of (a) the share of tokens inside back-to-back repeats of a 1..max_unit token unit (3+ times for
    a single token, 2+ for longer units), (b) the share of repeated 4-grams anywhere, and (c) 1.0 when any
    unit repeats 4+ times in a row (an unbounded decoder loop, however long the text around it).
    Units made only of numbers are ignored (tables of zeros are not loops)."""
    toks = tokenize(text, lang)
    n = len(toks)
    if n < 2:
        return 0.0
    covered = [False] * n
    longest = 1
    for size in range(1, max_unit + 1):
        i = 0
        while i + 2 * size <= n:
            unit = toks[i : i + size]
            reps = 1
            while toks[i + reps * size : i + (reps + 1) * size] == unit:
                reps += 1
            if reps >= (3 if size == 1 else 2) and not all(_NUMERIC.match(t) for t in unit):
                longest = max(longest, reps)
                for k in range(i, i + reps * size):
                    covered[k] = True
                i += reps * size
            else:
                i += 1
    loop_share = sum(covered) / n
    grams = [
        g for g in (tuple(toks[i : i + 4]) for i in range(n - 3)) if not all(_NUMERIC.match(t) for t in g)
    ]
    dup_share = 1.0 - len(set(grams)) / len(grams) if grams else 0.0
    return 1.0 if longest >= 4 else max(loop_share, dup_share)


# ------------------------------------------------------------------------------------------------------------
# Language and script identification

# Common characters whose Simplified and Traditional forms differ (simplified, traditional), for zho_Hans vs
# zho_Hant; characters whose simplified form is also normal Traditional usage (里 台 准 干 后 ...)
# are left out.
_HANS_HANT = (
    "这這个個们們来來时時说說会會对對过過为為学學国國发發经經现現动動还還进進开開关關问問长長门門见見车車东東"
    "马馬书書头頭边邊从從样樣办辦区區级級产產华華电電话話写寫气氣栋棟爱愛买買卖賣读讀认認识識语語请請谢謝让讓"
    "给給红紅绿綠蓝藍颜顏两兩么麼吗嗎没沒钱錢银銀铁鐵飞飛机機场場医醫园園图圖馆館饭飯汤湯鱼魚鸟鳥猫貓龙龍亚亞"
    "欧歐历歷无無与與万萬术術业業农農专專众眾优優伤傷体體价價实實点點听聽远遠岁歲间間种種应應该該总總结結网網"
    "络絡线線视視觉覺观觀节節乐樂欢歡难難脑腦热熱风風阳陽阴陰块塊桥橋楼樓厅廳灯燈帮幫忆憶错錯题題论論议議记記"
    "讲講许許诉訴试試验驗证證报報纸紙笔筆画畫张張条條单單双雙数數页頁标標钢鋼质質员員师師县縣乡鄉镇鎮妈媽爷爺"
    "孙孫儿兒亲親戏戲剧劇声聲响響杂雜运運输輸转轉换換选選择擇达達连連递遞逻邏辑輯软軟轻輕辆輛较較轮輪际際陆陸"
    "队隊阶階随隨险險岛島湾灣广廣庆慶库庫废廢变變号號团團围圍圣聖坏壞坚堅墙牆处處备備够夠夹夾奋奮妇婦娱娛婴嬰"
    "宝寶宫宮宽寬导導寻尋尽盡层層属屬岭嶺币幣带帶帐帳庄莊庙廟归歸当當录錄彻徹怀懷态態恋戀悦悅惊驚惯慣战戰扩擴"
    "扫掃扬揚护護担擔拥擁挂掛据據摄攝敌敵断斷旧舊显顯晓曉暂暫杀殺权權极極构構枪槍树樹档檔梦夢检檢毕畢汉漢沟溝"
    "泪淚泽澤洁潔浅淺测測济濟浓濃润潤涨漲渐漸温溫满滿滚滾灭滅灵靈灾災炼煉烟煙烦煩牵牽状狀独獨猎獵献獻环環畅暢"
    "疗療监監盘盤码碼础礎确確礼禮离離积積称稱稳穩穷窮竞競筑築简簡类類纪紀约約纯純纳納纵縱纷紛练練组組细細织織"
    "终終绍紹绘繪统統继繼绩績续續维維综綜编編缘緣罗羅职職联聯肠腸肤膚胜勝脚腳脸臉艺藝苏蘇荣榮药藥获獲营營虑慮"
    "虽雖补補装裝规規览覽触觸计計订訂讨討训訓讯訊设設访訪评評词詞译譯诗詩诚誠询詢详詳误誤诸諸课課谁誰调調谈談"
    "谱譜贝貝负負贡貢财財责責败敗货貨购購贵貴费費贸貿资資赛賽赞贊赵趙赶趕趋趨跃躍践踐轨軌载載辈輩迁遷迈邁违違"
    "迟遲适適遗遺邮郵邻鄰郑鄭酱醬释釋钥鑰铅鉛链鏈锁鎖锅鍋镜鏡闪閃闭閉闹鬧闻聞阅閱阵陣陈陳隐隱雾霧韩韓顶頂项項"
    "顺順须須顾顧顿頓预預领領频頻额額饮飲饼餅饿餓驾駕骑騎鸡雞麦麥黄黃齐齊龄齡龟龜于於军軍将將内內义義尔爾别別"
    "务務决決则則却卻强強传傳争爭况況击擊党黨仅僅势勢参參兴興严嚴紧緊绝絕举舉刚剛弹彈创創兰蘭卫衛习習劳勞异異"
    "静靜协協挥揮审審刘劉压壓养養执執乱亂税稅恶惡丽麗临臨舰艦减減剑劍鲁魯销銷损損摇搖脱脫谓謂厂廠诺諾伦倫奥奧"
    "谋謀宁寧丝絲萨薩盖蓋杨楊虚虛迹跡弃棄伟偉缓緩潜潛针針杰傑吴吳圆圓残殘摆擺毁毀叹嘆犹猶钟鐘觉覺楼樓厨廚喂餵"
)
_SIMP = frozenset(_HANS_HANT[0::2])
_TRAD = frozenset(_HANS_HANT[1::2])
assert not _SIMP & _TRAD, "a character is listed as both Simplified and Traditional"

# Letters by Unicode script, for the dominant-script check (code spans and URLs are removed first).
_SCRIPTS = {
    "Latn": r"\p{Latin}",
    "Cyrl": r"\p{Cyrillic}",
    "Arab": r"\p{Arabic}",
    "Grek": r"\p{Greek}",
    "Hebr": r"\p{Hebrew}",
    "Deva": r"\p{Devanagari}",
    "Hang": r"[\p{Hangul}\p{Han}]",
    "Jpan": r"[\p{Han}\p{Hiragana}\p{Katakana}]",
    "Hans": r"\p{Han}",
    "Hant": r"\p{Han}",
    "Thai": r"\p{Thai}",
}
_SCRIPT_RE = {k: regex.compile(v) for k, v in _SCRIPTS.items()}
_LETTER = regex.compile(r"\p{L}")
_PROTECTED = regex.compile(
    r"```.*?(?:```|$)|`[^`\n]+`"  # code
    r"|(?:https?|ftp)://[^\s<>\"'`]*[^\s<>\"'`.,;:!?)\]]|www\.[^\s<>\"'`]*[^\s<>\"'`.,;:!?)\]]"  # URLs
    r"|[\w.%+-]+@[\w-]+(?:\.[\w-]+)+"  # e-mail
    r"|</?[A-Za-z][\w:.-]*(?:\s[^<>\n]*)?/?>"  # tags
    r"|\{\{[^{}\n]*\}\}|\{[\w.:\[\]!-]*\}|%(?:\([A-Za-z_]\w*\))?[-+#0]*\d*(?:\.\d+)?[sdifrxXeEgGc](?![A-Za-z])",
    regex.S,
)  # placeholders: {{var}}, {name}, {0}, %s, %(name)s

_LINGUA = {
    "eng_Latn": "ENGLISH",
    "arb_Arab": "ARABIC",
    "ces_Latn": "CZECH",
    "deu_Latn": "GERMAN",
    "ell_Grek": "GREEK",
    "fra_Latn": "FRENCH",
    "heb_Hebr": "HEBREW",
    "hin_Deva": "HINDI",
    "ind_Latn": "INDONESIAN",
    "ita_Latn": "ITALIAN",
    "jpn_Jpan": "JAPANESE",
    "kor_Hang": "KOREAN",
    "nld_Latn": "DUTCH",
    "pes_Arab": "PERSIAN",
    "pol_Latn": "POLISH",
    "por_Latn": "PORTUGUESE",
    "ron_Latn": "ROMANIAN",
    "rus_Cyrl": "RUSSIAN",
    "spa_Latn": "SPANISH",
    "tur_Latn": "TURKISH",
    "ukr_Cyrl": "UKRAINIAN",
    "vie_Latn": "VIETNAMESE",
    "zho_Hans": "CHINESE",
    "zho_Hant": "CHINESE",
}
_FROM_LINGUA = {v: k for k, v in _LINGUA.items() if k != "zho_Hant"}


def protected_spans(text: str) -> list[str]:
    """Spans a translation must carry verbatim: code, URLs, e-mails, tags, placeholders."""
    return [m.group(0) for m in _PROTECTED.finditer(text)]


def strip_protected(text: str) -> str:
    """Text without code, URLs, e-mails and {placeholders}: what language ID should look at."""
    return _PROTECTED.sub(" ", text)


_DENSE = regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}]")
_HANGUL = regex.compile(r"\p{Hangul}")


def langid_chars(text: str) -> int:
    """Characters language ID gets to see (code, URLs and placeholders removed), an ideograph or kana
    counting 3 and a Hangul syllable 2, so a short-text exemption means the same amount of text everywhere."""
    t = strip_protected(text).strip()
    return len(t) + 2 * len(_DENSE.findall(t)) + len(_HANGUL.findall(t))


def chinese_script(text: str) -> str | None:
    """'Hans' or 'Hant' by characters that differ between the two; None without evidence either way."""
    s = sum(ch in _SIMP for ch in text)
    t = sum(ch in _TRAD for ch in text)
    return None if s == t else ("Hans" if s > t else "Hant")


def dominant_script(text: str, lang: str) -> str | None:
    """The script suffix (Latn, Cyrl, ...) most letters of text are in; the target's own script wins ties."""
    letters = _LETTER.findall(text)
    if not letters:
        return None
    own = _script(lang)
    counts = {k: sum(1 for ch in letters if r.match(ch)) for k, r in _SCRIPT_RE.items()}
    best = max(counts.values())
    if own in counts and counts[own] * 2 >= len(letters):
        return own
    return next(k for k, v in counts.items() if v == best) if best else None


# Alphabets a word can be in. Han and kana are one (Japanese mixes them); a Han, kana or Hangul word may carry
# Latin letters legitimately ("Pythonで", "iPhone은", "iPhone和").
_ALPHABETS = {
    **{k: _SCRIPT_RE[k] for k in ("Latn", "Cyrl", "Arab", "Grek", "Hebr", "Deva", "Thai")},
    "Hang": regex.compile(r"\p{Hangul}"),
    "Hani": regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Bopomofo}]"),
}
_WORD = regex.compile(r"[\p{L}\p{M}]+")
MIXED_WORDS = 0.25  # from this share of words mixing alphabets, the text is in no language
MAIN_ALPHABET = 0.5  # below this share of words in its main alphabet, neither


def _alphabet(word: str) -> str | None:
    """The word's alphabet, 'other' for scripts outside _ALPHABETS, None when it mixes alphabets."""
    found = {k for k, r in _ALPHABETS.items() if r.search(word)}
    if found & {"Hang", "Hani"}:
        found.discard("Latn")
    return found.pop() if len(found) == 1 else (None if found else "other")


def main_alphabet_text(text: str) -> str | None:
    """The words of text in its main alphabet, or None for degenerate text (words mixing alphabets such as
    'Деavolth' or 'Ikδšwonř', or no alphabet holding half the words).

    Why: lingua's rule step counts words per alphabet and breaks ties in hash-map order, random per process,
    so on such text its answer changed between a run and its retry; given one alphabet, it cannot tie across
    alphabets. Code-switched words (Latin names in a Russian answer) are not evidence against the language."""
    words = _WORD.findall(text)
    if not words:
        return text
    kinds = [_alphabet(w) for w in words]
    counts = Counter(kinds)
    if counts[None] >= MIXED_WORDS * len(words):
        return None
    main = max((*_ALPHABETS, "other"), key=lambda k: counts[k])  # fixed order breaks ties: deterministic
    if counts[main] < MAIN_ALPHABET * len(words):
        return None
    return text if counts[main] == len(words) else " ".join(w for w, k in zip(words, kinds) if k == main)


@functools.cache
def _detector(langs: tuple[str, ...]):
    from lingua import Language, LanguageDetectorBuilder  # the model ships in the wheel: offline

    names = sorted({_LINGUA[c] for c in langs if c in _LINGUA} | {_LINGUA[SOURCE_LANG]})
    return LanguageDetectorBuilder.from_languages(*[getattr(Language, n) for n in names]).build()


LANGID_DECIMALS = 4  # confidences are kept to this many decimals: reproducible, finer than any threshold


def langid_candidates(run_languages: Sequence[str]) -> tuple[str, ...]:
    """Detector candidates: every Aya target, the run's languages and English (copied-through source).

    A fixed, wide set catches off-target output in languages the run did not ask for; never all 75
    lingua languages (that confuses id/ms and uk/kk, notes section 5)."""
    return tuple(sorted(set(AYA_TARGETS) | set(run_languages) | {SOURCE_LANG}))


def langid(
    texts: Sequence[str], langs: Sequence[str], candidates: tuple[str, ...]
) -> list[tuple[str | None, float | None]]:
    """(detected code with script, confidence that the text is in its target) per text.

    Confidence is lingua's for the target language, and 0.0 when the script is wrong (zho_Hant text for a
    zho_Hans target, Hindi in Latin letters); (None, 0.0) for degenerate text (`main_alphabet_text`).
    (None, None) for languages lingua lacks or text without letters."""
    det = _detector(candidates)
    clean = [strip_protected(t) for t in texts]
    todo = [i for i, (t, lg) in enumerate(zip(clean, langs)) if lg in _LINGUA and _LETTER.search(t)]
    main = {i: main_alphabet_text(clean[i]) for i in todo}
    mixed = {i for i in todo if main[i] is None}
    todo = [i for i in todo if i not in mixed]
    values = [det.compute_language_confidence_values(main[i]) for i in todo]  # serial beat the parallel API
    out: list[tuple[str | None, float | None]] = [(None, None)] * len(texts)
    for i in mixed:
        out[i] = (None, 0.0)
    for i, vals in zip(todo, values):
        text, lang = clean[i], langs[i]
        # lingua sums in hash-map order, so the last bits differ between calls: round, then break ties by
        # name, or a rerun of the same text can change its detected language and its gate outcome
        conf = {v.language.name: round(float(v.value), LANGID_DECIMALS) for v in vals}
        top = min(conf, key=lambda n: (-conf[n], n)) if conf else None
        detected = _FROM_LINGUA.get(top) if top else None
        if top == "CHINESE":
            detected = "zho_" + (
                chinese_script(text) or (_script(lang) if lang.startswith("zho_") else "Hans")
            )
        script = dominant_script(text, lang)
        if detected == lang and script is not None and script != _script(lang):
            detected = f"{lang.split('_')[0]}_{script}"  # right language, wrong script (e.g. hin_Latn)
        target_conf = conf.get(_LINGUA[lang], 0.0)
        if detected != lang and detected is not None and detected.split("_")[0] == lang.split("_")[0]:
            target_conf = 0.0  # zho_Hant text for a zho_Hans target scores as off-target
        out[i] = (detected, target_conf)
    return out


def langid_confidence(text: str, lang: str, candidates: tuple[str, ...]) -> float | None:
    """Confidence that text is in lang, script included (0.0 for the wrong script)."""
    return langid([text], [lang], candidates)[0][1]
