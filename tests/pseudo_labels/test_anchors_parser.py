"""Parser of raw LLM output into anchor phrases: nasty outputs from small models."""

from gpl_platform.pseudo_labels.anchors.parser import normalize_key, parse_anchors, title_keys

HIST = (
    "Toy Story (1995). Genres: Animation, Children's, Comedy",
    "Usual Suspects, The (1995). Genres: Crime, Thriller",
    "Heat (1995). Genres: Action, Crime, Thriller",
)


def test_numbered_list_with_preamble_markdown_quotes_and_epilogue():
    raw = (
        "Sure! Here are 5 interest phrases for you:\n\n"
        "1. **Animated family comedy**\n"
        '2) "Clever crime thriller"\n'
        "3. `heist movies`\n"
        "### 4. Twisty mysteries\n"
        "I hope this helps!"
    )
    r = parse_anchors(raw, 5, HIST)
    assert r.phrases == ["Animated family comedy", "Clever crime thriller", "heist movies", "Twisty mysteries"]
    assert r.dropped["preamble"] == 2


def test_bullets_of_many_kinds_and_labels():
    raw = "- space opera\n* dark fantasy\n\u2022 noir detective\n+ Theme: road movie\n\u2013 Genre: western"
    assert parse_anchors(raw, 10).phrases == ["space opera", "dark fantasy", "noir detective", "road movie", "western"]


def test_dedupe_is_case_and_punctuation_insensitive():
    raw = "- Sci-fi action\n- sci fi action!\n- SCI-FI ACTION\n- romance"
    r = parse_anchors(raw, 5)
    assert r.phrases == ["Sci-fi action", "romance"]
    assert r.dropped["duplicate"] == 2


def test_copied_history_titles_are_dropped_and_counted():
    raw = (
        "- Toy Story (1995)\n- toy story\n- The Usual Suspects\n- Toy Story sequel vibes\n"
        "- heated romance\n- crime capers"
    )
    r = parse_anchors(raw, 10, HIST)
    # single-word title "Heat" is not matched inside a phrase; multi-word titles are
    assert r.phrases == ["heated romance", "crime capers"]
    assert r.dropped["copied_title"] + r.dropped["title_like"] == 4


def test_title_like_lines_dropped_even_if_not_in_history():
    r = parse_anchors("- Jurassic Park (1993)\n- dinosaur adventure", 5, HIST)
    assert r.phrases == ["dinosaur adventure"]
    assert r.dropped["title_like"] == 1


def test_empty_and_whitespace_output():
    for raw in ("", "   \n\n  ", None):
        r = parse_anchors(raw, 5)
        assert r.phrases == []
        assert r.dropped["no_output"] == 1


def test_runaway_line_is_truncated_and_output_capped():
    long_line = " ".join(f"word{i}" for i in range(300))
    r = parse_anchors(long_line, 3, max_chars=60, max_words=8)
    assert len(r.phrases) == 1
    assert len(r.phrases[0]) <= 60 and len(r.phrases[0].split()) <= 8
    assert r.dropped["truncated"] == 1
    r = parse_anchors("- drama\n" + "x" * 10000, 3)
    assert r.phrases == ["drama"]
    assert r.dropped["runaway_output"] == 1


def test_repetitive_runaway_is_dropped():
    r = parse_anchors("- action action action action action action action\n- thriller", 5)
    assert r.phrases == ["thriller"]
    assert r.dropped["repetitive"] == 1


def test_garbage_and_special_tokens():
    raw = "- \x00\x01\x02\n- ### ??? !!!\n- 12345 678\n- ======\n- cozy mystery<|im_end|>\n- after end"
    r = parse_anchors(raw, 5)
    assert r.phrases == ["cozy mystery"]
    assert r.dropped["garbage"] >= 3
    assert r.dropped["special_token"] == 1


def test_single_line_comma_list_and_inline_numbering():
    assert parse_anchors("action, comedy and space adventure", 5).phrases == ["action", "comedy", "space adventure"]
    assert parse_anchors("1. sci-fi 2. horror 3) war drama", 5).phrases == ["sci-fi", "horror", "war drama"]
    assert parse_anchors("Here are some: quirky indie romance", 5).phrases == ["quirky indie romance"]


def test_at_most_k_and_over_k_counted():
    r = parse_anchors("\n".join(f"- genre {c}" for c in "abcdefg"), 3)
    assert len(r.phrases) == 3
    assert r.dropped["over_k"] == 4


def test_offsets_point_into_raw_text():
    raw = "- space opera\n2. **dark fantasy**\n"
    r = parse_anchors(raw, 5)
    for a in r.anchors:
        assert a.text.lower() in raw[a.start : a.end].lower() or raw[a.start : a.end].lower() in a.text.lower()


def test_title_keys_and_normalize():
    keys = title_keys(HIST)
    assert "toy story" in keys and "toy story 1995" in keys and "the usual suspects" in keys
    assert normalize_key("  Sci-Fi, ACTION! ") == "sci fi action"
