"""The HTTP feature server of ``python -m gpl_platform.features serve``: Feast's own app (the one ``feast serve``
runs, ``feast.feature_server.get_app``) on 127.0.0.1, behind a check of ``POST /get-online-features``.

Why the check: Feast answers a malformed entity request with 500 and an internal message (entity lists of
different lengths: "All entity rows must have the same columns."; a missing join key: a ``KeyError``; a null
id: an ``AttributeError``), which reads as a fault of the server, not of the caller. :class:`EntityCheck`
answers 422 with what is wrong and the names involved instead, before Feast sees the request, when:

* ``entities`` is empty, names a key that is no join key (or request field) of the registry, or lacks one
  that the asked features need;
* its lists have different lengths, or are empty;
* a value is not a string or a finite number (null, a list, an object, NaN);
* no features are asked for (neither ``feature_service`` nor ``features``), or a reference is not
  ``view:feature``.

A body that is not JSON, not an object, or whose ``entities`` is not an object of lists goes to Feast
unchanged, and FastAPI's validation answers 422 naming the field; so do well-formed requests and every other
endpoint. An unknown feature service or view stays Feast's 404.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field

from gpl_platform.config import load_settings
from gpl_platform.features.feast_import import import_feast
from gpl_platform.features.store import FeastStore

log = logging.getLogger(__name__)

ONLINE_PATH = "/get-online-features"
DUMMY_KEY = "__dummy_id"  # Feast's join key of entity-less views: never sent by a caller


def _aliased(keys: set[str], join_key_map: dict[str, str]) -> set[str]:
    return {join_key_map.get(key, key) for key in keys}


@dataclass(frozen=True)
class JoinKeys:
    """The registry's join keys: which a request may name, which each feature view and service needs."""

    known: frozenset[str] = frozenset()
    views: dict[str, set[str]] = field(default_factory=dict)
    services: dict[str, set[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, store) -> JoinKeys:
        known = {entity.join_key for entity in store.list_entities(allow_cache=True)}
        stored = [*store.list_feature_views(allow_cache=True), *store.list_stream_feature_views(allow_cache=True)]
        views = {view.name: set(view.join_keys) - {DUMMY_KEY} for view in stored}
        for view in store.list_on_demand_feature_views(allow_cache=True):
            keys = set()
            for projection in view.source_feature_view_projections.values():
                keys |= _aliased(views.get(projection.name, set()), projection.join_key_map)
            for source in view.source_request_sources.values():
                keys |= {f.name for f in source.schema}
            views[view.name] = keys
            known |= keys
        services = {}
        for service in store.list_feature_services():
            keys = set()
            for projection in service.feature_view_projections:
                keys |= _aliased(views.get(projection.name, set()), projection.join_key_map)
            services[service.name] = keys
            known |= keys
        return cls(frozenset(known), views, services)

    def needed(self, service: str | None, refs: list[str]) -> tuple[set[str], str] | None:
        """The join keys the asked features need, and what needs them; None when the registry does not
        know a name (Feast answers that with 404)."""
        if service:
            keys = self.services.get(service)
            return None if keys is None else (keys, f"feature service {service}")
        names = sorted({ref.split(":", 1)[0].split("@", 1)[0] for ref in refs})
        if any(name not in self.views for name in names):
            return None
        return set().union(*(self.views[name] for name in names)), f"feature view(s) {', '.join(names)}"


class RegistryKeys:
    """:class:`JoinKeys` of Feast's registry, read again at most every ``ttl_s`` seconds (the registry's own
    refresh period): reading the registry's objects takes milliseconds that a request must not pay."""

    def __init__(self, store, ttl_s: float):
        self.store, self.ttl_s = store, ttl_s
        self.lock = threading.Lock()
        self.keys, self.read_at = JoinKeys(), -math.inf

    def current(self) -> JoinKeys:
        with self.lock:
            if time.monotonic() - self.read_at >= self.ttl_s:
                self.keys, self.read_at = JoinKeys.of(self.store), time.monotonic()
            return self.keys


def _bad_value(value) -> str | None:
    """Why ``value`` cannot be an entity id (Feast fails on it with 500), or None."""
    if value is None:
        return "null"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value} (not a finite number)"
    if isinstance(value, list | dict):
        return f"a JSON {'array' if isinstance(value, list) else 'object'}"
    return None


def entity_problem(body: bytes, registry: RegistryKeys) -> dict | None:
    """The 422 answer to a ``/get-online-features`` body Feast would fail on with 500, or None to pass it on."""
    try:
        request = json.loads(body)
    except ValueError:
        return None
    if not isinstance(request, dict):
        return None
    entities, service, refs = request.get("entities"), request.get("feature_service"), request.get("features", [])
    if not isinstance(entities, dict) or not all(isinstance(values, list) for values in entities.values()):
        return None
    if not (service is None or isinstance(service, str)) or not (
        isinstance(refs, list) and all(isinstance(ref, str) for ref in refs)
    ):
        return None
    if not entities:
        return {"detail": "entities is empty: give one list of ids per join key, e.g. {'user_id': [...]}"}
    if not service and not refs:
        return {"detail": "no features asked for: give a feature_service or a non-empty features list"}
    bad_refs = [ref for ref in refs if ":" not in ref] if not service else []
    if bad_refs:
        return {"detail": f"feature references must be 'view:feature', not {bad_refs}", "features": bad_refs}
    keys = registry.current()
    unknown = sorted(set(entities) - keys.known)
    if unknown:
        known = sorted(keys.known)
        return {"detail": f"unknown entity key(s) {unknown}: this store's join keys are {known}", "unknown": unknown}
    lengths = {key: len(values) for key, values in entities.items()}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{key} has {n}" for key, n in lengths.items())
        return {
            "detail": f"entity lists have different lengths ({listed}): give one value per row in each",
            "lengths": lengths,
        }
    if not any(lengths.values()):
        return {"detail": f"entity lists are empty ({', '.join(lengths)}): ask for at least one row"}
    for key, values in entities.items():
        for i, value in enumerate(values):
            why = _bad_value(value)
            if why is not None:
                return {"detail": f"entities.{key}[{i}] is {why}: entity values must be strings or numbers"}
    needed = keys.needed(service, refs)
    if needed is not None:
        missing = sorted(needed[0] - set(entities))
        if missing:
            return {"detail": f"missing entity key(s) {missing}, needed by {needed[1]}", "missing": missing}
    return None


class EntityCheck:
    """ASGI middleware: refuses malformed ``POST /get-online-features`` bodies (:func:`entity_problem`)
    with 422, and passes everything else to ``app`` (the body replayed as it came)."""

    def __init__(self, app, registry: RegistryKeys):
        self.app, self.registry = app, registry

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != ONLINE_PATH:
            await self.app(scope, receive, send)
            return
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import JSONResponse

        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:  # in a thread: rebuilding the registry's keys reads the registry
            problem = await run_in_threadpool(entity_problem, body, self.registry)
        except Exception:  # the check only explains refusals: it must never fail a request by itself
            log.exception("checking a /get-online-features request failed; passing it to Feast unchecked")
            problem = None
        if problem is not None:
            await JSONResponse(problem, status_code=422)(scope, receive, send)
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def create_app():
    """uvicorn's app factory (every worker process builds its own) for the settings of the environment."""
    import_feast()
    from feast.feature_server import get_app
    from feast.permissions.server.utils import (
        ServerType,
        init_auth_manager,
        init_security_manager,
        str_to_auth_manager_type,
    )

    settings = load_settings()
    store = FeastStore(settings).store
    ttl_s = settings.feature_store.registry_cache_ttl_s
    # as `feast serve` does before it builds the app: the auth of the config (none in the rendered one)
    auth_type = str_to_auth_manager_type(store.config.auth_config.type)
    init_security_manager(auth_type=auth_type, fs=store)
    init_auth_manager(server_type=ServerType.REST, auth_type=auth_type, auth_config=store.config.auth_config)
    app = EntityCheck(get_app(store, registry_ttl_sec=ttl_s), RegistryKeys(store, ttl_s))
    # The startup objects (Feast, torch, pandas: ~350,000) out of the collector's sight: a full
    # collection over them took ~180 ms, once every ~150 requests of 100 items, which was the p99
    gc.freeze()
    return app


def serve(port: int, workers: int = 1) -> None:
    import uvicorn

    uvicorn.run(f"{__name__}:create_app", factory=True, host="127.0.0.1", port=port, workers=workers)
