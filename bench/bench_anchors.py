"""Benchmark: SmolLM2 anchors on both engines (CTranslate2 int8 and transformers) in the same run, and a
one-prompt-at-a-time loop on the same model as the baseline.

    python bench/bench_anchors.py --users 64 --rounds 3 --out /tmp/a.json [--levers]

* ``engines.<name>.users_per_s``: :class:`SmolLMAnchorGenerator` with its defaults on that engine
  (same prompts, parser, budget and decoding settings), the median over ``rounds`` passes over the
  same users; the engines alternate pass by pass, so a change of machine load hits both alike.
* ``users_per_s``: the default engine's number, next to ``goal_users_per_s`` (5).
* ``baseline_users_per_s``: the naive loop: the same GGUF weights (fp32, as loaded), the same
  prompt text per user, ``model.generate`` one prompt at a time, greedy, same ``max_new_tokens``.
* ``engines_agreement``: mean Jaccard overlap of the two engines' anchor sets per user (their int8
  numerics differ, so their greedy answers may too); the pseudo-label AUC of each engine's anchors is
  what ``gpl bench pseudo-labels --llm-engines`` measures.
* ``--levers``: also time single-lever variants of the default engine on the same users.

Histories are synthetic but realistic: MovieLens-style texts, each user drawn around one or two
favourite genres. Models are loaded and warmed up before timing (load time is reported apart).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

MOVIES = [
    "Toy Story (1995). Genres: Animation, Children's, Comedy",
    "Star Wars (1977). Genres: Action, Adventure, Romance, Sci-Fi, War",
    "Fargo (1996). Genres: Crime, Drama, Thriller",
    "Return of the Jedi (1983). Genres: Action, Adventure, Romance, Sci-Fi, War",
    "Contact (1997). Genres: Drama, Sci-Fi",
    "English Patient, The (1996). Genres: Drama, Romance, War",
    "Scream (1996). Genres: Horror, Thriller",
    "Liar Liar (1997). Genres: Comedy",
    "Air Force One (1997). Genres: Action, Thriller",
    "Independence Day (ID4) (1996). Genres: Action, Sci-Fi, War",
    "Raiders of the Lost Ark (1981). Genres: Action, Adventure",
    "Godfather, The (1972). Genres: Action, Crime, Drama",
    "Pulp Fiction (1994). Genres: Crime, Drama",
    "Twelve Monkeys (1995). Genres: Drama, Sci-Fi",
    "Silence of the Lambs, The (1991). Genres: Drama, Thriller",
    "Jerry Maguire (1996). Genres: Drama, Romance",
    "Rock, The (1996). Genres: Action, Adventure, Thriller",
    "Empire Strikes Back, The (1980). Genres: Action, Adventure, Drama, Romance, Sci-Fi, War",
    "Star Trek: First Contact (1996). Genres: Action, Adventure, Sci-Fi",
    "Titanic (1997). Genres: Action, Drama, Romance",
    "Back to the Future (1985). Genres: Comedy, Sci-Fi",
    "Mission: Impossible (1996). Genres: Action, Adventure, Mystery",
    "Fugitive, The (1993). Genres: Action, Thriller",
    "Indiana Jones and the Last Crusade (1989). Genres: Action, Adventure",
    "Willy Wonka and the Chocolate Factory (1971). Genres: Adventure, Children's, Comedy, Musical",
    "Princess Bride, The (1987). Genres: Action, Adventure, Comedy, Romance",
    "Forrest Gump (1994). Genres: Comedy, Romance, War",
    "Saint, The (1997). Genres: Action, Romance, Thriller",
    "Monty Python and the Holy Grail (1974). Genres: Comedy",
    "Full Monty, The (1997). Genres: Comedy",
    "Terminator, The (1984). Genres: Action, Sci-Fi, Thriller",
    "Alien (1979). Genres: Action, Horror, Sci-Fi, Thriller",
    "Shining, The (1980). Genres: Horror",
    "Casablanca (1942). Genres: Drama, Romance, War",
    "Lion King, The (1994). Genres: Animation, Children's, Musical",
    "Aladdin (1992). Genres: Animation, Children's, Comedy, Musical",
    "Beauty and the Beast (1991). Genres: Animation, Children's, Musical",
    "Sleepless in Seattle (1993). Genres: Comedy, Romance",
    "Die Hard (1988). Genres: Action, Thriller",
    "Usual Suspects, The (1995). Genres: Crime, Thriller",
    "Schindler's List (1993). Genres: Drama, War",
    "Braveheart (1995). Genres: Action, Drama, War",
    "Heat (1995). Genres: Action, Crime, Thriller",
    "Sense and Sensibility (1995). Genres: Drama, Romance",
    "Clueless (1995). Genres: Comedy, Romance",
    "Babe (1995). Genres: Children's, Comedy, Drama",
    "Dead Man Walking (1995). Genres: Drama",
    "Nightmare on Elm Street, A (1984). Genres: Horror",
]


def _genres(text: str) -> set[str]:
    return {g.strip() for g in text.split("Genres:")[-1].split(",")}


def synthetic_histories(n_users: int, seed: int = 0, min_len: int = 4, max_len: int = 12):
    """Users drawn around one or two favourite genres (plus some noise), most recent first."""
    from gpl_platform.pseudo_labels.anchors import UserHistory

    rng = random.Random(seed)
    all_genres = sorted(set().union(*(_genres(m) for m in MOVIES)))
    ids = {m: str(i + 1) for i, m in enumerate(MOVIES)}
    out = []
    for u in range(n_users):
        fav = set(rng.sample(all_genres, rng.choice([1, 2])))
        weights = [4.0 if _genres(m) & fav else 0.5 for m in MOVIES]
        n = rng.randint(min_len, max_len)
        chosen: list[str] = []
        while len(chosen) < n:
            m = rng.choices(MOVIES, weights)[0]
            if m not in chosen:
                chosen.append(m)
        out.append(UserHistory(f"u{u}", tuple(ids[m] for m in chosen), tuple(chosen)))
    return out


def _time_generator(gen, histories, k: int) -> tuple[float, dict]:
    gen.generate(histories[:2], k, progress=False)  # warm-up (model load, prefix cache)
    t0 = time.perf_counter()
    res = gen.generate(histories, k, progress=False)
    dt = time.perf_counter() - t0
    return len(histories) / dt, res.stats


def _baseline(gen, histories, k: int) -> tuple[float, int]:
    """One prompt at a time with HF generate on the fp32 model (the naive loop)."""
    import torch

    from gpl_platform.pseudo_labels.anchors.smollm_caches import load_model

    model, tok = load_model(gen.gguf_path, quantize=False)
    prompts = [gen.build_prompt(h, k) for h in histories]
    eos = [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]

    def one(p: str) -> int:
        x = tok(p, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            o = model.generate(
                **x,
                max_new_tokens=gen.params["max_new_tokens"],
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=tok.pad_token_id,
            )
        return int(o.shape[1] - x["input_ids"].shape[1])

    one(prompts[0])  # warm-up
    t0 = time.perf_counter()
    n_tok = sum(one(p) for p in prompts)
    dt = time.perf_counter() - t0
    return len(histories) / dt, n_tok


GOAL_USERS_PER_S = 5.0


def _jaccard(a, b) -> float:
    sa, sb = {t.lower() for t in a}, {t.lower() for t in b}
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def run(
    n_users: int = 64,
    out: Path | None = None,
    k: int = 5,
    levers: bool = False,
    seed: int = 0,
    rounds: int = 3,
    baseline_users: int = 16,
    model_dir: Path | None = None,
) -> dict:
    import statistics

    import torch

    from gpl_platform.pseudo_labels.anchors.smollm import SmolLMAnchorGenerator

    threads = os.cpu_count() or 2
    torch.set_num_threads(threads)
    histories = synthetic_histories(n_users, seed=seed)
    load_before = os.getloadavg()[0]
    generators, load_s = {}, {}
    for engine in ("ctranslate2", "transformers"):
        t0 = time.perf_counter()
        generators[engine] = SmolLMAnchorGenerator(engine=engine, model_dir=model_dir, num_threads=threads)
        generators[engine]._ensure_model()
        generators[engine].generate(histories[:2], k, progress=False)  # warm-up (prefix state)
        load_s[engine] = round(time.perf_counter() - t0, 1)
    passes: dict[str, list[float]] = {e: [] for e in generators}
    last: dict[str, tuple[dict, object]] = {}
    for _ in range(rounds):
        for engine, gen in generators.items():
            t0 = time.perf_counter()
            res = gen.generate(histories, k, progress=False)
            passes[engine].append(len(histories) / (time.perf_counter() - t0))
            last[engine] = (res.stats, res.anchors)
    engines = {}
    for engine, gen in generators.items():
        stats, anchors = last[engine]
        llm = anchors[~anchors["is_fallback"]]
        engines[engine] = {
            "users_per_s": round(statistics.median(passes[engine]), 3),
            "users_per_s_passes": [round(v, 3) for v in passes[engine]],
            "load_s": load_s[engine],
            "generated_tokens": stats.get("generated_tokens"),
            "generated_tokens_per_user": round(stats.get("generated_tokens", 0) / n_users, 1),
            "prefill_tokens_per_user": round(stats.get("prefill_tokens", 0) / n_users, 1),
            "llm_anchors_per_user": round(len(llm) / n_users, 2),
            "fallback_users": stats.get("fallback_users", 0),
            "stats": stats,
            "config": {"batch_size": gen.batch_size, **gen.params},
        }
    by_user = {e: last[e][1].groupby("user_id")["anchor_text"].apply(list) for e in generators}
    agreement = float(
        sum(_jaccard(by_user["ctranslate2"][h.user_id], by_user["transformers"][h.user_id]) for h in histories)
        / n_users
    )
    default = SmolLMAnchorGenerator().engine
    base_ups, base_tokens = _baseline(generators["transformers"], histories[:baseline_users], k)
    ups = engines[default]["users_per_s"]
    result: dict = {
        "users_per_s": ups,
        "default_engine": default,
        "goal_users_per_s": GOAL_USERS_PER_S,
        "goal_met": ups >= GOAL_USERS_PER_S,
        "engines": engines,
        "ctranslate2_vs_transformers": round(
            engines["ctranslate2"]["users_per_s"] / engines["transformers"]["users_per_s"], 2
        ),
        "engines_agreement": round(agreement, 3),
        "baseline_users_per_s": round(base_ups, 3),
        "baseline_users": len(histories[:baseline_users]),
        "baseline_generated_tokens": base_tokens,
        "ratio": round(ups / base_ups, 2) if base_ups else None,
        "n_users": n_users,
        "rounds": rounds,
        "k": k,
        "threads": threads,
        # the machine is shared: a load average above the core count means the timings are contended
        "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "cpu_count": os.cpu_count(),
        "example_anchors": {e: by_user[e][histories[0].user_id] for e in generators},
    }
    if levers:
        variants = {
            "no_early_stop": dict(early_stop=False),
            "batch_size_8": dict(batch_size=8),
            "batch_size_32": dict(batch_size=32),
            "max_history_items_4": dict(max_history_items=4),
            "max_new_tokens_24": dict(max_new_tokens=24),
        }
        result["levers_users_per_s"] = {}
        for name, kw in variants.items():
            v_ups, v_stats = _time_generator(
                SmolLMAnchorGenerator(engine=default, model_dir=model_dir, **kw), histories, k
            )
            result["levers_users_per_s"][name] = round(v_ups, 3)
            logging.getLogger("bench").info("lever %s: %.2f users/s (%s)", name, v_ups, v_stats)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str))
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--levers", action="store_true", help="also time single-lever variants")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    res = run(args.users, args.out, k=args.k, levers=args.levers, rounds=args.rounds)
    json.dump(res, sys.stdout, indent=2, default=str)
    print()


if __name__ == "__main__":
    main()
