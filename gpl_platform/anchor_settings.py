"""The settings of GPL's interest anchors: the generator backends (``settings.anchors``, env
``GPL_ANCHORS__...``) and the semantic IDs with their generator (``settings.sid``). Part of
:class:`gpl_platform.config.Settings`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr


class AnchorConfig(BaseModel):
    # chosen by the decision rules of docs/EVALUATION.md on validation days (reports/selection/)
    backend: Literal["smollm", "openai", "history", "sid"] = "sid"
    k: int = Field(5, gt=0, le=20, description="anchors per user")
    history_max_items: int = Field(6, gt=0, description="recent positives the generator reads")
    max_new_tokens: int = Field(40, gt=0)
    batch_size: int = Field(16, gt=0)
    max_item_tokens: int = Field(
        48,
        gt=0,
        description="a history item's text is cut to this many tokens in a prompt (counted as prompt_item_truncated)",
    )
    max_prompt_tokens: int = Field(
        768,
        gt=0,
        description="a whole prompt holds at most this many tokens: the "
        "oldest history items are left out first (counted as prompt_items_dropped)",
    )
    smollm_engine: Literal["ctranslate2", "transformers"] = Field(
        "ctranslate2",
        description="smollm: CTranslate2 int8 (converted once from the packaged model, cached "
        "under <data_dir>/artifacts/models) or the transformers path (also the fallback when CTranslate2 fails)",
    )
    openai_base_url: str = "http://127.0.0.1:8000/v1"
    openai_model: str = "SmolLM2-135M-Instruct"
    openai_endpoint: Literal["chat", "completions"] = "chat"
    openai_api_key: SecretStr | None = Field(
        None, description="API key (GPL_ANCHORS__OPENAI_API_KEY); none: the variable named by openai_api_key_env"
    )
    openai_api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the API key")
    openai_extra_body: dict[str, Any] = Field(
        default_factory=dict, description='fields merged into every request, e.g. {"top_k": 20} for vLLM'
    )
    openai_timeout_s: float = Field(30.0, gt=0, description="read timeout of one request")
    openai_connect_timeout_s: float = Field(5.0, gt=0)
    openai_max_retries: int = Field(
        3, ge=0, description="retries of timeouts, connection errors, 408/409/429 and 5xx (backoff honours Retry-After)"
    )
    openai_max_concurrency: int = Field(8, gt=0, description="requests in flight (and pooled connections)")
    openai_max_failure_share: float = Field(
        0.5,
        ge=0,
        le=1,
        description="users may fall back after failed requests up to this share; above it the run fails",
    )


class SemanticIdConfig(BaseModel):
    """RQ-VAE over the frozen item embeddings: each item gets ``levels`` codes plus a suffix that
    tells apart items sharing all of them (docs/SEMANTIC_IDS.md)."""

    levels: int = Field(3, ge=1, le=6)
    codebook_size: int | None = Field(
        None,
        ge=2,
        le=1024,
        description="codes per level; default: the power of two nearest to "
        "2 * n_items^(1/levels), at least 4 (1,682 MovieLens items -> 32)",
    )
    latent_dim: int = Field(32, gt=0)
    hidden_dim: int = Field(256, gt=0)
    warmup_epochs: int = Field(100, ge=0, description="full-batch autoencoder steps before the k-means codebook init")
    epochs: int = Field(600, gt=0, description="full-batch steps with quantization")
    lr: float = Field(2e-3, gt=0)
    commitment_beta: float = Field(0.25, ge=0)
    torch_threads: int | None = Field(
        1, ge=1, description="torch intra-op threads while the RQ-VAE trains (null: torch's default; see training)"
    )


class SidGeneratorConfig(BaseModel):
    """The generator of semantic IDs: a small decoder-only transformer trained from scratch on the code
    sequences of users' positives (docs/SEMANTIC_IDS.md says why not LoRA on SmolLM2)."""

    objective: Literal["next_day", "next_item"] = Field(
        "next_day",
        description="next_day: predict each positive of a day from the user's positives of the days "
        "before it (what anchors are for); next_item: next-token prediction over the whole sequence, mostly "
        "within one rating session",
    )
    d_model: int = Field(64, gt=0)
    layers: int = Field(2, gt=0)
    heads: int = Field(4, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    max_history_items: int = Field(12, gt=0, description="most recent positives in a training window or prompt")
    epochs: int = Field(
        20,
        gt=0,
        description="passes over the training examples (the next_item numbers in "
        "docs/SEMANTIC_IDS.md were measured at 40)",
    )
    batch_size: int = Field(64, gt=0)
    lr: float = Field(3e-3, gt=0)
    popular_subsample_t: float = Field(
        1e-3,
        ge=0,
        description="an occurrence of item i (share f_i of all positives) is kept in a training history "
        "with probability min(1, sqrt(t / f_i)), redrawn every epoch; 0 keeps everything",
    )
    shuffle_within_day: bool = Field(
        False,
        description="shuffle a user's positives of the same day before training: the order within a "
        "burst of ratings is the website's listing order, not the user's path",
    )
    retrain_every_days: int = Field(
        30,
        gt=0,
        description="a model trained on positives before refit day R serves "
        "R .. R+N-1 (refit days are every N days since 1970-01-01)",
    )
    min_training_positives: int = Field(
        200,
        gt=0,
        description="fewer positives to learn before R (next_day: those "
        "on a user's second or later day): no model, the days it would serve get "
        "history anchors (counted fallback)",
    )
    beam_size: int = Field(24, gt=0, description="beams of the prefix-constrained search (>= k)")
    exclude_history: bool = Field(True, description="never return an item the user already has in the history")
    anchor_vector: Literal["items", "codebook"] = Field(
        "items",
        description="anchor vector of a generated ID: mean embedding of the items under its codes, or the "
        "RQ-VAE decoding of its codebook vectors",
    )
    torch_threads: int | None = Field(
        1,
        ge=1,
        description="torch intra-op threads while the generator trains or generates (null: torch default)",
    )


#: SidGeneratorConfig fields that only change generation, not the trained model
SID_GENERATION_FIELDS = frozenset({"beam_size", "exclude_history", "anchor_vector", "min_training_positives"})


class SidConfig(BaseModel):
    semantic_ids: SemanticIdConfig = SemanticIdConfig()
    generator: SidGeneratorConfig = SidGeneratorConfig()
