"""Shared fixtures: one embedded Ray per session, a moto S3 server on 127.0.0.1, tiny configs."""

from __future__ import annotations

import contextlib
import functools
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


@contextlib.contextmanager
def agent_port(port: int):
    """``ray.init`` has no argument for the dashboard agent's port (RayParams defaults it to 52365): this sets that
    default while one Ray starts."""
    from ray._private.parameter import RayParams

    init = RayParams.__init__
    RayParams.__init__ = functools.partialmethod(init, dashboard_agent_listen_port=port)
    try:
        yield
    finally:
        RayParams.__init__ = init


def start_embedded_ray():
    """One embedded Ray (init costs ~6 s). 4 logical CPUs on 2 cores so reads, actor pools, train workers
    and replicas (all fractional) fit together; 1 logical GPU so GPU-actor code paths schedule while
    computing on CPU. tests/test_multinode.py stops it for its own cluster and starts it again."""
    import ray

    from pipelines.cluster import init_embedded
    from pipelines.serve.ingress import free_port

    for attempt in (1, 2):
        if ray.is_initialized():
            break
        # Free ports, not Ray's defaults, so a test Ray keeps to itself beside any other Ray on the machine
        # (pipelines.cluster.init_embedded; the dashboard agent's 52365 too, which ray.init has no argument for)
        try:
            with agent_port(free_port()):
                init_embedded(num_cpus=4, num_gpus=1, object_store_memory=1_500_000_000, log_to_driver=True,
                              runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
                                                        "HF_HUB_OFFLINE": "1"}})
        except Exception as e:
            # Ray waits a fixed 30 s for its raylet to register; on 2 cores shared with other jobs that
            # once ran out and errored every Ray test of the session. One more try, then the error.
            if attempt == 2 or "timed out during startup" not in str(e):
                raise
            ray.shutdown()
    return ray


@contextlib.contextmanager
def session_ray_aside():
    """For a module with its own cluster (tests/test_multinode.py, tests/test_head_restart.py): the session's
    embedded Ray, if an earlier module started it, is stopped for the block and started again after it."""
    import ray

    was_up = ray.is_initialized()
    if was_up:
        ray.shutdown()
    try:
        yield
    finally:
        if was_up:
            start_embedded_ray()


def start_serve(port: int) -> None:
    """Serve on 127.0.0.1:``port``, on a fresh embedded Ray. Serve 2.60 has hung forever in ``serve.start()``
    after an earlier ``serve.shutdown()`` in the same Ray (the new controller idle, the driver in ``ray.get`` of
    its ``get_proxies``; seen in whole-suite runs, after one and after several Serve lifecycles): a serving
    module never starts Serve on a Ray that ran Serve before (~6 s for the new Ray)."""
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    start_embedded_ray()
    serve.start(http_options={"host": "127.0.0.1", "port": port})


# Modules that serve over HTTP. They run one after another (LONGEST_FIRST) on one Serve instance: shared_serve()
# starts it for the first of them, each deploys its own app and deletes it at its end, and Serve is shut down after
# the last (pytest_runtest_teardown below). One Ray restart and Serve start (~10 s) for the group instead of one per
# module, and no idle Serve (controller + proxy: ~3.4 CPU-s a minute here) under the modules after it.
SERVING_MODULES = ("test_schedule_e2e", "test_serve", "test_lora_serve", "test_harness")


def shared_serve() -> int:
    """The HTTP port of the running Serve (on 127.0.0.1), started with start_serve if none runs on this Ray."""
    import ray

    from pipelines.serve.ingress import free_port, running_serve_port

    if ray.is_initialized() and (running := running_serve_port()) is not None:
        return running
    port = free_port()
    start_serve(port)
    return port


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield  # the item's fixtures (a module's app) are torn down first
    last_serving = item.path.stem in SERVING_MODULES and (nextitem is None or nextitem.path.stem not in SERVING_MODULES)
    if last_serving:
        import ray

        if ray.is_initialized():
            from ray import serve

            serve.shutdown()  # a later module that serves starts again on a fresh Ray (start_serve)


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
    """One real MLflow server for the session (tests/test_tracking.py, tests/test_schedule_e2e.py): SQLite
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


# The long modules first: a run that breaks on a slow or busy machine breaks in its first minutes. Those that run
# their jobs in processes of their own (own Rays) come before the session's Ray starts (an idle Ray here: ~4 CPU-s a
# minute); the serving modules run one after another (SERVING_MODULES).
LONGEST_FIRST = ("test_multinode", "test_readme_steps", "test_demo", "test_submit", "test_job_errors",
                 *SERVING_MODULES, "test_train", "test_tracking", "test_lora", "test_learning", "test_data_pipeline",
                 "test_evaluate")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(LONGEST_FIRST)))  # stable: a module keeps its order
