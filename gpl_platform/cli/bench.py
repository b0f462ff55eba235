"""`gpl bench ...`: benchmarks with JSON output (the scripts live in bench/)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import typer

from gpl_platform.config import PROJECT_ROOT

bench_app = typer.Typer(
    help="Benchmarks: JSON output, ratios against a baseline measured in the same run.", no_args_is_help=True
)


def _bench_module(name: str):
    path = PROJECT_ROOT / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"gpl_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _emit(result: dict, out: Path | None) -> None:
    text = json.dumps(result, indent=2, default=str)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, out)
    typer.echo(text)


@bench_app.command("pseudo-labels")
def bench_pseudo_labels(
    out: Path | None = typer.Option(None, help="write the JSON report here"),
    source: str = typer.Option("movielens-100k", help="a source with oracle labels"),
    skip_pipeline: bool = typer.Option(False, help="use the warehouse as it is (do not materialize first)"),
    llm_engines: bool = typer.Option(
        False,
        help="score SmolLM2 anchors of both engines (llm_ctranslate2, "
        "llm_transformers) instead of the configured one alone",
    ),
    day_range: str | None = typer.Option(
        None,
        help="only the days START..END (YYYY-MM-DD..YYYY-MM-DD), e.g. "
        "the validation days: LLM anchors of every history take a while",
    ),
) -> None:
    """AUC of pseudo-labels against oracle labels of unexposed candidates: LLM vs history vs semantic-ID anchors
    vs random, max vs mean pooling, and how confidence tracks correctness."""
    from gpl_platform.config import load_settings
    from gpl_platform.data.warehouse import Warehouse
    from gpl_platform.evaluation.pseudo_label_quality import pseudo_label_quality
    from gpl_platform.pseudo_labels.model_loading import anchor_generator, sentence_encoder

    def with_source(overrides: dict):  # the environment's settings, the source of --source and ``overrides``
        return load_settings({"source": source, **overrides})

    settings = with_source({})
    if not skip_pipeline:
        from gpl_platform.cli.orchestration import runner

        orchestration = runner()
        selection = [*orchestration.LABELLING_ASSETS, "item_semantic_ids", "sid_generator"]
        if not orchestration.run_pipeline(selection=selection, settings=settings).success:
            raise typer.Exit(1)
    warehouse = Warehouse.for_settings(settings)
    days = sorted(warehouse.written_days("user_histories"))
    if day_range:
        first, _, last = day_range.partition("..")
        days = [d for d in days if first <= str(d) <= (last or first)]
        if not days:
            raise typer.BadParameter(f"no materialized days in {day_range}", param_hint="--day-range")
    encoder = sentence_encoder(str(settings.encoder_dir) if settings.encoder_dir else None)
    # The SID anchors under the other anchor-vector mode too (same trained generators, same IDs): which of
    # "mean of the items under the codes" and "RQ-VAE decoding of the codes" works better is measured here.
    mode = settings.sid.generator.anchor_vector
    other = "codebook" if mode == "items" else "items"
    other_settings = with_source({"sid": {"generator": {"anchor_vector": other}}})
    # "llm" is SmolLM2 whatever the default backend is (the default, sid, has its own rows)
    llm = {"llm": anchor_generator(settings, "smollm")}
    if llm_engines:
        llm = {
            f"llm_{engine}": anchor_generator(with_source({"anchors": {"smollm_engine": engine}}), "smollm")
            for engine in ("ctranslate2", "transformers")
        }
    generators = {
        **llm,
        "history": anchor_generator(settings, "history"),
        "sid": anchor_generator(settings, "sid"),
        f"sid_{other}": anchor_generator(other_settings, "sid"),
    }
    report = pseudo_label_quality(
        warehouse,
        days,
        generators,
        encoder,
        settings.anchors.k,
        settings.anchors.history_max_items,
        settings.seed,
        settings.source,
    )
    report["sid_anchor_vector"] = mode
    _emit(report, out)


@bench_app.command("bias-sweep")
def bench_bias_sweep(
    source: str = typer.Option(..., help="movielens-100k | simulator"),
    out: Path = typer.Option(..., help="the sweep's JSON; the lift plot is written beside it"),
    setting: list[str] | None = typer.Option(
        None, "--setting", help="run only these settings (repeatable; default: the whole grid of docs/EVALUATION.md)"
    ),
    seed: list[int] | None = typer.Option(None, "--seed", help="seeds (repeatable; default: training.seeds)"),
    method: list[str] | None = typer.Option(None, "--method", help="methods (repeatable; default: the sweep's)"),
    preranker: list[str] | None = typer.Option(
        None, "--preranker", help="pre-rankers as shape[:feature_service] (repeatable; default: mlp, two_tower, cold)"
    ),
    data_root: Path | None = typer.Option(
        None, help="where the settings' warehouses go (default: data/bias_sweep/<source>)"
    ),
    results_doc: Path | None = typer.Option(
        None,
        help="also write the sweep's tables into this markdown file (between generated markers; e.g. docs/RESULTS.md)",
    ),
    resume: bool = typer.Option(
        False,
        help="read a setting's existing evaluation report (same methods, "
        "pre-rankers and seeds) instead of running it again",
    ),
    world: list[int] | None = typer.Option(
        None,
        "--world",
        help="world seeds of each setting (repeatable; default: 42, 7, 13 on the simulator, 42 on MovieLens)",
    ),
    tune: bool = typer.Option(
        True,
        help="tune every method on validation days first (docs/EVALUATION.md, 'Tuning'); --no-tune: settings as given",
    ),
) -> None:
    """Protocol settings from no selection bias to a logging policy's feedback loop: every method on each over
    several worlds, tuned by one rule, gpl against every baseline and control with 95% intervals, and the
    pseudo-label ceiling."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("dagster", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    sweep = _bench_module("bench_bias_sweep").run(
        source,
        out,
        setting,
        seed,
        method,
        preranker,
        data_root,
        results_doc=results_doc,
        resume=resume,
        worlds=world,
        tune=tune,
    )
    typer.echo(
        json.dumps(
            {
                "out": str(out),
                "seconds": sweep["seconds"],
                "lift": _bench_module("bench_bias_sweep").lift_summary(sweep),
            },
            indent=2,
            default=str,
        )
    )


@bench_app.command("learning-curve")
def bench_learning_curve(
    size: list[str] = typer.Option(
        ..., "--size", help="a world size USERSxDAYS of the simulator (repeatable), e.g. --size 500x14 --size 5000x60"
    ),
    out: Path = typer.Option(..., help="the curve's JSON; the plot is written beside it (<stem>.png)"),
    setting: str = typer.Option("logging_10", help="the bias-sweep setting every size runs"),
    world: list[int] | None = typer.Option(None, "--world", help="world seeds (repeatable; default 42)"),
    seed: list[int] | None = typer.Option(None, "--seed", help="training seeds (repeatable; default 0)"),
    preranker: str = typer.Option("mlp:prerank_v2", help="the pre-ranker as shape[:feature_service]"),
    data_root: Path | None = typer.Option(
        None, help="where the sizes' worlds go (default: data/learning_curve/simulator)"
    ),
    resume: bool = typer.Option(False, help="reuse what a size's world already recorded; run only what is missing"),
    content: bool = typer.Option(
        True, "--content/--no-content", help="--no-content: label quality and cost only, no pre-ranker is trained"
    ),
) -> None:
    """Label quality and GPL's content share as the simulator's world grows, with the generator's cost beside
    them (docs/EVALUATION.md, "Learning curve")."""
    import logging

    from gpl_platform.evaluation.bias_sweep import SWEEP_SETTINGS
    from gpl_platform.evaluation.learning_curve import parse_sizes

    try:
        parse_sizes(size)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--size") from None
    if setting not in SWEEP_SETTINGS["simulator"]:
        known = ", ".join(SWEEP_SETTINGS["simulator"])
        raise typer.BadParameter(f"unknown setting {setting!r} (the simulator's: {known})", param_hint="--setting")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("dagster", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    curve = _bench_module("bench_learning_curve").run(
        size, out, setting, world, seed, preranker, data_root, resume=resume, content=content
    )
    typer.echo(
        json.dumps({"out": str(out), "seconds": curve["seconds"], "reading": curve["reading"]}, indent=2, default=str)
    )


@bench_app.command("choose-defaults")
def bench_choose_defaults(
    source: str = typer.Option(..., help="movielens-100k | simulator"),
    selection: Path = typer.Option(..., help="a bias sweep of the source's reference setting (its JSON)"),
    out: Path = typer.Option(..., help="the decisions, with every number behind them (JSON)"),
    setting: str | None = typer.Option(None, help="default: the source's reference setting (logging_10)"),
    data_root: Path | None = typer.Option(None, help="where that sweep put the settings' warehouses"),
) -> None:
    """The decision rules of docs/EVALUATION.md on validation days only: anchors and pooling, pre-ranker shape,
    lambda and confidence exponents."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    decision = _bench_module("bench_choose_defaults").run(source, selection, out, setting, data_root)
    typer.echo(json.dumps(decision["defaults"], indent=2))


@bench_app.command("anchors")
def bench_anchors(
    users: int = typer.Option(64, help="users to generate anchors for"),
    rounds: int = typer.Option(3, help="timed passes per engine (alternating engines)"),
    levers: bool = typer.Option(False, help="also time single-lever variants"),
    out: Path | None = typer.Option(None),
) -> None:
    """SmolLM2 anchors users/s on both engines (CTranslate2, transformers) and one prompt at a time, same run."""
    from gpl_platform.config import load_settings

    model_dir = load_settings().artifacts_dir / "models"
    _emit(_bench_module("bench_anchors").run(users, out, levers=levers, rounds=rounds, model_dir=model_dir), None)


@bench_app.command("pseudo-label-speed")
def bench_pseudo_label_speed(candidates: int = typer.Option(1_000_000), out: Path | None = typer.Option(None)) -> None:
    """Pseudo-label scoring candidates/s: vectorized vs a per-user loop, same data, same run."""
    _emit(_bench_module("bench_pseudo_label_speed").run(candidates, out), None)


@bench_app.command("scale")
def bench_scale(
    candidates: list[int] = typer.Option([1_000_000], "--candidates", help="world sizes (repeatable)"),
    days: int = typer.Option(7, help="days of each world"),
    candidates_per_request: int = typer.Option(100),
    items: int = typer.Option(2000, help="catalog size (fixed across sizes)"),
    ray_at: int = typer.Option(1_000_000, help="size at which Ray runs with 1 and 2 workers (0: never)"),
    batch_candidates: int = typer.Option(250_000, help="streaming batch size"),
    sid_epochs: int = typer.Option(2, help="epochs of the SID generator (training cost grows with the positives)"),
    work_dir: Path | None = typer.Option(None, help="where the worlds' warehouses go (default data/bench_scale)"),
    resume: bool = typer.Option(False, help="keep the sizes already in --out"),
    skip: list[str] | None = typer.Option(
        None,
        "--skip",
        help="stages not to run (repeatable; e.g. the sid stages, whose generator training dominates large sizes)",
    ),
    out: Path | None = typer.Option(
        None,
        help="JSON; the log-log plot goes beside it (default "
        "<data_dir>/reports/scale/scale.json; --out reports/scale/scale.json updates "
        "the committed result)",
    ),
    profile: bool = typer.Option(
        False,
        help="sample every stage with py-spy (collapsed stacks in the world's "
        "logs/<stage>.pyspy.txt; needs `pip install py-spy`)",
    ),
) -> None:
    """CPU time, wall time and peak memory of every stage at growing sizes (the smallest is the baseline), Ray 1
    vs 2 workers."""
    if out is None:
        from gpl_platform.config import load_settings

        out = load_settings().data_dir / "reports" / "scale" / "scale.json"
    report = _bench_module("bench_scale").run(
        candidates,
        out,
        days=days,
        per_request=candidates_per_request,
        items=items,
        ray_at=ray_at or None,
        work_dir=work_dir,
        batch_candidates=batch_candidates,
        sid_epochs=sid_epochs,
        resume=resume,
        skip=skip or (),
        profile=profile,
    )
    typer.echo(
        json.dumps(
            {"out": str(out), "ray": {k: report["ray"].get(k) for k in ("identical_labels", "speedup_2_vs_1")}},
            indent=2,
        )
    )


@bench_app.command("item-encoding")
def bench_item_encoding(items: int = typer.Option(2000), out: Path | None = typer.Option(None)) -> None:
    """Item encoding items/s: batched vs one text at a time."""
    _emit(_bench_module("bench_item_encoding").run(items, out), None)


@bench_app.command("online-latency")
def bench_online_latency(
    items: list[int] = typer.Option([100, 1000], help="candidate items per request (repeat for several sizes)"),
    requests: int | None = typer.Option(None, help="timed requests per path (default 300, 100 above 200 items)"),
    out: Path | None = typer.Option(None),
) -> None:
    """Online feature retrieval p50/p99 for 1 user + N items: Feast in process and `feast serve` over HTTP,
    SQLite and Redis, the direct-read floor, with the load average."""
    _emit(_bench_module("bench_online_latency").run(items, out, requests), None)


@bench_app.command("prerank-scoring")
def bench_prerank_scoring(
    items: int = typer.Option(1000, help="candidate items per request"),
    requests: int = typer.Option(200, help="timed requests per path"),
    clients: int = typer.Option(8, help="load test: concurrent HTTP clients (0: none)"),
    seconds: float = typer.Option(30.0, help="load test duration"),
    out: Path | None = typer.Option(None),
) -> None:
    """Scoring latency, user + N candidates: in process with the item side in memory, without it, over HTTP
    (gpl serve), and a bounded load test (throughput, p99, errors)."""
    _emit(_bench_module("bench_prerank_scoring").run(items, out, requests, clients=clients, seconds=seconds), None)


@bench_app.command("sid")
def bench_sid(
    out: Path | None = typer.Option(None),
    baseline_users: int = typer.Option(100, help="users decoded one at a time for the baseline"),
) -> None:
    """Semantic-ID anchors: RQ-VAE and generator training time, and anchors for every distinct history,
    batched beam search vs one user at a time (needs the warehouse of `make demo`)."""
    _emit(_bench_module("bench_sid").run(out, baseline_users), None)
