"""History backend, the 1..k anchor contract with fallbacks, the factory and the DuckDB cache."""

from __future__ import annotations

import logging

import duckdb
import pandas as pd
import pytest

from gpl_platform.pseudo_labels.anchors import (
    ANCHOR_COLUMNS,
    AnchorGenerator,
    HistoryAnchorGenerator,
    UserHistory,
    make_anchor_generator,
)
from gpl_platform.pseudo_labels.anchors.base import GENERIC_ANCHOR_TEXT, RawAnchor
from gpl_platform.pseudo_labels.anchors.cache import cache_key, generate_with_cache
from gpl_platform.pseudo_labels.anchors.parser import parse_anchors
from gpl_platform.pseudo_labels.prompts import load_prompt, parse_template

TEXTS = [
    "Toy Story (1995). Genres: Animation, Children's, Comedy",
    "Star Wars (1977). Genres: Action, Adventure, Romance, Sci-Fi, War",
    "Fargo (1996). Genres: Crime, Drama, Thriller",
    "Alien (1979). Genres: Action, Horror, Sci-Fi, Thriller",
    "Casablanca (1942). Genres: Drama, Romance, War",
]


def hist(uid: str, n: int = 4, offset: int = 0) -> UserHistory:
    texts = tuple(TEXTS[(offset + i) % len(TEXTS)] for i in range(n))
    return UserHistory(uid, tuple(str((offset + i) % len(TEXTS)) for i in range(n)), texts)


class FakeLLM(AnchorGenerator):
    """A 'model' that returns fixed raw text per user; parses it like a real backend."""

    backend = "fake"

    def __init__(
        self,
        outputs=None,
        default="- space opera\n- dark crime drama\n- romantic comedy",
        prompt_version="p1",
        params=None,
    ):
        self.model_id = "fake-model"
        self.prompt_version = prompt_version
        self.params = dict(params or {"temperature": 0.0})
        self.outputs = outputs or {}
        self.default = default
        self.calls = 0
        self.users_generated = 0

    def _generate_raw(self, histories, k, progress, stats):
        self.calls += 1
        self.users_generated += len(histories)
        out = []
        for h in histories:
            raw = self.outputs.get(h.user_id, self.default)
            if raw is None:
                out.append(None)  # simulated generation error
                continue
            parsed = parse_anchors(raw, k, h.item_texts)
            for r, n in parsed.dropped.items():
                stats[f"parse_{r}"] += n
            out.append([RawAnchor(a.text, -0.5) for a in parsed.anchors])
        return out


def check_frame(df: pd.DataFrame, users: list[str], k: int) -> None:
    assert list(df.columns)[-len(ANCHOR_COLUMNS) :] == list(ANCHOR_COLUMNS)
    counts = df.groupby("user_id").size()
    assert set(counts.index) == set(users)
    assert counts.min() >= 1 and counts.max() <= k
    for _, g in df.groupby("user_id"):
        assert list(g["anchor_rank"]) == list(range(len(g)))
    assert ((df["gen_prob"] > 0) & (df["gen_prob"] <= 1)).all()
    assert df["is_fallback"].dtype == bool
    assert df["anchor_text"].map(lambda t: isinstance(t, str) and t.strip() != "").all()


# ---------------------------------------------------------------- history backend
def test_history_backend_uses_most_recent_items():
    gen = HistoryAnchorGenerator()
    res = gen.generate([hist("a", 4), hist("b", 2, offset=2)], k=3, progress=False)
    check_frame(res.anchors, ["a", "b"], 3)
    a = res.anchors[res.anchors.user_id == "a"]
    assert list(a.anchor_text) == TEXTS[:3]
    assert (res.anchors.logprob == 0.0).all() and (res.anchors.gen_prob == 1.0).all()
    assert not res.anchors.is_fallback.any()
    assert res.stats["users"] == 2 and res.stats["history_anchors"] == 5
    assert res.stats.get("llm_anchors", 0) == 0


def test_history_backend_dedupes_repeated_items():
    h = UserHistory("a", ("1", "1", "2"), (TEXTS[0], TEXTS[0], TEXTS[1]))
    res = HistoryAnchorGenerator().generate([h], k=5, progress=False)
    assert list(res.anchors.anchor_text) == [TEXTS[0], TEXTS[1]]


def test_factory():
    assert isinstance(make_anchor_generator("history"), HistoryAnchorGenerator)
    g = make_anchor_generator("openai", base_url="http://127.0.0.1:9/v1", model="m")
    assert g.backend == "openai"
    with pytest.raises(ValueError):
        make_anchor_generator("nope")


def test_k_must_be_positive():
    with pytest.raises(ValueError):
        HistoryAnchorGenerator().generate([hist("a")], k=0)


# ---------------------------------------------------------------- fallback contract
def test_garbage_model_still_gives_every_user_an_anchor(caplog):
    garbage = {
        "u0": "",
        "u1": "Sure! Here are some phrases:\n",
        "u2": "\x00\x01 ### ???\n=====",
        "u3": "- Toy Story (1995)\n- Fargo",  # only copies of history titles
        "u4": "- real anchor one\n- real anchor one",
        "u5": None,  # generation error
    }
    gen = FakeLLM(outputs=garbage)
    hs = [hist(f"u{i}", 3) for i in range(6)] + [UserHistory("empty", (), ())]
    with caplog.at_level(logging.INFO, logger="gpl_platform.pseudo_labels.anchors.base"):
        res = gen.generate(hs, k=3, progress=False)
    df = res.anchors
    check_frame(df, [h.user_id for h in hs], 3)
    fb_users = set(df[df.is_fallback].user_id)
    assert fb_users == {"u0", "u1", "u2", "u3", "u5", "empty"}
    assert res.stats["fallback_users"] == 6
    assert res.stats["fallback_no_usable_output"] == 4
    assert res.stats["fallback_generation_error"] == 1
    assert res.stats["fallback_empty_history"] == 1
    assert res.stats["llm_anchors"] == 1
    assert res.stats["parse_copied_title"] >= 1 and res.stats["parse_duplicate"] == 1
    # fallback anchors are the user's own items, most recent first
    u0 = df[df.user_id == "u0"]
    assert list(u0.anchor_text) == TEXTS[:3]
    assert (u0.fallback_reason == "no_usable_output").all()
    assert df[df.user_id == "empty"].anchor_text.tolist() == [GENERIC_ANCHOR_TEXT]
    assert any("fell back" in r.message for r in caplog.records)


def test_fallbacks_are_one_counted_line_per_call_and_each_user_at_debug(caplog):
    empty = [UserHistory(f"e{i}", (), ()) for i in range(50)]
    broken = [hist(f"b{i}", 3) for i in range(20)]
    gen = FakeLLM(outputs={h.user_id: "" for h in broken})
    with caplog.at_level(logging.INFO, logger="gpl_platform.pseudo_labels.anchors.base"):
        gen.generate([*empty, *broken, hist("ok", 3)], k=3, progress=False)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) <= 3, lines  # the empty-history count, the fallback summary, the stats
    assert "fake: 50 users with an empty history: generic anchors" in lines
    assert any("70 of 71 users fell back" in line for line in lines)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="gpl_platform.pseudo_labels.anchors.base"):
        gen.generate([*empty, *broken], k=3, progress=False)
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert sum("has an empty history" in line for line in debug) == 50
    assert sum("no usable anchor" in line for line in debug) == 20


def test_pad_with_history_fills_up_to_k():
    gen = FakeLLM(default="- space opera")
    gen.pad_with_history = True
    res = gen.generate([hist("a", 4)], k=3, progress=False)
    df = res.anchors
    assert len(df) == 3
    assert df.iloc[0].anchor_text == "space opera" and not df.iloc[0].is_fallback
    assert df.iloc[1:].is_fallback.all() and (df.iloc[1:].fallback_reason == "pad_with_history").all()


def test_logprob_and_gen_prob_consistent():
    res = FakeLLM().generate([hist("a")], k=3, progress=False)
    assert (res.anchors.logprob == -0.5).all()
    assert res.anchors.gen_prob.round(6).eq(round(float(pd.Series([-0.5]).map(__import__("math").exp)[0]), 6)).all()


# ---------------------------------------------------------------- cache
@pytest.fixture()
def con():
    c = duckdb.connect(":memory:")
    yield c
    c.close()


def test_cache_same_input_hits_and_costs_no_generation(con):
    gen = FakeLLM()
    hs = [hist("a"), hist("b", offset=1), hist("c", offset=2)]
    df1, st1 = generate_with_cache(con, gen, hs, k=3, progress=False)
    assert st1["cache_misses"] == 3 and st1["cache_hits"] == 0
    assert gen.users_generated == 3
    df2, st2 = generate_with_cache(con, gen, hs, k=3, progress=False)
    assert st2["cache_hits"] == 3 and st2["cache_misses"] == 0
    assert gen.users_generated == 3 and gen.calls == 1  # nothing generated again
    pd.testing.assert_frame_equal(df1, df2)
    assert "cache_key" in df2.columns
    check_frame(df2, ["a", "b", "c"], 3)
    n = con.execute("SELECT count(*) FROM anchor_cache").fetchone()[0]
    assert n == len(df1)
    row = con.execute("SELECT backend, model_id, prompt_version, created_at FROM anchor_cache LIMIT 1").fetchone()
    assert row[0] == "fake" and row[1] == "fake-model" and row[2] == "p1" and row[3] is not None


def test_cache_invalidation_history_prompt_params(con):
    gen = FakeLLM()
    generate_with_cache(con, gen, [hist("a"), hist("b")], k=3, progress=False)
    # changed history of one user: only that user misses
    _, st = generate_with_cache(con, gen, [hist("a", n=5), hist("b")], k=3, progress=False)
    assert (st["cache_hits"], st["cache_misses"]) == (1, 1)
    # a changed item text (same ids) misses too
    h = hist("b")
    h2 = UserHistory("b", h.item_ids, (h.item_texts[0] + " (remastered)",) + h.item_texts[1:])
    _, st = generate_with_cache(con, gen, [h2], k=3, progress=False)
    assert st["cache_misses"] == 1
    # new prompt version: everything misses
    _, st = generate_with_cache(con, FakeLLM(prompt_version="p2"), [hist("a"), hist("b")], k=3, progress=False)
    assert (st["cache_hits"], st["cache_misses"]) == (0, 2)
    # changed generation params: misses
    _, st = generate_with_cache(con, FakeLLM(params={"temperature": 0.7}), [hist("a")], k=3, progress=False)
    assert st["cache_misses"] == 1
    # the original generator still hits
    _, st = generate_with_cache(con, FakeLLM(), [hist("a"), hist("b")], k=3, progress=False)
    assert (st["cache_hits"], st["cache_misses"]) == (2, 0)


def test_cache_key_and_signature_are_stable():
    g1, g2 = FakeLLM(params={"a": 1, "b": 2}), FakeLLM(params={"b": 2, "a": 1})
    assert g1.cache_signature() == g2.cache_signature()
    assert cache_key(hist("a"), g1.cache_signature(), 3) == cache_key(hist("a"), g2.cache_signature(), 3)
    assert cache_key(hist("a"), g1.cache_signature(), 3) != cache_key(hist("b"), g1.cache_signature(), 3)
    assert HistoryAnchorGenerator().cache_signature() != g1.cache_signature()


def test_cache_mixed_hits_keep_input_order_and_duplicate_users(con):
    gen = FakeLLM(outputs={"b": "- b anchor"})
    generate_with_cache(con, gen, [hist("b")], k=3, progress=False)
    hs = [hist("a"), hist("b"), hist("a", n=2)]  # user "a" twice with different histories
    df, st = generate_with_cache(con, gen, hs, k=3, progress=False)
    assert st["cache_hits"] == 1 and st["cache_misses"] == 2
    assert df.user_id.tolist()[:3] == ["a", "a", "a"]
    assert df.cache_key.nunique() == 3
    assert df[df.user_id == "b"].anchor_text.tolist() == ["b anchor"]


def test_cache_fallbacks_are_cached_too(con):
    gen = FakeLLM(outputs={"a": ""})
    df, _ = generate_with_cache(con, gen, [hist("a"), UserHistory("e", (), ())], k=2, progress=False)
    assert df.is_fallback.all()
    df2, st = generate_with_cache(con, gen, [hist("a"), UserHistory("e", (), ())], k=2, progress=False)
    assert st["cache_hits"] == 2
    assert df2.fallback_reason.tolist() == df.fallback_reason.tolist()


# ---------------------------------------------------------------- prompts
def test_prompt_version_from_name_and_content():
    p = load_prompt("anchors_v1")
    assert p.version.startswith("anchors_v1-") and len(p.version.split("-")[-1]) == 8
    edited = parse_template("anchors_v1", p.text + "\n")
    assert edited.version != p.version
    msgs = p.chat_messages(3, "X (1990): Drama")
    assert msgs[0]["role"] == "system" and "3" in msgs[0]["content"]
    assert msgs[-1]["role"] == "user" and "X (1990): Drama" in msgs[-1]["content"]
    # example answers are cut to k lines
    assert all(len(m["content"].splitlines()) <= 3 for m in msgs if m["role"] == "assistant")
    assert p.prefill == "-"
    with pytest.raises(ValueError):
        parse_template("bad", "=== user ===\nno placeholder")


def test_cache_insert_is_atomic(con):
    from gpl_platform.pseudo_labels.anchors import cache as cache_mod

    gen = FakeLLM()
    generate_with_cache(con, gen, [hist("a")], k=3, progress=False)
    n0 = con.execute("SELECT count(*) FROM anchor_cache").fetchone()[0]
    # a failing insert leaves the table unchanged (rolled back)
    bad = pd.DataFrame(
        {
            "cache_key": ["x", "x"],
            "user_id": ["z", "z"],
            "anchor_rank": [0, 0],
            "anchor_text": ["a", "b"],
            "logprob": [0.0, 0.0],
            "gen_prob": [1.0, 1.0],
            "is_fallback": [False, False],
            "fallback_reason": [None, None],
        }
    )
    with pytest.raises(Exception):
        cache_mod.insert(con, bad, gen)  # duplicate (cache_key, anchor_rank)
    assert con.execute("SELECT count(*) FROM anchor_cache").fetchone()[0] == n0
    # inside a caller's transaction: a clear error instead of a silent partial write
    con.execute("BEGIN TRANSACTION")
    with pytest.raises(RuntimeError, match="outside an open transaction"):
        generate_with_cache(con, gen, [hist("b")], k=3, progress=False)
    con.execute("ROLLBACK")
    assert con.execute("SELECT count(*) FROM anchor_cache").fetchone()[0] == n0
