"""A local ``mlflow server`` (the embedded store, or a test's server), run from ``.venv-mlflow``."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass

from pipelines import storage
from pipelines.tracking.client import mlflow_bin


@dataclass
class Server:
    """An ``mlflow server`` this process started (embedded store, or a test's server); ``stop()`` ends it."""

    uri: str
    process: subprocess.Popen
    log_path: str

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to the server's process group (the CLI, uvicorn and its worker: started in their own session
        by ``start_server``), SIGKILL after ``timeout``."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout)
            except ProcessLookupError:
                pass


def start_server(backend_store_uri: str, artifacts_destination: str, *, port: int | None = None,
                 env: dict[str, str] | None = None, timeout: float = 120.0) -> Server:
    """``mlflow server`` on 127.0.0.1 (a free port unless given), serving artifacts from
    ``artifacts_destination`` (a local dir or s3://); returns once ``/health`` answers."""
    import requests

    binary = mlflow_bin()
    if not os.path.exists(binary):
        raise FileNotFoundError(f"{binary} is missing: `make mlflow` builds the MLflow server environment")
    if port is None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    if backend_store_uri.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(backend_store_uri[len("sqlite:///"):]) or ".", exist_ok=True)
    if not storage.is_s3(artifacts_destination):
        os.makedirs(artifacts_destination, exist_ok=True)
    log_dir = os.path.dirname(backend_store_uri[len("sqlite:///"):]) if backend_store_uri.startswith(
        "sqlite:///") else os.path.join(os.path.expanduser("~"), ".cache", "slime")
    os.makedirs(log_dir, exist_ok=True)
    log_path = os.path.join(log_dir, f"mlflow-server-{port}.log")
    full_env = {**os.environ, **(env or {})}
    if full_env.get("AWS_ENDPOINT_URL"):  # MLflow's S3 artifact store reads its own variable
        full_env.setdefault("MLFLOW_S3_ENDPOINT_URL", full_env["AWS_ENDPOINT_URL"])
    full_env.pop("PYTHONPATH", None)  # the server's venv, not ours
    # No job-runner process (MLflow's GenAI background jobs, unused here): one Python importing mlflow fewer.
    full_env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([binary, "server", "--backend-store-uri", backend_store_uri,
                                 "--artifacts-destination", artifacts_destination, "--host", "127.0.0.1",
                                 "--port", str(port), "--workers", "1"],
                                stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
    server = Server(uri=f"http://127.0.0.1:{port}", process=proc, log_path=log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}; its log: {log_path}")
        try:
            if requests.get(f"{server.uri}/health", timeout=2).status_code == 200:
                # /health answers before the tracking store exists: the first API call creates it (SQLite
                # schema migrations, ~10-40 s on a loaded 2-core box). Ready = that call answered.
                left = max(5.0, deadline - time.monotonic())
                r = requests.get(f"{server.uri}/api/2.0/mlflow/experiments/get-by-name",
                                 params={"experiment_name": "Default"}, timeout=left)
                if r.status_code < 500:
                    return server
        except requests.RequestException:
            pass
        time.sleep(0.2)
    server.stop()
    raise TimeoutError(f"mlflow server did not answer within {timeout:.0f} s; its log: {log_path}")


def embedded_store(directory: str) -> tuple[str, str]:
    """(backend store URI, artifact folder) of the embedded store in ``directory``."""
    directory = os.path.abspath(directory)
    return f"sqlite:///{directory}/mlflow.db", os.path.join(directory, "artifacts")


def embedded_ui_command(directory: str) -> str:
    """The one command that opens the MLflow UI on an embedded store (one worker and no GenAI job runner, as
    ``start_server``: on a laptop that halves the start)."""
    db, artifacts = embedded_store(directory)
    return (f"MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false {mlflow_bin()} server --backend-store-uri {db} "
            f"--artifacts-destination {artifacts} --host 127.0.0.1 --port 5000 --workers 1"
            f"   # then open http://127.0.0.1:5000")


