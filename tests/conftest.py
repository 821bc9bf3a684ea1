"""Shared fixtures: one embedded Ray per session, a moto S3 server on 127.0.0.1, tiny configs."""

from __future__ import annotations

import os

# Must be set before ray is imported anywhere: deterministic auth, fast Serve autoscaling metrics.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")
os.environ.setdefault("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Runs log to MLflow only in the tests about it (they set tracking.uri / tracking.enabled): an embedded
# mlflow server per training run would cost every other training test ~10 s of start-up.
os.environ.setdefault("SLIME_TRACKING", "off")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

import pytest  # noqa: E402


def start_embedded_ray():
    """One embedded Ray (init costs ~6 s). 4 logical CPUs on 2 cores so reads, actor pools, train workers
    and replicas (all fractional) fit together; 1 logical GPU so GPU-actor code paths schedule while
    computing on CPU. tests/test_multinode.py stops it for its own cluster and starts it again."""
    import ray

    for attempt in (1, 2):
        if ray.is_initialized():
            break
        try:
            ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=True, dashboard_host="127.0.0.1",
                     object_store_memory=1_500_000_000, log_to_driver=True,
                     runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
                                               "HF_HUB_OFFLINE": "1"}})
        except Exception as e:
            # Ray waits a fixed 30 s for its raylet to register; on 2 cores shared with other jobs that
            # once ran out and errored every Ray test of the session. One more try, then the error.
            if attempt == 2 or "timed out during startup" not in str(e):
                raise
            ray.shutdown()
    return ray


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray for every integration test (start_embedded_ray)."""
    ray = start_embedded_ray()
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def moto_s3():
    """A real S3 API on 127.0.0.1 (moto server mode: reachable from Ray worker processes)."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    old = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    yield endpoint
    if old is None:
        os.environ.pop("AWS_ENDPOINT_URL", None)
    else:
        os.environ["AWS_ENDPOINT_URL"] = old
    server.stop()


@pytest.fixture()
def s3_bucket(moto_s3):
    """A fresh bucket (created with boto3: s3fs.mkdir fails on moto with a location-constraint error)."""
    import uuid

    import boto3

    name = f"test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def artifact_bucket(moto_s3):
    import boto3

    boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1").create_bucket(Bucket="mlflow-artifacts")
    return "mlflow-artifacts"


class LiveServer:
    """A test's ``mlflow server``; ``restart()`` stops it and starts it again on the same port and store (an
    outage in the middle of a run)."""

    def __init__(self, backend: str, artifacts: str, env: dict[str, str]) -> None:
        from pipelines.tracking.server import start_server

        self.args, self.env = (backend, artifacts), env
        self.server = start_server(*self.args, env=env)
        self.uri, self.port = self.server.uri, int(self.server.uri.rsplit(":", 1)[1])

    @property
    def process(self):
        return self.server.process

    def restart(self) -> None:
        from pipelines.tracking.server import start_server

        self.server.stop()
        self.server = start_server(*self.args, port=self.port, env=self.env)

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, moto_s3, artifact_bucket):
    """One real MLflow server for the session (tests/test_tracking.py, tests/test_tracking_serve.py): SQLite
    store, artifacts proxied to s3://mlflow-artifacts; started on first use (~10-40 s: the store's migrations)."""
    root = tmp_path_factory.mktemp("mlflow")
    server = LiveServer(f"sqlite:///{root}/mlflow.db", f"s3://{artifact_bucket}/runs",
                        env={"AWS_ENDPOINT_URL": moto_s3, "MLFLOW_S3_ENDPOINT_URL": moto_s3})
    import sqlite3

    # An empty store with MLflow's schema (the migrations a fresh SQLite store runs cost 10-40 s here): the
    # embedded-store test seeds its store from it.
    with sqlite3.connect(root / "mlflow.db") as src, sqlite3.connect(root / "empty-store.db") as dst:
        src.backup(dst)
    server.empty_store = root / "empty-store.db"
    yield server
    server.stop()
    assert server.process.poll() is not None
