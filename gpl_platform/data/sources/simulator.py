"""A synthetic world with a known preference model, for tests and scale benchmarks.

Items belong to one topic and get a text generated from that topic's vocabulary, so a sentence
encoder can see what an item is about. Users have a Dirichlet preference over topics. The true
click probability is ``sigmoid(base + strength * sqrt(pref[u, topic(i)]) + quality(i))``: content
explains most of it, which is what GPL's content anchors can recover. Recall mixes popular items
with either items of the user's topics (``recall="preference"``, an ideal recall) or a recall model
over the clicks logged on earlier days (``recall="logged_clicks"``: item co-occurrence and the
categories the user clicked); an exposure policy (gpl_platform/data/exposure.py: popularity-skewed Plackett-Luce, a
logging model trained on earlier clicks, or self-selection) exposes a share of each request and
records each candidate's propensity. The preference recall is vectorized over the whole timeline
(1M+ events take a few seconds); the logged-click recall goes day by day, since each day's
candidates depend on what earlier days exposed.

The tables hold only what a real log would: items have their text, topic and runtime, users their age
and country. What generates the clicks and the candidates is kept out of them, in ``Dataset.info``
(every item column would become a model feature, and a real catalog has neither a click-logit term nor
the recall's sampling weight): ``info["item_truth"]`` (item_id, topic_id, ``quality``: the item's term
of the click logit, ``popularity_prior``: its weight in the popularity recall and exposure; row k is
item ``i{k}``) and ``info["ground_truth"]["preference"]`` (users x topics; row k is user ``u{k}``).
:func:`click_probability` recomputes the true click probability from them; the events carry it per
candidate as the benchmark-only ``oracle_probability`` (stored with the oracle labels, never a feature).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from gpl_platform.data.contract import Dataset, normalize_events_frame
from gpl_platform.data.exploration_draw import exploration_rows, policy_names
from gpl_platform.data.exposure import (
    Candidates,
    DailyExposure,
    Exposure,
    expose,
    exposed_counts,
    popularity_log_weights,
)
from gpl_platform.data.policies import DEFAULT_POLICIES, POLICY_COLUMN, slice_summary
from gpl_platform.data.sampling import item_cooccurrence, sample_per_row_without
from gpl_platform.source_settings import SimulatorConfig

TOPICS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Space Opera", ("starship", "galaxy", "alien", "planet", "orbit", "rocket", "nebula", "empire")),
    ("Cooking", ("recipe", "kitchen", "chef", "pasta", "baking", "spices", "dinner", "flavor")),
    ("Detective Mystery", ("detective", "murder", "clue", "suspect", "alibi", "inspector", "crime", "secret")),
    ("Romance", ("love", "wedding", "heart", "kiss", "affair", "letters", "summer", "romance")),
    ("War History", ("battle", "soldier", "army", "general", "trenches", "siege", "empire", "victory")),
    ("Animated Family", ("cartoon", "puppy", "princess", "magic", "friends", "adventure", "kids", "toys")),
    ("Horror", ("ghost", "haunted", "vampire", "blood", "curse", "nightmare", "zombie", "scream")),
    ("Sports", ("football", "coach", "championship", "team", "stadium", "match", "athlete", "trophy")),
    ("Music", ("band", "concert", "guitar", "singer", "album", "jazz", "tour", "melody")),
    ("Nature Documentary", ("ocean", "wildlife", "forest", "whales", "birds", "jungle", "climate", "river")),
    ("Western", ("cowboy", "sheriff", "desert", "outlaw", "saloon", "horse", "frontier", "ranch")),
    ("Comedy", ("funny", "prank", "roommates", "party", "awkward", "road trip", "jokes", "chaos")),
    ("Technology", ("computer", "robot", "hacker", "software", "startup", "algorithm", "network", "code")),
    ("Travel", ("journey", "paris", "mountains", "island", "train", "backpacking", "beach", "culture")),
    ("Fantasy", ("dragon", "wizard", "kingdom", "sword", "quest", "elves", "castle", "prophecy")),
    ("Finance", ("money", "stocks", "bank", "investor", "market", "fortune", "debt", "wall street")),
)
ADJECTIVES = (
    "The Last",
    "The Secret",
    "A Quiet",
    "The Great",
    "Midnight",
    "The Lost",
    "Endless",
    "The First",
    "Golden",
    "Broken",
    "Wild",
    "The Little",
)


def simulate(cfg: SimulatorConfig, seed: int) -> Dataset:
    """Generate items, users and contract events; ground truth kept in ``Dataset.info`` (not in the tables)."""
    if cfg.n_topics > len(TOPICS):
        raise ValueError(f"simulator.n_topics={cfg.n_topics}: at most {len(TOPICS)} topics have a vocabulary")
    rng = np.random.default_rng(seed)
    # the runtime has a stream of its own: the world's other draws stay those of earlier versions
    items, item_truth = _items(cfg, rng, np.random.default_rng((seed, 1)))
    users, preference = _users(cfg, rng)
    events = _events(cfg, rng, item_truth, preference, seed)
    info = {
        "ground_truth": {"preference": preference},
        "item_truth": item_truth,
        "exposure": events.attrs.pop("exposure", {}),
    }
    events = normalize_events_frame(events)
    info["exploration"] = slice_summary(events, DEFAULT_POLICIES)
    return Dataset("simulator", items, users, events, info)


def click_probability(
    cfg: SimulatorConfig, preference: np.ndarray, item_truth: pd.DataFrame, users: np.ndarray, item_idx: np.ndarray
) -> np.ndarray:
    """The true click probability of user rows ``users`` for item rows ``item_idx`` (the oracle labels are
    Bernoulli draws of it); ``preference`` and ``item_truth`` as in ``Dataset.info``."""
    topic, quality = item_truth["topic_id"].to_numpy()[item_idx], item_truth["quality"].to_numpy()[item_idx]
    logit = cfg.base_click_logit + cfg.preference_strength * np.sqrt(preference[users, topic]) + quality
    return 1.0 / (1.0 + np.exp(-logit))


def _items(
    cfg: SimulatorConfig, rng: np.random.Generator, runtime_rng: np.random.Generator
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The catalog (what a real one has) and the items' ground truth, row for row."""
    topic = rng.integers(0, cfg.n_topics, cfg.n_items)
    words = np.array([list(TOPICS[t][1]) for t in range(cfg.n_topics)], dtype=object)
    picks = np.argsort(rng.random((cfg.n_items, len(TOPICS[0][1]))), axis=1)[:, :3]  # 3 distinct words
    adjective = rng.integers(0, len(ADJECTIVES), cfg.n_items)
    texts = []
    for i in range(cfg.n_items):  # string formatting per item: catalogs are small next to events
        w = words[topic[i]]
        name, (a, b, c) = TOPICS[topic[i]][0], (w[picks[i, 0]], w[picks[i, 1]], w[picks[i, 2]])
        texts.append(f"{ADJECTIVES[adjective[i]]} {a.title()} #{i}. {name}: a story about {b} and {c}.")
    popularity = rng.lognormal(0.0, 1.2, cfg.n_items)
    item_ids = [f"i{i}" for i in range(cfg.n_items)]
    # topic: a genre, which a real catalog has (and the text names it); the runtime plays no part in clicks,
    # like a real catalog's many uninformative numeric attributes
    items = pd.DataFrame(
        {
            "item_id": item_ids,
            "text": texts,
            "topic": [TOPICS[t][0] for t in topic],
            "runtime_min": runtime_rng.integers(70, 181, cfg.n_items),
        }
    )
    truth = pd.DataFrame(
        {
            "item_id": item_ids,
            "topic_id": topic,
            "quality": rng.normal(0.0, 0.5, cfg.n_items).round(3),
            "popularity_prior": popularity.round(4),
        }
    )
    return items, truth


def _users(cfg: SimulatorConfig, rng: np.random.Generator) -> tuple[pd.DataFrame, np.ndarray]:
    preference = rng.dirichlet(np.full(cfg.n_topics, 0.3), cfg.n_users)
    users = pd.DataFrame(
        {
            "user_id": [f"u{u}" for u in range(cfg.n_users)],
            "age": rng.integers(16, 75, cfg.n_users),
            "country": rng.choice(["DE", "FR", "US", "BR", "IN", "JP"], cfg.n_users),
        }
    )
    return users, preference


def _events(
    cfg: SimulatorConfig, rng: np.random.Generator, truth: pd.DataFrame, preference: np.ndarray, seed: int
) -> pd.DataFrame:
    counts = rng.poisson(cfg.requests_per_user_per_day, (cfg.n_users, cfg.n_days))
    req_user, req_day = np.nonzero(counts)
    req_user, req_day = np.repeat(req_user, counts[req_user, req_day]), np.repeat(req_day, counts[req_user, req_day])
    n_req = len(req_user)
    start = pd.Timestamp(cfg.start_date, tz="UTC")
    seconds = req_day * 86400 + rng.integers(0, 86400, n_req)
    req_time = start + pd.to_timedelta(seconds, unit="s")

    day_zero = int((start - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(days=1))
    # per request: served by the uniform-random exploration policy (a stream of its own)
    explored = exploration_rows(np.arange(n_req), day_zero + req_day, cfg.exploration_share, seed)
    serve = _serve_with_logged_click_recall if cfg.recall == "logged_clicks" else _serve_with_preference_recall
    rows, item_idx, oracle, exposure = serve(cfg, rng, truth, preference, seed, req_user, req_day, day_zero, explored)
    exposed = exposure.exposed
    request_ids = np.array([f"r{r}" for r in range(n_req)], dtype=object)
    user_ids = np.array([f"u{u}" for u in range(cfg.n_users)], dtype=object)
    events = pd.DataFrame(
        {
            "request_id": request_ids[rows],
            "user_id": user_ids[req_user[rows]],
            "item_id": truth["item_id"].to_numpy()[item_idx],
            "event_time": req_time[rows].astype("datetime64[us, UTC]"),
            "exposed": exposed,
            "clicked": pd.array(np.where(exposed, oracle, 0), dtype="Int8"),
            "oracle_label": pd.array(oracle, dtype="Int8"),
            # the probability the oracle label was drawn from (recomputed: no random number is drawn for it)
            "oracle_probability": click_probability(cfg, preference, truth, req_user[rows], item_idx),
            "propensity": exposure.propensity,
            POLICY_COLUMN: policy_names(explored[rows]),
        }
    )
    events.loc[~exposed, "clicked"] = pd.NA
    events.attrs["exposure"] = exposure.info
    return events


def _true_labels(
    cfg: SimulatorConfig,
    rng: np.random.Generator,
    truth: pd.DataFrame,
    preference: np.ndarray,
    users: np.ndarray,
    item_idx: np.ndarray,
) -> np.ndarray:
    return (rng.random(len(item_idx)) < click_probability(cfg, preference, truth, users, item_idx)).astype("int8")


def _unique_per_request(rows: np.ndarray, item_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A request lists an item once (and an empty recall slot, -1, not at all)."""
    keep = ~pd.DataFrame({"r": rows, "i": item_idx}).duplicated().to_numpy() & (item_idx >= 0)
    return rows[keep], item_idx[keep]


def _serve_with_preference_recall(cfg, rng, truth, preference, seed, req_user, req_day, day_zero, explored):
    """The whole timeline at once: half of each request popularity-drawn, half from the user's topics."""
    n_items, k, n_req = cfg.n_items, cfg.candidates_per_request, len(req_user)
    popularity = truth["popularity_prior"].to_numpy()
    by_pop = rng.choice(n_items, size=(n_req, k // 2), p=popularity / popularity.sum())
    topic_of_item = truth["topic_id"].to_numpy()
    order = np.argsort(topic_of_item, kind="stable")
    topic_start = np.searchsorted(topic_of_item[order], np.arange(cfg.n_topics))
    topic_size = np.bincount(topic_of_item, minlength=cfg.n_topics)
    cum_pref = np.cumsum(preference[req_user], axis=1)
    draws = rng.random((n_req, k - k // 2, 1))
    slot_topic = np.minimum((cum_pref[:, None, :] < draws).sum(axis=2), cfg.n_topics - 1)
    slot_topic = np.where(topic_size[slot_topic] == 0, topic_of_item[0], slot_topic)
    within = (rng.random(slot_topic.shape) * topic_size[slot_topic]).astype(np.int64)
    by_topic = order[topic_start[slot_topic] + within]
    cand = np.concatenate([by_pop, by_topic], axis=1)

    rows, item_idx = _unique_per_request(np.repeat(np.arange(n_req), k), cand.ravel())
    oracle = _true_labels(cfg, rng, truth, preference, req_user[rows], item_idx)
    exposure = expose(
        Candidates(request=rows, user=req_user[rows], item=item_idx, day=day_zero + req_day[rows]),
        oracle,
        popularity,
        np.eye(cfg.n_topics)[topic_of_item],
        cfg.exposure_share,
        cfg.exposure_popularity_power,
        cfg.exposure,
        seed,
        rng,
        popularity_offset=0.0,
        explore=explored[rows],
    )
    return rows, item_idx, oracle, exposure


def _serve_with_logged_click_recall(cfg, rng, truth, preference, seed, req_user, req_day, day_zero, explored):
    """Day by day: half of each request popularity-drawn, half by a two-channel recall over the clicks
    the logging system saw on earlier days (item co-occurrence with the user's clicked items, and
    items of the categories the user clicked); then that day's exposure, whose clicks feed the next
    days' recall. A user without earlier clicks gets popularity draws in the recall half too."""
    n_items, k = cfg.n_items, cfg.candidates_per_request
    popularity = truth["popularity_prior"].to_numpy()
    pop_p = popularity / popularity.sum()
    pop_logw = popularity_log_weights(popularity, cfg.exposure_popularity_power, 0.0)
    # topic_id codes the catalog's `topic` column: observable item metadata, unlike the rest of the truth
    categories = np.eye(cfg.n_topics, dtype=np.float32)[truth["topic_id"].to_numpy()]
    in_category = categories / np.maximum(categories.sum(axis=0), 1.0)  # an item's share of its category
    policy = DailyExposure(cfg.n_users, n_items, categories, cfg.exposure, seed)
    clicked = np.zeros((cfg.n_users, n_items), dtype=np.float32)  # what the logging system has seen clicked
    similarity = np.zeros((n_items, n_items), dtype=np.float32)
    parts: list[tuple[np.ndarray, ...]] = []
    for day in range(cfg.n_days):
        requests = np.flatnonzero(req_day == day)
        if len(requests) == 0:
            continue
        if day % cfg.recall_retrain_every_days == 0:
            similarity = item_cooccurrence(clicked)
        by_pop = rng.choice(n_items, size=(len(requests), k // 2), p=pop_p)
        excluded = np.zeros((len(requests), n_items), dtype=bool)
        np.put_along_axis(excluded, by_pop, True, axis=1)
        profile = clicked[req_user[requests]]
        # each channel sums to 1 per user (0 without clicks); popularity far below: it fills what they cannot rank
        score = (
            _row_normalized(profile @ similarity)
            + _row_normalized((profile @ categories) @ in_category.T)
            + 1e-9 * pop_p
        )
        by_recall = sample_per_row_without(rng, score, excluded, k - k // 2)
        candidates = np.concatenate([by_pop, by_recall], axis=1).ravel()
        rows, item_idx = _unique_per_request(np.repeat(requests, k), candidates)
        oracle = _true_labels(cfg, rng, truth, preference, req_user[rows], item_idx)
        shown, propensity = policy.serve(
            day_zero + day,
            rows,
            req_user[rows],
            item_idx,
            oracle,
            pop_logw[item_idx],
            exposed_counts(rows, cfg.exposure_share, cfg.exposure.max_per_request),
            explored[rows],
        )
        clicked[req_user[rows[shown]], item_idx[shown]] = np.maximum(
            clicked[req_user[rows[shown]], item_idx[shown]], oracle[shown]
        )
        parts.append((rows, item_idx, oracle, shown, propensity))
    rows, item_idx, oracle, shown, propensity = (np.concatenate(p) for p in zip(*parts))
    return rows, item_idx, oracle, Exposure(shown, propensity, {**policy.info(), "recall": "logged_clicks"})


def _row_normalized(scores: np.ndarray) -> np.ndarray:
    return scores / np.maximum(scores.sum(axis=1, keepdims=True), 1e-12)
