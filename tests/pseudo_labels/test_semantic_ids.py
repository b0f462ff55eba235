"""Semantic IDs (RQ-VAE), the SID generator, prefix-constrained beam search, and the `sid` anchor backend."""

import json

import numpy as np
import pytest
import torch

from gpl_platform.anchor_settings import SemanticIdConfig, SidGeneratorConfig
from gpl_platform.pseudo_labels.semantic_ids.generator import SidTransformer, SidVocabulary, beam_search, max_tokens
from gpl_platform.pseudo_labels.semantic_ids.generator_training import (
    count_training_targets,
    keep_probabilities,
    packed_batch,
    target_log_probs,
    train_sid_generator,
)
from gpl_platform.pseudo_labels.semantic_ids.rqvae import assign_suffixes, auto_codebook_size, fit_semantic_ids

SMALL_RQ = SemanticIdConfig(levels=2, codebook_size=8, latent_dim=8, hidden_dim=32, warmup_epochs=30, epochs=150)
SMALL_GEN = SidGeneratorConfig(
    d_model=32,
    layers=1,
    heads=2,
    epochs=25,
    batch_size=16,
    lr=5e-3,
    max_history_items=6,
    beam_size=12,
    popular_subsample_t=0.0,
    objective="next_item",
)


def clustered_vectors(n_items=120, dim=24, clusters=6, seed=0):
    """Unit vectors around a few centres, plus an exact duplicate pair (a guaranteed code collision)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    labels = np.arange(n_items) % clusters
    x = centres[labels] + 0.3 * rng.normal(size=(n_items, dim))
    x[1] = x[0]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return [f"i{k:03d}" for k in range(n_items)], x.astype(np.float32), labels


@pytest.fixture(scope="module")
def fitted():
    ids, x, labels = clustered_vectors()
    return ids, x, labels, fit_semantic_ids(ids, x, SMALL_RQ, seed=3, encoder_id="enc@test")


def test_semantic_ids_are_unique_and_round_trip(fitted):
    ids, x, labels, fit = fitted
    assert fit.codes.shape == (len(ids), SMALL_RQ.levels + 1)
    assert len({tuple(c) for c in fit.codes}) == len(ids)  # one ID, one item
    assert tuple(fit.codes[0, :-1]) == tuple(fit.codes[1, :-1]) and fit.codes[0, -1] != fit.codes[1, -1]
    vocab = SidVocabulary(fit.item_ids, fit.codes)
    assert all(vocab.item_of(tuple(c)) == row for row, c in enumerate(fit.codes))
    assert fit.metrics["unique_ids"] == len(ids) and fit.metrics["suffix_vocabulary"] >= 2
    # the decoding of an item's codes is much closer to the item than to the other items
    sims = fit.decoded @ x.T
    assert np.diag(sims).mean() > sims.mean() + 0.3
    assert 0 < fit.metrics["reconstruction_relative_error"] < 1
    assert len(fit.metrics["codebook_usage"]) == SMALL_RQ.levels and min(fit.metrics["codebook_usage"]) > 0.5
    # the first level follows the clusters: items of one cluster mostly share their first code
    purity = np.mean([np.bincount(fit.codes[labels == c, 0]).max() / (labels == c).sum() for c in range(6)])
    assert purity > 0.6


def test_semantic_ids_are_deterministic_under_a_seed(fitted):
    ids, x, _, fit = fitted
    again = fit_semantic_ids(ids, x, SMALL_RQ, seed=3, encoder_id="enc@test")
    assert again.version == fit.version and np.array_equal(again.codes, fit.codes)
    other = fit_semantic_ids(ids, x, SMALL_RQ, seed=4, encoder_id="enc@test")
    assert other.version != fit.version


def test_semantic_id_bad_input_is_refused():
    ids, x, _ = clustered_vectors(n_items=10)
    with pytest.raises(ValueError, match="unique"):
        fit_semantic_ids(ids[:-1] + [ids[0]], x, SMALL_RQ, 0, "e")
    with pytest.raises(ValueError, match="NaN"):
        bad = x.copy()
        bad[2, 0] = np.nan
        fit_semantic_ids(ids, bad, SMALL_RQ, 0, "e")
    with pytest.raises(ValueError, match="vectors must be"):
        fit_semantic_ids(ids, x[:5], SMALL_RQ, 0, "e")
    with pytest.raises(ValueError, match="not unique"):
        SidVocabulary(["a", "b"], np.array([[1, 0], [1, 0]]))


def test_suffixes_and_codebook_size():
    suffix = assign_suffixes(["b", "a", "c", "d"], np.array([[1, 2], [1, 2], [0, 0], [1, 2]]))
    assert suffix.tolist() == [1, 0, 0, 2]  # by item id within the shared prefix
    assert auto_codebook_size(1682, 3) == 32 and auto_codebook_size(10, 3) == 4


def random_catalog(n_items=40, seed=0):
    rng = np.random.default_rng(seed)
    codes = set()
    while len(codes) < n_items:
        codes.add((int(rng.integers(3)), int(rng.integers(5)), int(rng.integers(4))))
    return SidVocabulary([f"i{k}" for k in range(n_items)], np.array(sorted(codes)))


def exact_scores(model, vocab, prompt):
    """log P(ID | prompt) of every item by teacher forcing (the brute force the beam search must agree with)."""
    seqs = [vocab.sequence(list(prompt) + [row]) for row in range(len(vocab.item_ids))]
    tokens = torch.from_numpy(np.stack(seqs))
    with torch.no_grad():
        logp = torch.log_softmax(model(tokens[:, :-1])[0], -1).gather(2, tokens[:, 1:, None])[..., 0]
    return logp[:, -vocab.positions :].sum(1).numpy()


def test_constrained_beam_search_emits_only_valid_ids_and_matches_brute_force():
    vocab = random_catalog()
    torch.manual_seed(0)
    model = SidTransformer(vocab.size, max_tokens(SMALL_GEN, vocab.positions), 32, 1, 2, 0.0).eval()
    with torch.no_grad():  # an untrained model with a strong bias towards invalid tokens: the trie must hold
        model.tok.weight.mul_(50)
    prompts = [np.array([3, 7, 1]), np.array([5]), np.array([3, 7, 1]), np.array([0, 2])]
    exclude = [set(), {int(np.argmax(exact_scores(model, vocab, [5])))}, {3, 7}, set()]
    found = beam_search(model, vocab, prompts, k=5, beam_size=len(vocab.item_ids), exclude=exclude)
    for prompt, banned, items in zip(prompts, exclude, found):
        rows = [r for r, _ in items]
        assert len(rows) == 5 and len(set(rows)) == 5
        assert all(0 <= r < len(vocab.item_ids) for r in rows) and not set(rows) & banned
        exact = exact_scores(model, vocab, prompt)
        exact[list(banned)] = -np.inf
        assert rows == list(np.argsort(-exact, kind="stable")[:5])  # a full-width beam is exact
        assert np.allclose([s for _, s in items], exact[rows], atol=1e-4)
    # a narrow beam is approximate but still only valid, distinct IDs
    for items in beam_search(model, vocab, prompts, k=3, beam_size=3):
        assert all(vocab.item_of(tuple(vocab.codes[r])) == r for r, _ in items) and len({r for r, _ in items}) == 3


def cyclic_sequences(n_users=60, n_items=40, length=8, seed=0):
    """Every user walks the catalog in steps of +1: the next item is fully determined by the last one."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(n_items, size=n_users)
    return [[f"i{(s + t) % n_items}" for t in range(length)] for s in starts]


def test_generator_learns_what_comes_next_and_is_deterministic():
    vocab = random_catalog()
    seqs = cyclic_sequences()
    first = train_sid_generator(vocab, seqs, SMALL_GEN, seed=7, version="t")
    second = train_sid_generator(vocab, seqs, SMALL_GEN, seed=7, version="t")
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)
    m = first.metrics
    assert m["valid_recall@10"] > 0.8 > m["valid_popularity_recall@10"]  # next item, not the popular ones
    assert m["train_loss_per_token"][-1] < m["train_loss_per_token"][0]
    prompt = np.array([vocab.item_index[f"i{k}"] for k in (10, 11, 12)])
    top = beam_search(first.model, vocab, [prompt], k=1, beam_size=8)[0]
    assert vocab.item_ids[top[0][0]] == "i13"


def test_packed_rows_score_each_target_as_if_it_alone_followed_the_prompt():
    """A day's targets share one packed row; each must get exactly the log-probability it gets in a row of
    its own (prompt + that target, plain causal attention), whatever the other targets are."""
    vocab = random_catalog()
    torch.manual_seed(1)
    model = SidTransformer(vocab.size, max_tokens(SMALL_GEN, vocab.positions), 32, 2, 2, 0.0).eval()
    rows = [
        (np.array([3, 7, 1]), np.array([5, 9, 0, 22])),
        (np.array([4]), np.array([11])),
        (np.array([8, 2]), np.array([30, 31])),
    ]
    with torch.no_grad():
        packed = target_log_probs(model, packed_batch(vocab, rows, lm_prompt=False)).numpy()
    alone = np.concatenate([exact_scores(model, vocab, prompt)[targets] for prompt, targets in rows])
    assert packed.shape == (7,) and np.allclose(packed, alone, atol=1e-4)


def two_day_sequences(n_users=200, n_items=40, per_day=4, seed=0):
    """Day 1: a few random items; day 2: the same items shifted by +20. The order within a day is random,
    so only the day-to-day rule is learnable: a next_day world."""
    rng = np.random.default_rng(seed)
    seqs, days = [], []
    for _ in range(n_users):
        first = rng.choice(20, size=per_day, replace=False)
        second = rng.permutation(first) + 20
        seqs.append([f"i{k}" for k in np.concatenate([first, second])])
        days.append([100] * per_day + [101] * per_day)
    return seqs, days


def _top4_overlap_with_the_next_day(trained, vocab, n_prompts=50):
    """Mean share of the +20-shifted prompt items among the top 4 of the search, over fresh prompts."""
    rng = np.random.default_rng(99)
    prompts = [rng.choice(20, 4, replace=False) for _ in range(n_prompts)]
    rows = [np.array([vocab.item_index[f"i{k}"] for k in p]) for p in prompts]
    found = beam_search(trained.model, vocab, rows, k=4, beam_size=16, exclude=[set(r.tolist()) for r in rows])
    return np.mean(
        [len({vocab.item_ids[r] for r, _ in f} & {f"i{k + 20}" for k in p}) / 4 for p, f in zip(prompts, found)]
    )


def test_next_day_objective_learns_what_users_want_on_a_later_day():
    vocab = random_catalog()
    seqs, days = two_day_sequences(n_users=400)
    cfg = SMALL_GEN.model_copy(update={"objective": "next_day", "epochs": 40})
    trained = train_sid_generator(vocab, seqs, cfg, seed=5, version="t", user_sessions=days)
    m = trained.metrics
    assert m["objective"] == "next_day" and m["valid_targets"] > 0
    assert m["training_targets"] + m["valid_targets"] == 400 * 4  # only day-2 positives are targets
    assert m["valid_recall@10"] > 0.9 > m["valid_popularity_recall@10"]
    # next-item prediction on the same data spends most of its loss on the random order within a day
    other = train_sid_generator(
        vocab, seqs, cfg.model_copy(update={"objective": "next_item"}), seed=5, version="t", user_sessions=days
    )
    day_overlap, item_overlap = (_top4_overlap_with_the_next_day(g, vocab) for g in (trained, other))
    assert day_overlap > 0.6 and day_overlap > item_overlap + 0.1, (day_overlap, item_overlap)  # seen 0.70 / 0.51


def test_next_day_objective_refuses_what_it_cannot_learn_from():
    vocab = random_catalog()
    cfg = SMALL_GEN.model_copy(update={"objective": "next_day"})
    with pytest.raises(ValueError, match="day of every positive"):
        train_sid_generator(vocab, [["i1", "i2"]], cfg, seed=0, version="t")
    with pytest.raises(ValueError, match="two days"):
        train_sid_generator(vocab, [["i1", "i2"]], cfg, seed=0, version="t", user_sessions=[[5, 5]])
    with pytest.raises(ValueError, match="2 positives but 1 days"):
        train_sid_generator(vocab, [["i1", "i2"]], cfg, seed=0, version="t", user_sessions=[[5]])
    assert count_training_targets([[5, 5, 6, 7], [3]], "next_day") == 2
    assert count_training_targets([[5, 5, 6, 7], [3]], "next_item") == 5


def test_popular_items_are_down_sampled():
    seqs = [np.array([0] * 90 + [1] * 9 + [2])]
    keep = keep_probabilities(seqs, 4, t=0.01)
    assert keep[0] < keep[1] < keep[2] == 1.0 and keep[3] == 1.0
    assert np.allclose(keep[0], np.sqrt(0.01 / 0.9))
    assert (keep_probabilities(seqs, 4, t=0.0) == 1).all()


# ---- end to end on the simulator (whose clicks follow item topics) ----------------------------------

SID_ASSETS = [
    "item_catalog",
    "users",
    "candidate_events",
    "user_histories",
    "item_embeddings",
    "item_semantic_ids",
    "sid_generator",
    "sid_anchor_pseudo_labels",
]


@pytest.fixture(scope="module")
def sid_run(tmp_path_factory):
    from assets.resources import GplSettings
    from assets.runner import run_pipeline

    # a denser world than the suite's default (300 users, one request a day): a generator trained from
    # scratch needs some thousand positives before it knows more than popularity. A refit every day: the
    # next_day objective learns only from users' second and later days, so the first two days get no model
    overrides = {
        "calibration": {"min_samples": 50},
        "simulator": {"n_users": 300, "requests_per_user_per_day": 1.0, "candidates_per_request": 30},
        "sid": {"generator": {"epochs": 150, "batch_size": 32, "retrain_every_days": 1}},
    }
    gpl = GplSettings(data_dir=str(tmp_path_factory.mktemp("sid") / "data"), overrides_json=json.dumps(overrides))
    assert run_pipeline(resources={"gpl": gpl}, ephemeral=True, selection=SID_ASSETS).success
    return gpl


@pytest.mark.slow
def test_sid_assets_store_versioned_ids_and_leak_free_generators(sid_run):
    from gpl_platform.pseudo_labels.semantic_ids.store import stored_generators, stored_semantic_id_meta

    wh = sid_run.warehouse()
    meta = stored_semantic_id_meta(wh)
    assert meta["encoder_id"].startswith("all-MiniLM-L6-v2") and meta["metrics"]["unique_ids"] == 300
    ids = wh.query("SELECT item_id, sid FROM item_semantic_ids")
    assert len(ids) == 300 and ids["sid"].is_unique
    # the first level of the codes follows the simulator's hidden topics (a topic's items share a code)
    topics = wh.query("SELECT s.codes[1] AS c1, i.text FROM item_semantic_ids s JOIN items i USING (item_id)")
    topics["topic"] = topics["text"].str.extract(r"\. ([^:]+):")[0]
    counts = topics.groupby(["topic", "c1"]).size()
    assert counts.groupby(level=0).max().sum() / len(topics) > 0.7
    generators = stored_generators(wh)
    assert len(generators) >= 2
    anchors = wh.query(
        "SELECT a.day, a.model_id, a.anchor_text, a.is_fallback, a.fallback_reason, a.gen_prob, "
        "g.train_end FROM user_anchors__sid a LEFT JOIN sid_generators g ON g.version = a.model_id"
    )
    generated = anchors[~anchors["is_fallback"]]
    assert len(generated) > 100 and generated["anchor_text"].str.match(r"^sid \d+-\d+-\d+-\d+ · ").all()
    assert (generated["train_end"] < generated["day"]).all()  # each model saw only days before the one it serves
    assert generated["gen_prob"].between(0, 1).all() and generated["gen_prob"].lt(1).any()
    # the first day has no earlier positives: no model, history anchors (counted as a fallback reason)
    assert set(anchors.loc[anchors["model_id"] == "none", "fallback_reason"]) <= {"no_sid_model", "empty_history"}
    labels = wh.query("SELECT llm_version, c_generation FROM pseudo_labels__sid")
    assert len(labels) > 0 and labels["llm_version"].str.startswith("sidgen-").any()


@pytest.mark.slow
def test_sid_anchors_beat_random_on_the_simulator_and_rerun_from_cache(sid_run):
    from gpl_platform.evaluation.pseudo_label_quality import pseudo_label_quality
    from gpl_platform.pseudo_labels.model_loading import anchor_generator, sentence_encoder

    settings, wh = sid_run.settings(), sid_run.warehouse()
    days = sorted(wh.written_days("user_histories"))[1:]  # day 1: nobody has a history yet
    report = pseudo_label_quality(
        wh,
        days,
        {"sid": anchor_generator(settings, "sid")},
        sentence_encoder(None),
        settings.anchors.k,
        settings.anchors.history_max_items,
        settings.seed,
        "simulator",
        progress=False,
    )
    assert report["variants"]["sid"]["serving_models"] >= 2
    # where anchors differ at all (users with a history), SID anchors rank the unexposed candidates better than
    # chance; the margin is modest (measured 0.539 against 0.502; history anchors reach 0.614: docs/SEMANTIC_IDS.md)
    quality = report["auc_users_with_history"]
    assert quality["sid_max"] > quality["random"] + 0.02, quality
    assert quality["sid_mean"] > quality["random"] + 0.02, quality
    # the same anchors again: every history is a cache hit, nothing is generated or trained
    from gpl_platform.pseudo_labels.anchor_stages import anchors_for_days

    before = wh.query("SELECT count(*) AS n FROM sid_generators")["n"].iloc[0]
    _, stats = anchors_for_days(
        wh,
        days,
        anchor_generator(settings, "sid"),
        settings.anchors.k,
        settings.anchors.history_max_items,
        progress=False,
    )
    assert stats["cache_misses"] == 0 and stats["cache_hits"] == stats["distinct_histories"]
    assert wh.query("SELECT count(*) AS n FROM sid_generators")["n"].iloc[0] == before


@pytest.mark.slow
def test_sid_as_the_main_backend_gives_the_ablation_labels(sid_run):
    """anchors.backend=sid runs the main GPL assets on semantic-ID anchors: the same labels as the ablation. The
    anchors check passes on the generator's warm-up days (no model yet: history anchors by design), saying why."""
    from assets.resources import GplSettings
    from assets.runner import run_pipeline
    from gpl_platform.quality.gate import check_anchor_days

    overrides = {**json.loads(sid_run.overrides_json), "anchors": {"backend": "sid"}}
    gpl = GplSettings(data_dir=sid_run.data_dir, overrides_json=json.dumps(overrides))
    result = run_pipeline(
        resources={"gpl": gpl},
        ephemeral=True,
        selection=[
            "user_anchors",
            "anchor_embeddings",
            "candidate_similarities",
            "similarity_calibration",
            "pseudo_labels",
        ],
    )
    assert result.success
    assert not [c for c in result.failed_checks if "user_anchors_quality" in c], result.failed_checks
    wh = sid_run.warehouse()
    # the days before the first model whose users with a history got history anchors (day one has no histories)
    warm_up = set(
        wh.query("SELECT DISTINCT day FROM user_anchors WHERE fallback_reason = 'no_sid_model'")["day"].dt.date
    )
    assert warm_up
    checked = check_anchor_days(wh, sorted(wh.written_days("user_anchors")))
    assert {d for d, r in checked.items() if "warm_up" in r.metadata} == warm_up
    columns = "day, request_id, item_id, pseudo_label, confidence, llm_version"
    main = sid_run.warehouse().query(f"SELECT {columns} FROM pseudo_labels ORDER BY ALL")
    ablation = sid_run.warehouse().query(f"SELECT {columns} FROM pseudo_labels__sid ORDER BY ALL")
    assert len(main) > 0 and main["llm_version"].str.startswith("sidgen-").any()
    assert main.equals(ablation)


def test_training_gives_the_same_result_in_another_process(fitted):
    """Same inputs, same seed, another process with the same torch thread count: the same codes and the
    same generator (CPU kernels that accumulate in parallel are made deterministic while training; the
    thread count changes float rounding, and earlier tests may have set this process's)."""
    import subprocess
    import sys
    import textwrap

    import torch

    ids, x, _, fit = fitted
    vocab = random_catalog()
    here = train_sid_generator(vocab, cyclic_sequences(), SMALL_GEN, seed=7, version="t")
    script = textwrap.dedent("""
        import sys, json, torch
        torch.set_num_threads(int(sys.argv[1]))
        from tests.pseudo_labels.test_semantic_ids import (SMALL_GEN, SMALL_RQ, clustered_vectors, cyclic_sequences,
                                                           random_catalog)
        from gpl_platform.pseudo_labels.semantic_ids.generator_training import train_sid_generator
        from gpl_platform.pseudo_labels.semantic_ids.rqvae import fit_semantic_ids
        ids, x, _ = clustered_vectors()
        fit = fit_semantic_ids(ids, x, SMALL_RQ, seed=3, encoder_id="enc@test")
        gen = train_sid_generator(random_catalog(), cyclic_sequences(), SMALL_GEN, seed=7, version="t")
        weight = float(sum(p.double().sum() for p in gen.model.parameters()))
        print(json.dumps({"codes": fit.codes.tolist(), "weight": weight}))
    """)
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", script, str(torch.get_num_threads())],
        capture_output=True,
        text=True,
        cwd=root,
        check=True,
    )
    there = json.loads(out.stdout.strip().splitlines()[-1])
    assert there["codes"] == fit.codes.tolist()
    assert there["weight"] == float(sum(p.double().sum() for p in here.model.parameters()))
