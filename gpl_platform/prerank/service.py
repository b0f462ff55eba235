"""`gpl serve`: the pre-rank scoring service over HTTP (FastAPI on uvicorn, 127.0.0.1 by default).

    POST /score   {"user_id": "196", "item_ids": ["242", "302"]}
               -> {"scores": [...], "model_version", "model_shape", "feature_service", "features_version",
                   "unknown_user", "unknown_items", "out_of_vocabulary_user", "out_of_vocabulary_items", ...}
    GET  /health  -> the model and features being served, cache size, reload counters

A background thread looks every ``serving.refresh_interval_s`` for (1) a newer model under the
models directory and (2) a newer materialization of the item views; each is loaded or rebuilt
beside the one in use and swapped in with one assignment, so requests in flight finish on the old
one and none is dropped. A model that fails to load is logged and counted; the old one stays.
The poll is not what keeps items and users consistent: each request also checks the materialization
stamp after reading its user row and, when a newer materialization was recorded, waits for the item
side of it (``PreRankScorer.current_items``), so a response never scores a user row of day D+1
against item rows of day D (``items_rebuilt_on_request`` in /health counts those waits).

Bad requests (malformed JSON, missing fields, wrong types, empty or oversized candidate lists,
duplicate or empty ids) get a 4xx with ``{"error": ..., "detail": ...}``, never a 500.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from gpl_platform.features.store import FeastStore
from gpl_platform.prerank.serving import PreRankScorer

log = logging.getLogger(__name__)


class ModelNotFound(FileNotFoundError):
    pass


def newest_model_dir(source: Path) -> Path:
    """``source`` itself when it is a model directory, else its newest model (by ``model.json`` time)."""
    source = Path(source)
    if (source / "model.json").exists():
        return source
    candidates = [d for d in source.iterdir() if (d / "model.json").exists()] if source.is_dir() else []
    if not candidates:
        raise ModelNotFound(
            f"{source}: no model (a directory with model.json); materialize prerank_model first "
            "(make demo), or pass --model"
        )
    return max(candidates, key=lambda d: ((d / "model.json").stat().st_mtime_ns, d.name))


class ScoringService:
    """The scorer in use, and the refresher that swaps in newer models and item features."""

    def __init__(self, settings, model: Path | None = None, refresh_interval_s: float | None = None):
        import torch

        self.settings = settings
        torch.set_num_threads(settings.serving.torch_threads)
        self.model_source = Path(model or settings.serving.model or settings.artifacts_dir / "models")
        self.pinned = (self.model_source / "model.json").exists()
        self.refresh_interval_s = refresh_interval_s or settings.serving.refresh_interval_s
        self.max_items = settings.serving.max_items
        self.store = FeastStore(settings)  # per-request reads
        self._registry_store = FeastStore(settings)  # the refresher's own registry and item reads
        self.stats = {
            "model_reloads": 0,
            "model_reload_errors": 0,
            "item_refreshes": 0,
            "refresh_errors": 0,
            "last_error": None,
        }
        self._requests = itertools.count(1)
        self._refused: dict[Path, int] = {}
        self.requests = 0
        self.scorer = self._load(newest_model_dir(self.model_source))
        self.started_at = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _load(self, model_dir: Path) -> PreRankScorer:
        return PreRankScorer(model_dir, self.store, registry_store=self._registry_store)

    # ---- refresh -------------------------------------------------------------------------------
    def refresh(self) -> dict:
        """One look for a newer model and a newer item materialization; what changed."""
        changed = {"model": False, "items": False}
        current = self.scorer
        newest = None if self.pinned else newest_model_dir(self.model_source)
        if newest is not None and newest.resolve() != current.model_dir.resolve():
            stamp = (newest / "model.json").stat().st_mtime_ns
            if self._refused.get(newest) != stamp:  # a model that failed to load is tried again only once changed
                try:
                    self.scorer = current = self._load(newest)
                    self.stats["model_reloads"] += 1
                    changed["model"] = True
                    log.warning(
                        "serving model %s (%s, %s)", current.model_version, current.model.shape, current.service
                    )
                except Exception as exc:  # a broken new model: keep serving the old one
                    self._refused[newest] = stamp
                    self.stats["model_reload_errors"] += 1
                    self.stats["last_error"] = f"model reload of {newest.name}: {exc}"
                    log.error("model reload of %s failed, still serving %s: %s", newest, current.model_version, exc)
        try:
            if not changed["model"] and current.refresh_items(self._registry_store):
                self.stats["item_refreshes"] += 1
                changed["items"] = True
        except Exception as exc:
            self.stats["refresh_errors"] += 1
            self.stats["last_error"] = f"item refresh: {exc}"
            log.error("item features refresh failed, keeping %s: %s", current.items.version, exc)
        return changed

    def start(self) -> None:
        def loop():
            while not self._stop.wait(self.refresh_interval_s):
                self.refresh()

        self._thread = threading.Thread(target=loop, name="gpl-serve-refresh", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # ---- requests ------------------------------------------------------------------------------
    def health(self) -> dict:
        scorer = self.scorer
        return {
            "status": "ok",
            "model_version": scorer.model_version,
            "model_shape": scorer.model.shape,
            "model_dir": str(scorer.model_dir),
            "feature_service": scorer.service,
            "features_version": scorer.items.version,
            "items_cached": len(scorer.items.ids),
            "item_side_build_s": round(scorer.items.built_s, 3),
            "online_store": self.store.online_store_type,
            "max_items": self.max_items,
            "refresh_interval_s": self.refresh_interval_s,
            "pinned_model": self.pinned,
            "uptime_s": round(time.time() - self.started_at, 1),
            "requests": self.requests,
            "items_rebuilt_on_request": scorer.refreshes_on_request,
            "item_rebuild_errors_on_request": scorer.refresh_errors_on_request,
            **self.stats,
        }

    def score(self, user_id: str, item_ids: list[str]) -> dict:
        scorer = self.scorer  # one model and one item side for the whole request
        scored = scorer.score(user_id, item_ids)
        self.requests = next(self._requests)
        return {
            "user_id": user_id,
            "scores": scored.scores.astype(float).tolist(),
            "model_version": scored.model_version,
            "model_shape": scorer.model.shape,
            "feature_service": scored.feature_service,
            "features_version": scored.features_version,
            "unknown_user": scored.unknown_user,
            "unknown_items": scored.unknown_items,
            "out_of_vocabulary_user": scored.out_of_vocabulary_user,
            "out_of_vocabulary_items": scored.out_of_vocabulary_items,
        }


class ScoreRequest(BaseModel):
    """The body of POST /score (strict: a number is not an id, extra fields are refused)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    user_id: str = Field(description="the user to score for")
    item_ids: list[str] = Field(description="the recalled candidates, each once")


class RequestError(ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def check_request(user_id: str, item_ids: list[str], max_items: int) -> None:
    """What pydantic does not say: empty, oversized, duplicated or blank ids."""
    if not user_id.strip():
        raise RequestError(422, "user_id is empty")
    if not item_ids:
        raise RequestError(422, "item_ids is empty: send at least one candidate")
    if len(item_ids) > max_items:
        raise RequestError(
            413,
            f"item_ids has {len(item_ids)} ids; at most {max_items} per request "
            "(serving.max_items): split the candidates",
        )
    blank = sum(1 for i in item_ids if not i.strip())
    if blank:
        raise RequestError(422, f"item_ids has {blank} empty id(s)")
    if len(set(item_ids)) != len(item_ids):
        seen, repeated = set(), []
        for i in item_ids:
            if i in seen and i not in repeated:
                repeated.append(i)
            seen.add(i)
        raise RequestError(
            422, f"item_ids repeats {len(repeated)} id(s) (e.g. {repeated[:3]}): send each candidate once"
        )


def create_app(service: ScoringService):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(
        title="gpl-platform pre-rank scoring",
        version="1",
        description="Pre-rank scores of recalled candidates, with the model and feature versions.",
    )

    def error(status: int, message: str, detail=None) -> JSONResponse:
        return JSONResponse(status_code=status, content={"error": message, "detail": detail})

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        problems = [
            {
                "field": ".".join(str(p) for p in e.get("loc", ())[1:]) or "body",
                "problem": e.get("msg"),
                "type": e.get("type"),
            }
            for e in exc.errors()
        ]
        if any(p["type"] == "json_invalid" for p in problems):
            return error(400, "the body is not valid JSON", problems)
        summary = "; ".join(f"{p['field']}: {p['problem']}" for p in problems[:5])
        return error(422, f"invalid request: {summary}", problems)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):  # a bug, not a bad request: say so, log it
        log.exception("scoring failed")
        return error(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.get("/health")
    def health():
        return service.health()

    @app.post("/score")
    def score(body: ScoreRequest):
        try:
            check_request(body.user_id, body.item_ids, service.max_items)
        except RequestError as exc:
            return error(exc.status, str(exc))
        # json.dumps directly: FastAPI's encoder walks every float in Python
        return Response(content=json.dumps(service.score(body.user_id, body.item_ids)), media_type="application/json")

    return app


def serve(
    settings,
    host: str | None = None,
    port: int | None = None,
    model: Path | None = None,
    refresh_interval_s: float | None = None,
) -> None:
    """Load the model and the item side, then answer on ``host:port`` until SIGINT/SIGTERM."""
    import uvicorn

    service = ScoringService(settings, model, refresh_interval_s)
    host, port = host or settings.serving.host, port or settings.serving.port
    health = service.health()
    log.warning(
        "gpl serve: model %s (%s, %s), %d items cached (materialization %s), on http://%s:%d",
        health["model_version"],
        health["model_shape"],
        health["feature_service"],
        health["items_cached"],
        health["features_version"].get("id"),
        host,
        port,
    )
    service.start()
    try:
        uvicorn.run(create_app(service), host=host, port=port, log_level="warning", access_log=False)
    finally:
        service.stop()
