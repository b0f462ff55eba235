"""Defensive parser: raw LLM text -> up to k short anchor phrases.

Small instruction models write numbered lists, bullets, markdown, quotes, chatty preambles
("Sure! Here are..."), repeats, copies of the titles they were shown, endless lines and
sometimes garbage. :func:`parse_anchors` keeps what looks like an interest phrase and counts
what it dropped and why, so that the counts can be logged and stored with the anchors.

Drop / fix reasons (keys of ``ParseResult.dropped``):
``empty``, ``preamble``, ``garbage``, ``repetitive``, ``runaway_output``, ``duplicate``, ``copied_title``,
``title_like``, ``over_k`` (kept lines beyond k), ``truncated`` (line cut to the length cap, still kept),
``special_token`` (chat markup cut off), ``no_output`` (nothing at all)."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

DEFAULT_MAX_CHARS = 80
DEFAULT_MAX_WORDS = 10
MAX_RAW_CHARS = 4000  # runaway output: only the head is looked at

_LIST_MARKER = re.compile(
    r"""^\s*(?:
        (?:\(?\#?\d{1,3}\s*[.):\]]\s*)        # 1.  1)  (1)  #1:  1]
      | (?:[-*+\u2022\u2023\u25cf\u25e6\u2013\u2014>]+\s*)   # - * + bullets, dashes, > quote
      | (?:\(?[a-hA-H][.)]\s+)                # a.  b)
    )+""",
    re.VERBOSE,
)
_INLINE_NUMBERED = re.compile(r"\s+(?=\(?\d{1,2}[.)]\s)")
_PREAMBLE = re.compile(
    r"""^(?:sure|certainly|of\s+course|okay|ok|absolutely|great|alright|
         here(?:'s|\s+is|\s+are)|below|these|this\s+list|the\s+following|based\s+on|
         i\s+(?:would|recommend|think|suggest|hope|can)|as\s+an\s+ai|note\b|hope|
         you\s+(?:might|may|would)|if\s+you|in\s+summary|overall|let\s+me)\b""",
    re.IGNORECASE | re.VERBOSE,
)
_LABEL = re.compile(
    r"^(?:genre|genres|theme|themes|anchor|interest|interests|phrase|mood|topic)\s*\d*\s*[:\-]\s*", re.I
)
_INLINE_PREAMBLE = re.compile(r"^(?:sure|certainly|okay|ok|here)\b[^:\n]{0,80}:\s*(?=\S)", re.I)
_SPECIAL = re.compile(r"<\|[^|>]*\|?>?|</?s>|\[/?INST\]", re.I)
_MD = re.compile(r"\*\*|__|`+|~~")
_QUOTES = "\"'\u201c\u201d\u2018\u2019\u00ab\u00bb`"
_YEAR = re.compile(r"\(\s*\d{4}\s*\)")


@dataclass
class ParsedAnchor:
    text: str
    start: int  # char offsets of the kept text's source in the raw output (for logprobs)
    end: int


@dataclass
class ParseResult:
    anchors: list[ParsedAnchor] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)

    @property
    def phrases(self) -> list[str]:
        return [a.text for a in self.anchors]


def normalize_key(text: str) -> str:
    """Case/punctuation-insensitive key used for dedupe and title matching."""
    t = unicodedata.normalize("NFKD", text).lower()
    t = re.sub(r"[^\w\s]", " ", t)
    t = t.replace("_", " ")
    return " ".join(t.split())


def title_keys(item_texts: Iterable[str]) -> set[str]:
    """Normalized titles of catalog texts, with and without the year.

    ``"Toy Story (1995). Genres: Animation"`` -> {"toy story 1995", "toy story"} plus the whole text.
    """
    keys: set[str] = set()
    for text in item_texts:
        text = str(text)
        title = re.split(r"\.\s+(?:genres?|tags?|category|categories)\s*:", text, maxsplit=1, flags=re.I)[0]
        for cand in (text, title, _YEAR.sub(" ", title)):
            key = normalize_key(cand)
            if key:
                keys.add(key)
        # "Usual Suspects, The (1995)" -> "the usual suspects"
        m = re.match(r"^(.*),\s*(the|a|an|les|la|le|il|das|der|die)\s*(\(\d{4}\))?\s*$", title.strip(), re.I)
        if m:
            keys.add(normalize_key(f"{m.group(2)} {m.group(1)}"))
    return keys


def _copies_title(key: str, titles: set[str]) -> bool:
    if key in titles:
        return True
    padded = f" {key} "
    for t in titles:
        # a multi-word title contained in the anchor ("toy story sequel") counts as a copy;
        # single-word titles ("heat", "alien") are too ambiguous to match inside a phrase.
        if " " in t and len(t) >= 6 and f" {t} " in padded:
            return True
    return False


def _is_garbage(text: str) -> bool:
    letters = sum(ch.isalpha() for ch in text)
    if letters < 2:
        return True
    visible = [ch for ch in text if not ch.isspace()]
    if not visible or letters / len(visible) < 0.5:
        return True
    if any(unicodedata.category(ch) in ("Cc", "Co", "Cs", "Cn") for ch in text):
        return True
    # one character repeated ("aaaaaaa", "=====x")
    if len(set(text.replace(" ", "").lower())) <= 2 and len(text) > 3:
        return True
    return False


def _clean_line(line: str) -> str:
    s = _MD.sub("", line)
    s = s.strip()
    s = re.sub(r"^#{1,6}\s*", "", s)  # markdown header
    prev = None
    while prev != s:  # "1. - **x**" and similar stacks
        prev = s
        s = _LIST_MARKER.sub("", s, count=1).strip()
        s = _LABEL.sub("", s).strip()
        s = s.strip(_QUOTES).strip()
    s = s.rstrip(" .,;:!?-\u2013\u2014").strip(_QUOTES).strip()
    return " ".join(s.split())


def _cap(text: str, max_chars: int, max_words: int) -> tuple[str, bool]:
    words = text.split()
    cut = False
    if len(words) > max_words:
        words = words[:max_words]
        cut = True
    text = " ".join(words)
    if len(text) > max_chars:
        head = text[:max_chars]
        sp = head.rfind(" ")
        text = head[:sp] if sp >= max_chars // 2 else head
        cut = True
    return text.rstrip(" ,;:-"), cut


def _split_lines(raw: str) -> list[tuple[str, int]]:
    """Lines with their start offsets; a one-line inline list is split too."""
    out: list[tuple[str, int]] = []
    pos = 0
    for line in raw.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        pieces = _INLINE_NUMBERED.split(body) if len(_INLINE_NUMBERED.findall(body)) >= 1 else [body]
        off = pos
        for p in pieces:
            i = body.find(p, off - pos)
            start = pos + (i if i >= 0 else 0)
            out.append((p, start))
            off = start + len(p)
        pos += len(line)
    return out


def parse_anchors(
    raw: str,
    k: int,
    history_texts: Iterable[str] = (),
    *,
    max_chars: int = DEFAULT_MAX_CHARS,
    max_words: int = DEFAULT_MAX_WORDS,
    split_commas: bool = True,
    drop_title_like: bool = True,
) -> ParseResult:
    """Parse raw model text into at most ``k`` anchor phrases.

    ``history_texts`` are the user's item texts: an anchor that copies one of their titles is
    dropped (``copied_title``); with ``drop_title_like`` any "Something (1994)" line is dropped
    too (``title_like``): the model was asked for phrases, a title there is a restatement. Offsets in the result
    refer to ``raw``.
    """
    res = ParseResult()
    if raw is None or not str(raw).strip():
        res.dropped["no_output"] += 1
        return res
    raw = str(raw)
    if len(raw) > MAX_RAW_CHARS:
        raw = raw[:MAX_RAW_CHARS]
        res.dropped["runaway_output"] += 1
    m = _SPECIAL.search(raw)
    if m:
        raw = raw[: m.start()]
        res.dropped["special_token"] += 1

    titles = title_keys(history_texts)
    lines = _split_lines(raw)
    content = [(line, s) for line, s in lines if line.strip()]
    # a single line "action, comedy, space adventure" (no list structure) is a list too
    if split_commas and len(content) == 1:
        line, start = content[0]
        body = _INLINE_PREAMBLE.sub("", line)
        skip = len(line) - len(body)
        if body.count(",") + body.count(";") >= 1 and len(body.split()) <= max_words * 4:
            parts = re.split(r"[,;]\s*|\s+and\s+", body)
            content, off = [], 0
            for p in parts:
                i = body.find(p, off)
                content.append((p, start + skip + max(i, 0)))
                off = max(i, 0) + len(p)

    seen: set[str] = set()
    for line, start in content:
        # "Sure! Here are some: sci-fi adventure" -> keep what follows the colon
        m = _INLINE_PREAMBLE.match(line)
        if m and len(line) > m.end():
            start += m.end()
            line = line[m.end() :]
        stripped = line.strip()
        if not stripped:
            res.dropped["empty"] += 1
            continue
        text = _clean_line(stripped)
        if not text:
            res.dropped["empty"] += 1
            continue
        if stripped.rstrip().endswith(":") or _PREAMBLE.match(text):
            res.dropped["preamble"] += 1
            continue
        if _copies_title(normalize_key(text), titles):
            res.dropped["copied_title"] += 1
            continue
        if drop_title_like and _YEAR.search(text):
            res.dropped["title_like"] += 1
            continue
        if _is_garbage(text):
            res.dropped["garbage"] += 1
            continue
        words = normalize_key(text).split()
        if len(words) >= 6 and len(set(words)) / len(words) <= 0.4:
            res.dropped["repetitive"] += 1
            continue
        text, cut = _cap(text, max_chars, max_words)
        if cut:
            res.dropped["truncated"] += 1
        key = normalize_key(text)
        if not key:
            res.dropped["garbage"] += 1
            continue
        if _copies_title(key, titles):  # a title may show up only after truncation
            res.dropped["copied_title"] += 1
            continue
        if key in seen:
            res.dropped["duplicate"] += 1
            continue
        if len(res.anchors) >= k:
            res.dropped["over_k"] += 1
            continue
        seen.add(key)
        # locate the kept text inside the raw line for token alignment
        i = line.find(text[: max(1, min(len(text), 12))])
        a_start = start + (i if i >= 0 else len(line) - len(line.lstrip()))
        a_end = min(start + len(line.rstrip()), a_start + max(len(text), 1)) if i >= 0 else start + len(line.rstrip())
        res.anchors.append(ParsedAnchor(text, a_start, max(a_end, a_start + 1)))
    if not res.anchors and not res.dropped:
        res.dropped["no_output"] += 1
    return res
