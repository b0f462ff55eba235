"""Embeddings: the real shipped encoder (loaded once per module) and the incremental item table."""

from __future__ import annotations

import hashlib

import duckdb
import numpy as np
import pandas as pd
import pytest

from gpl_platform.pseudo_labels.encoder import (
    SentenceEncoder,
    default_encoder_dir,
    load_item_embeddings,
    update_item_embeddings,
)


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    enc = SentenceEncoder()
    enc.encode(["warm-up"])  # load once for the module
    return enc


class FakeEncoder:
    """Deterministic hash-based encoder that records what it was asked to encode."""

    def __init__(self, encoder_id: str = "fake@1", dim: int = 8, fail_on_call: int | None = None):
        self.encoder_id = encoder_id
        self.dim = dim
        self.calls: list[list[str]] = []
        self.fail_on_call = fail_on_call

    @property
    def encoded(self) -> list[str]:
        return [t for call in self.calls for t in call]

    def encode(self, texts, batch_size=128, progress=False):
        self.calls.append(list(texts))
        if self.fail_on_call is not None and len(self.calls) >= self.fail_on_call:
            raise RuntimeError("encoder blew up")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            raw = np.frombuffer(hashlib.sha256(t.encode()).digest(), dtype=np.uint8)[: self.dim]
            out[i] = raw.astype(np.float32) + 1.0
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def _items(n: int) -> pd.DataFrame:
    return pd.DataFrame({"item_id": [f"i{k:03d}" for k in range(n)], "text": [f"text {k}" for k in range(n)]})


# --- real encoder ----------------------------------------------------------------------------


def test_default_encoder_dir_is_the_shipped_model():
    d = default_encoder_dir()
    assert (d / "modules.json").is_file()
    assert (d / "model.safetensors").is_file()


@pytest.mark.slow
def test_real_encoder_shape_norm_dtype(encoder):
    texts = ["A space opera with starships.", "Romantic comedy in Paris.", "Documentary about bees."]
    v = encoder.encode(texts, batch_size=2)
    assert v.shape == (3, 384) == (3, encoder.dim)
    assert v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert encoder.encode([]).shape == (0, 384)
    with pytest.raises(TypeError):
        encoder.encode("a single string")


@pytest.mark.slow
def test_real_encoder_semantics(encoder):
    v = encoder.encode(
        [
            "A science fiction film about astronauts travelling to Mars.",
            "Space explorers fly a rocket to the red planet.",
            "A recipe for chocolate chip cookies.",
        ]
    )
    sim = v @ v.T
    assert sim[0, 1] > sim[0, 2] + 0.2
    assert sim[0, 1] > sim[1, 2] + 0.2


@pytest.mark.slow
def test_encoder_id_stable(encoder):
    eid = encoder.encoder_id
    assert eid.startswith("all-MiniLM-L6-v2@") and len(eid.split("@")[1]) == 12
    assert SentenceEncoder().encoder_id == eid  # from the weights file, no model load needed


@pytest.mark.slow
def test_update_with_real_encoder(encoder):
    con = duckdb.connect()
    items = pd.DataFrame({"item_id": ["a", "b"], "text": ["Toy Story (1995) Animation", "Heat (1995) Crime"]})
    stats = update_item_embeddings(con, items, encoder)
    assert stats["encoded"] == 2 and stats["encoder_id"] == encoder.encoder_id
    ids, vecs = load_item_embeddings(con, encoder.encoder_id)
    assert list(ids) == ["a", "b"] and vecs.shape == (2, 384) and vecs.dtype == np.float32
    np.testing.assert_allclose(vecs, encoder.encode(items["text"].tolist()), atol=1e-6)
    assert con.execute("SELECT typeof(vector) FROM item_embeddings LIMIT 1").fetchone()[0] == "FLOAT[384]"


# --- incremental table (fake encoder: fast and observable) -----------------------------------


def test_incremental_only_new_or_changed_are_encoded():
    con = duckdb.connect()
    enc = FakeEncoder()
    items = _items(20)
    s1 = update_item_embeddings(con, items, enc)
    assert s1 == {"encoded": 20, "reused": 0, "removed": 0, "total": 20, "encoder_id": "fake@1"}
    before = con.execute("SELECT item_id, updated_at FROM item_embeddings ORDER BY item_id").fetchall()

    enc.calls.clear()
    s2 = update_item_embeddings(con, items, enc)
    assert s2["encoded"] == 0 and s2["reused"] == 20 and enc.encoded == []

    items2 = items.copy()
    items2.loc[3, "text"] = "a brand new description"
    items2 = pd.concat([items2, pd.DataFrame({"item_id": ["new1"], "text": ["new item"]})], ignore_index=True)
    s3 = update_item_embeddings(con, items2, enc)
    assert sorted(enc.encoded) == ["a brand new description", "new item"]
    assert s3["encoded"] == 2 and s3["reused"] == 19 and s3["total"] == 21

    after = dict(con.execute("SELECT item_id, updated_at FROM item_embeddings").fetchall())
    for item_id, ts in before:
        if item_id != "i003":
            assert after[item_id] == ts  # untouched rows keep their timestamp
    ids, vecs = load_item_embeddings(con, "fake@1")
    row = list(ids).index("i003")
    np.testing.assert_allclose(vecs[row], enc.encode(["a brand new description"])[0], atol=1e-7)


def test_encoder_change_reencodes_everything():
    con = duckdb.connect()
    update_item_embeddings(con, _items(5), FakeEncoder("fake@1"))
    enc2 = FakeEncoder("fake@2")
    s = update_item_embeddings(con, _items(5), enc2)
    assert s["encoded"] == 5 and s["reused"] == 0 and len(enc2.encoded) == 5
    assert len(load_item_embeddings(con, "fake@1")[0]) == 0
    assert len(load_item_embeddings(con, "fake@2")[0]) == 5
    # another dimension recreates the table with the new array type
    s3 = update_item_embeddings(con, _items(5), FakeEncoder("fake@3", dim=4))
    assert s3["encoded"] == 5
    assert load_item_embeddings(con, "fake@3")[1].shape == (5, 4)


def test_remove_missing_and_partial_updates():
    con = duckdb.connect()
    enc = FakeEncoder()
    update_item_embeddings(con, _items(6), enc)
    s = update_item_embeddings(con, _items(6).iloc[:2], enc)  # partial frame: nothing removed
    assert s["removed"] == 0 and s["total"] == 6
    s = update_item_embeddings(con, _items(6).iloc[:2], enc, remove_missing=True)
    assert s["removed"] == 4 and s["total"] == 2
    ids, _ = load_item_embeddings(con, "fake@1", item_ids=["i001", "zzz"])
    assert list(ids) == ["i001"]


def test_failure_rolls_back_and_leaves_table_intact(tmp_path):
    path = tmp_path / "emb.duckdb"
    con = duckdb.connect(str(path))
    update_item_embeddings(con, _items(10), FakeEncoder())
    snapshot = con.execute("SELECT * FROM item_embeddings ORDER BY item_id").fetchall()

    changed = _items(10)
    changed["text"] = changed["text"] + " v2"
    failing = FakeEncoder("fake@1", fail_on_call=2)  # first chunk is deleted+inserted, second fails
    with pytest.raises(RuntimeError, match="blew up"):
        update_item_embeddings(con, changed, failing, chunk_size=4)
    assert len(failing.calls) == 2
    assert con.execute("SELECT * FROM item_embeddings ORDER BY item_id").fetchall() == snapshot
    con.close()
    con = duckdb.connect(str(path))  # and on disk
    assert con.execute("SELECT * FROM item_embeddings ORDER BY item_id").fetchall() == snapshot
    # the connection is usable again afterwards
    assert update_item_embeddings(con, changed, FakeEncoder(), chunk_size=4)["encoded"] == 10


def test_bad_items_frame():
    con = duckdb.connect()
    with pytest.raises(ValueError, match="item_id"):
        update_item_embeddings(con, pd.DataFrame({"text": ["x"]}), FakeEncoder())
    with pytest.raises(ValueError, match="duplicate"):
        update_item_embeddings(con, pd.DataFrame({"item_id": ["a", "a"], "text": ["x", "y"]}), FakeEncoder())


def test_wrong_shape_from_encoder_is_refused():
    class Bad(FakeEncoder):
        def encode(self, texts, batch_size=128, progress=False):
            return np.zeros((len(texts), self.dim + 1), dtype=np.float32)

    con = duckdb.connect()
    with pytest.raises(ValueError, match="shape"):
        update_item_embeddings(con, _items(3), Bad())
    assert load_item_embeddings(con, "fake@1")[0].size == 0


def test_load_missing_table():
    ids, vecs = load_item_embeddings(duckdb.connect(), "whatever")
    assert ids.size == 0 and vecs.shape[0] == 0


def test_encode_deduplicated_encodes_each_distinct_text_once():
    from gpl_platform.pseudo_labels.encoder import encode_deduplicated

    class CountingEncoder:
        dim = 2
        calls: list = []

        def encode(self, texts, progress=False):
            self.calls.append(list(texts))
            return np.array([[len(t), 1.0] for t in texts], dtype=np.float32)

    enc = CountingEncoder()
    out = encode_deduplicated(enc, ["bb", "a", "bb", "ccc", "a"])
    assert enc.calls == [["a", "bb", "ccc"]]
    assert out[:, 0].tolist() == [2, 1, 2, 3, 1]
    assert encode_deduplicated(enc, []).shape == (0, 2)
