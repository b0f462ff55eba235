"""`engine: ray` on a real local Ray cluster limited to 2 CPUs, which this test starts itself (loopback
only, free ports, its own token): the same anchors, vectors, similarities and labels as the local engine,
through Ray Client (`ray://`) and through the GCS address."""

import json
import os
import shutil

import duckdb
import numpy as np
import pandas as pd
import pytest

from assets.definitions import LABELLING_ASSETS
from gpl_platform.config import RayConfig, StreamingConfig
from gpl_platform.engine import BatchJob
from gpl_platform.engine.factory import close_engines
from gpl_platform.engine.ray_engine import LocalRayCluster, RayEngine

pytestmark = pytest.mark.slow

ASSETS = [
    *LABELLING_ASSETS,
    "item_semantic_ids",
    "sid_generator",
    "sid_anchor_pseudo_labels",
]
# small batches and chunks, so that both engines cut the work into many pieces; batches are staged two
# at a time, so the Ray engine's in-flight batches span groups
STREAMING = {"batch_candidates": 400, "stage_candidates": 800, "anchor_batch_users": 16, "encode_batch_texts": 64}
SID_GENERATION_COLUMNS = ["logprob", "gen_prob", "c_generation", "confidence"]
TABLES = {
    "user_anchors": ["day", "anchor_id"],
    "anchor_embeddings": ["day", "anchor_id"],
    "candidate_similarities": ["day", "request_id", "item_id"],
    "pseudo_labels": ["day", "request_id", "item_id"],
}


@pytest.fixture(scope="module")
def ray_cluster():
    cluster = LocalRayCluster(num_cpus=2).start()
    saved = {key: os.environ.get(key) for key in cluster.env()}
    os.environ.update(cluster.env())  # what a driver needs to join it
    try:
        yield cluster
    finally:
        import ray

        close_engines()
        ray.shutdown()
        cluster.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _run(data_dir, **overrides):
    from assets.resources import GplSettings
    from assets.runner import run_pipeline

    settings = {
        "anchors": {"backend": "history"},
        "calibration": {"min_samples": 50},
        "streaming": STREAMING,
        "sid": {"generator": {"retrain_every_days": 2}},
        **overrides,
    }
    gpl = GplSettings(data_dir=str(data_dir), overrides_json=json.dumps(settings))
    assert run_pipeline(resources={"gpl": gpl}, ephemeral=True, selection=ASSETS).success
    return gpl.warehouse()


def _tables(warehouse) -> dict[str, pd.DataFrame]:
    out = {}
    with duckdb.connect(str(warehouse.path), read_only=True) as con:
        for base, keys in TABLES.items():
            for name in (base, f"{base}__sid"):
                out[name] = con.execute(f"SELECT * FROM {name}").df().sort_values(keys, ignore_index=True)
    return out


def test_ray_engine_writes_the_labels_of_the_local_engine(ray_cluster, tmp_path):
    """Joined through Ray Client (``ray://``), as a driver outside the cluster joins a real one: the library
    travels to the workers as a runtime-env module."""
    local = _tables(_run(tmp_path / "local"))
    on_ray = _tables(
        _run(
            tmp_path / "ray",
            engine="ray",
            ray={"address": ray_cluster.client_address, "workers": 2, "staging_dir": str(tmp_path / "staging")},
        )
    )
    import ray

    assert ray.util.client.ray.is_connected()  # the run went through Ray Client
    for name, expected in local.items():
        assert len(expected) > 0, name
        actual = on_ray[name]
        # The SID generator's log-probabilities come from torch, whose CPU kernels round differently with one
        # thread (a Ray actor has one CPU) than with two (this process): they, and the generation confidence made
        # from them, agree to float32 rounding. Anchors, ranks, vectors, similarities and labels are exact.
        approximate = [c for c in SID_GENERATION_COLUMNS if c in expected.columns] if name.endswith("__sid") else []
        for column in approximate:
            np.testing.assert_allclose(actual[column], expected[column], rtol=1e-5, atol=1e-6, err_msg=column)
        pd.testing.assert_frame_equal(
            expected.drop(columns=approximate), actual.drop(columns=approximate), check_exact=True, obj=name
        )
    # sid anchors came from a trained generator for most days (not only history fallbacks)
    sid = local["user_anchors__sid"]
    assert sid["anchor_text"].str.startswith("sid ").mean() > 0.3
    assert not any((tmp_path / "staging").iterdir())  # the staged batches are gone
    close_engines()  # the pipeline's actors hold the cluster's 2 CPUs


def _boom(inputs, context):
    raise ValueError(f"bad batch of {inputs['rows'].num_rows} rows")


def test_a_failing_ray_batch_raises_and_cleans_up(ray_cluster, tmp_path):
    """Joined by the cluster's GCS address (a driver on a cluster node)."""
    import ray

    close_engines()
    ray.shutdown()  # a Ray Client connection of another test
    engine = RayEngine(
        RayConfig(address=ray_cluster.address, workers=2, staging_dir=tmp_path / "staging"), StreamingConfig()
    )
    con = duckdb.connect()
    con.execute("CREATE TABLE t AS SELECT range AS x, range // 10 AS batch FROM range(40)")
    job = BatchJob("boom", _boom, None, lambda b: {"rows": f"SELECT x FROM t WHERE batch = {b} ORDER BY x"})
    with pytest.raises(Exception, match="bad batch of 10 rows"):
        list(engine.run(con, job, range(4)))
    assert not any((tmp_path / "staging").iterdir())
    assert len(engine.worker_peak_rss_mb()) == 2
    engine.close()


def test_a_cluster_gets_distinct_ports():
    cluster = LocalRayCluster(num_cpus=1)
    try:
        ports = [cluster.port, cluster.client_port, *cluster.component_ports.values()]
        assert len(set(ports)) == len(ports) == 9
    finally:
        cluster.stop()  # never started: only its temp dir to remove
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)


def test_a_port_collision_at_start_is_retried_with_fresh_ports(caplog):
    """Two of Ray's components given the same port (what ports chosen one at a time once produced in CI):
    `ray start` refuses, and the cluster starts on fresh ports."""
    cluster = LocalRayCluster(num_cpus=1)
    cluster.component_ports["--runtime-env-agent-port"] = cluster.component_ports["--node-manager-port"]
    try:
        with caplog.at_level("WARNING", logger="gpl_platform.engine.ray_engine"):
            cluster.start()
        assert "a chosen port was taken, retrying with fresh ports" in caplog.text
        assert "is used by other components" in caplog.text
        ports = [cluster.port, cluster.client_port, *cluster.component_ports.values()]
        assert len(set(ports)) == len(ports)
        assert "Ray runtime started" in (cluster.temp_dir / "ray_start.log").read_text()
    finally:
        cluster.stop()
    assert not cluster.temp_dir.exists()
