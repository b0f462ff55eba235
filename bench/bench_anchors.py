"""Benchmark: batched SmolLM2 anchor generation vs a one-prompt-at-a-time loop on the same model.

    python bench/bench_anchors.py --users 32 --out /tmp/a.json [--levers]

* ``users_per_s``: :class:`SmolLMAnchorGenerator` with its defaults (int8 dynamic quantization,
  shared-prefix KV cache, batched greedy decoding with early exit).
* ``baseline_users_per_s``: the naive loop: the same GGUF weights (fp32, as loaded), the same
  prompt text per user, ``model.generate`` one prompt at a time, greedy, same ``max_new_tokens``.
* ``--levers``: also time single-lever variants of the batched backend on the same users.

Histories are synthetic but realistic: MovieLens-style texts, each user drawn around one or two
favourite genres. The model is loaded and warmed up before timing (load time is reported apart).
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
    from gpl_platform.anchors import UserHistory

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

    from gpl_platform.anchors.smollm import load_model

    model, tok = load_model(gen.gguf_path, quantize=False)
    prompts = [gen.build_prompt(h, k) for h in histories]
    eos = [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]

    def one(p: str) -> int:
        x = tok(p, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            o = model.generate(
                **x, max_new_tokens=gen.params["max_new_tokens"], do_sample=False,
                eos_token_id=eos, pad_token_id=tok.pad_token_id,
            )
        return int(o.shape[1] - x["input_ids"].shape[1])

    one(prompts[0])  # warm-up
    t0 = time.perf_counter()
    n_tok = sum(one(p) for p in prompts)
    dt = time.perf_counter() - t0
    return len(histories) / dt, n_tok


def run(n_users: int = 32, out: Path | None = None, k: int = 5, levers: bool = False, seed: int = 0) -> dict:
    import torch

    from gpl_platform.anchors.smollm import SmolLMAnchorGenerator

    torch.set_num_threads(os.cpu_count() or 2)
    histories = synthetic_histories(n_users, seed=seed)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    gen = SmolLMAnchorGenerator()
    gen._ensure_model()
    load_s = time.perf_counter() - t0
    ups, stats = _time_generator(gen, histories, k)
    base_ups, base_tokens = _baseline(gen, histories, k)
    result: dict = {
        "users_per_s": round(ups, 3),
        "baseline_users_per_s": round(base_ups, 3),
        "ratio": round(ups / base_ups, 2) if base_ups else None,
        "n_users": n_users,
        "k": k,
        "threads": torch.get_num_threads(),
        "load_s": round(load_s, 1),
        "batched_config": {"batch_size": gen.batch_size, **gen.params},
        "batched_generated_tokens": stats.get("generated_tokens"),
        "baseline_generated_tokens": base_tokens,
        "batched_stats": stats,
        # the machine is shared: a load average above the core count means the timings are
        # contended (both sides of the ratio run in the same process, one after the other)
        "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "cpu_count": os.cpu_count(),
    }
    if levers:
        variants = {
            "fp32_weights": dict(quantize=False),
            "no_prefix_cache": dict(use_prefix_cache=False),
            "no_early_stop": dict(early_stop=False),
            "batch_size_8": dict(batch_size=8),
            "batch_size_32": dict(batch_size=32),
            "max_history_items_4": dict(max_history_items=4),
            "sampling_t0.7": dict(temperature=0.7),
            "one_at_a_time_int8_prefix": dict(batch_size=1),
        }
        result["levers_users_per_s"] = {}
        for name, kw in variants.items():
            v_ups, v_stats = _time_generator(SmolLMAnchorGenerator(**kw), histories, k)
            result["levers_users_per_s"][name] = round(v_ups, 3)
            logging.getLogger("bench").info("lever %s: %.2f users/s (%s)", name, v_ups, v_stats)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=32)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--levers", action="store_true", help="also time single-lever variants")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    res = run(args.users, args.out, k=args.k, levers=args.levers)
    json.dump(res, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
