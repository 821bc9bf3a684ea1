"""A run as training code sees it: failure-tolerant logging, and the run of a (resumed) training run."""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from typing import Any

from pipelines import storage
from pipelines.tracking.client import MlflowClient, _now_ms

RUN_FILE = "mlflow_run.json"


class RunTracker:
    """One MLflow run as the training code sees it: every call may fail without raising. Failures are
    counted (``failures``), the first is printed once, the run goes on. Metrics are queued and sent by a
    background thread (``background=True``, rank 0) or on ``flush()``."""

    def __init__(self, uri: str | None, run_id: str | None, *, background: bool = False, timeout: float = 30.0,
                 max_queue: int = 100_000, label: str = "tracking") -> None:
        self.run_id, self.label, self.failures, self.dropped = run_id, label, 0, 0
        self.client = MlflowClient(uri, timeout) if uri and run_id else None
        self.lock = threading.Lock()
        self.pending: list[dict] = []
        self.max_queue = max_queue
        self.thread: threading.Thread | None = None
        self.wake: queue.Queue = queue.Queue()
        if self.client is not None and background:
            self.thread = threading.Thread(target=self._sender, name="mlflow-sender", daemon=True)
            self.thread.start()

    @property
    def enabled(self) -> bool:
        return self.client is not None

    def _failed(self, what: str, e: Exception) -> None:
        self.failures += 1
        if self.failures == 1:
            print(f"[{self.label}] MLflow logging failed ({what}: {e}); training goes on, further failures are "
                  "counted and reported at the end", file=sys.stderr, flush=True)

    def guard(self, what: str, fn, *args, **kwargs) -> Any:
        if self.client is None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - logging must never end the run
            self._failed(what, e)
            return None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        now = _now_ms()
        rows = [{"key": k, "value": v, "step": step, "timestamp": now} for k, v in metrics.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)]
        with self.lock:
            self.pending += rows
            over = len(self.pending) - self.max_queue
            if over > 0:  # a server gone for long: keep the newest, count what was dropped
                self.pending, self.dropped = self.pending[over:], self.dropped + over
        if self.thread is not None:
            self.wake.put(None)

    def flush(self) -> bool:
        """Send what is queued; on failure it stays queued (sent with the next flush). True when empty."""
        if self.client is None:
            return True
        with self.lock:
            batch, self.pending = self.pending, []
        if not batch:
            return True
        try:
            self.client.log_batch(self.run_id, metrics=batch)
            return True
        except Exception as e:  # noqa: BLE001
            self._failed("log metrics", e)
            with self.lock:
                self.pending = batch + self.pending
            return False

    def _sender(self) -> None:
        ok = True
        while True:
            try:  # after a failure, values stay queued: try again in a second even if no step comes (a hung
                item = self.wake.get(timeout=None if ok else 1.0)  # or finished phase must not strand them)
            except queue.Empty:
                item = None
            if item == "stop":
                return
            ok = self.flush()
            if not ok:
                time.sleep(1.0)  # a failing server: back off instead of retrying each step

    def set_tags(self, tags: dict[str, str]) -> None:
        self.guard("set tags", lambda: self.client.log_batch(self.run_id, tags=tags))

    def log_artifact(self, path: str, data: bytes) -> None:
        def upload() -> None:
            run = self.client.get_run(self.run_id)
            self.client.upload_artifact(run, path, data)

        self.guard(f"artifact {path}", upload)

    def close(self, status: str | None = None, timeout: float = 5.0) -> dict:
        """Stop the sender, send what is left (retrying until ``timeout``), set the run's status; returns the
        counts."""
        if self.thread is not None:
            self.wake.put("stop")
            self.thread.join(timeout)
            self.thread = None
        deadline = time.monotonic() + timeout
        while not self.flush() and time.monotonic() < deadline:
            time.sleep(0.5)  # retry back-off, not a wait for an event
        if status:
            self.guard("set status", self.client.update_run if self.client else None, self.run_id, status)
        left = len(self.pending)
        if self.client is not None and (self.failures or left or self.dropped):
            print(f"[{self.label}] MLflow logging: {self.failures} failed calls, {left} metric values not sent, "
                  f"{self.dropped} dropped (run {self.run_id})", file=sys.stderr, flush=True)
        return {"failures": self.failures, "unsent": left, "dropped": self.dropped}


# ----------------------------------------------------------------------------- a training run's MLflow run


def open_run(uri: str, experiment: str, run_name: str, run_dir: str, *, params: dict[str, str],
             tags: dict[str, str], store: str | None = None) -> dict:
    """The MLflow run of training run ``run_dir`` (``<storage_path>/<name>``): the one recorded in its
    ``mlflow_run.json`` when that still exists on this server (resume: status back to RUNNING, params not
    logged before are added), else a new one, recorded there. Returns ``{uri, experiment_id, run_id,
    resumed}``. ``store`` names the store when the URI does not (an embedded store's server gets a new port each
    time). Raises MlflowError when the server cannot be reached (the caller decides)."""
    store = store or uri
    client = MlflowClient(uri)
    record_uri = storage.join(run_dir, RUN_FILE)
    record = json.loads(storage.read_bytes(record_uri)) if storage.exists(record_uri) else {}
    run = client.get_run(record["run_id"]) if record.get("store") == store and record.get("run_id") else None
    if run is not None:
        client.update_run(run["info"]["run_id"], "RUNNING")
        have = {p["key"]: p["value"] for p in run.get("data", {}).get("params", [])}
        changed = sorted(k for k, v in params.items() if k in have and have[k] != v)
        resumes = int({t["key"]: t["value"] for t in run.get("data", {}).get("tags", [])}.get("slime.resumes", 0))
        client.log_batch(run["info"]["run_id"], params={k: v for k, v in params.items() if k not in have},
                         tags={"slime.resumes": str(resumes + 1),
                               **({"slime.changed_on_resume": ",".join(changed)} if changed else {})})
        return {"uri": uri, "store": store, "experiment_id": run["info"]["experiment_id"],
                "run_id": run["info"]["run_id"], "resumed": True}
    exp = client.experiment_id(experiment)
    run = client.create_run(exp, run_name, tags)
    run_id = run["info"]["run_id"]
    client.log_batch(run_id, params=params)
    record = {"store": store, "experiment_id": exp, "run_id": run_id, "experiment": experiment}
    storage.write_bytes_atomic(record_uri, json.dumps(record, indent=1).encode())
    return {**record, "uri": uri, "resumed": False}


def reach(record: dict, uri: str | None = None):
    """(URI, server or None) to reach the store a run record names: ``uri`` when given, the record's server,
    or (an embedded store) a server this process starts on it; the caller stops the server."""
    store = record.get("store", "")
    if uri or not store.startswith("embedded:"):
        return uri or record.get("uri") or store, None
    from pipelines.tracking.server import embedded_store, start_server

    server = start_server(*embedded_store(store[len("embedded:"):]))
    return server.uri, server


def log_evaluation(record: dict, *, metrics: dict[str, float], tags: dict[str, str], files: dict[str, bytes],
                   step: int, uri: str | None = None, label: str = "evaluate") -> dict:
    """Attach an evaluation to the training run ``record`` names (a model's ``mlflow_run.json``): metrics at
    ``step`` (the model's global step), tags and artifacts. Never raises; returns the run and the counts."""
    server = None
    try:
        uri, server = reach(record, uri)
        tracker = RunTracker(uri, record["run_id"], label=label)
        tracker.log_metrics(metrics, step=step)
        tracker.set_tags(tags)
        for path, data in files.items():
            tracker.log_artifact(path, data)
        counts = tracker.close()
    except Exception as e:  # noqa: BLE001 - an evaluation's result stands without its MLflow copy
        print(f"[{label}] MLflow logging failed: {e}", file=sys.stderr, flush=True)
        counts = {"failures": 1}
    finally:
        if server is not None:
            server.stop()
    return {"run_id": record.get("run_id"), "experiment_id": record.get("experiment_id"), **counts}
