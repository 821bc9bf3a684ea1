"""MLflow's REST API 2.0, the calls slime uses (pipelines/tracking/__init__.py says why REST)."""

from __future__ import annotations

import json
import math
import os
import time
import urllib.parse
from pathlib import Path
from typing import Any

from pipelines import storage

REPO = Path(__file__).resolve().parents[2]
MLFLOW_BIN = REPO / ".venv-mlflow" / "bin" / "mlflow"  # `make mlflow`; env SLIME_MLFLOW_BIN overrides
# MLflow's own limits (mlflow/utils/validation.py, 3.x): per log-batch request and per param.
MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100
MAX_KEY, MAX_PARAM_VALUE, MAX_TAG_VALUE = 250, 6000, 8000


class MlflowError(RuntimeError):
    """An MLflow REST call failed: ``code`` is MLflow's error code (RESOURCE_DOES_NOT_EXIST, ...) or
    ``UNREACHABLE`` when no server answered."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


def mlflow_bin() -> str:
    return os.environ.get("SLIME_MLFLOW_BIN") or str(MLFLOW_BIN)


class MlflowClient:
    """The MLflow REST API 2.0 calls slime uses (tracking; artifacts through the server's proxy)."""

    def __init__(self, uri: str, timeout: float = 30.0) -> None:
        if not uri.startswith(("http://", "https://")):
            raise ValueError(f"tracking uri {uri!r}: give http(s)://host:port of an MLflow server")
        self.uri, self.timeout = uri.rstrip("/"), timeout
        import requests

        self.http = requests.Session()

    def call(self, method: str, endpoint: str, body: dict | None = None, *, params: dict | None = None) -> dict:
        import requests

        try:
            r = self.http.request(method, f"{self.uri}/api/2.0/mlflow/{endpoint}", json=body, params=params,
                                  timeout=self.timeout)
        except requests.RequestException as e:
            raise MlflowError("UNREACHABLE", f"{self.uri}: {e}") from e
        if r.status_code >= 400:
            try:
                err = r.json()
                raise MlflowError(err.get("error_code", str(r.status_code)), err.get("message", r.text[:300]))
            except ValueError:
                raise MlflowError(str(r.status_code), r.text[:300]) from None
        return r.json() if r.content else {}

    # experiments and runs
    def experiment_id(self, name: str) -> str:
        """The experiment's id; created when missing."""
        try:
            return self.call("GET", "experiments/get-by-name", params={"experiment_name": name})[
                "experiment"]["experiment_id"]
        except MlflowError as e:
            if e.code != "RESOURCE_DOES_NOT_EXIST":
                raise
        try:
            return self.call("POST", "experiments/create", {"name": name})["experiment_id"]
        except MlflowError as e:  # created meanwhile by another process
            if e.code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self.experiment_id(name)

    def create_run(self, experiment_id: str, run_name: str, tags: dict[str, str]) -> dict:
        body = {"experiment_id": experiment_id, "run_name": run_name, "start_time": _now_ms(),
                "tags": [{"key": k, "value": _clip(str(v), MAX_TAG_VALUE)} for k, v in tags.items()]}
        return self.call("POST", "runs/create", body)["run"]

    def get_run(self, run_id: str) -> dict | None:
        try:
            return self.call("GET", "runs/get", params={"run_id": run_id})["run"]
        except MlflowError as e:
            if e.code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise

    def search_runs(self, experiment_id: str, filter_string: str = "") -> list[dict]:
        return self.call("POST", "runs/search", {"experiment_ids": [experiment_id], "filter": filter_string,
                                                 "max_results": 1000}).get("runs", [])

    def update_run(self, run_id: str, status: str) -> None:
        body: dict[str, Any] = {"run_id": run_id, "status": status}
        if status in ("FINISHED", "FAILED", "KILLED"):
            body["end_time"] = _now_ms()
        self.call("POST", "runs/update", body)

    def log_batch(self, run_id: str, *, metrics: list[dict] = (), params: dict[str, str] | None = None,
                  tags: dict[str, str] | None = None) -> None:
        """Metrics as ``{key, value, step[, timestamp]}``; split into requests within MLflow's limits."""
        metrics = [{"key": m["key"], "value": _number(m["value"]), "step": int(m.get("step", 0)),
                    "timestamp": int(m.get("timestamp") or _now_ms())} for m in metrics]
        params_l = [{"key": k, "value": v} for k, v in (params or {}).items()]
        tags_l = [{"key": k, "value": _clip(str(v), MAX_TAG_VALUE)} for k, v in (tags or {}).items()]
        while metrics or params_l or tags_l:
            body = {"run_id": run_id, "metrics": metrics[:MAX_METRICS], "params": params_l[:MAX_PARAMS],
                    "tags": tags_l[:MAX_TAGS]}
            metrics, params_l, tags_l = metrics[MAX_METRICS:], params_l[MAX_PARAMS:], tags_l[MAX_TAGS:]
            self.call("POST", "runs/log-batch", body)

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self.call("POST", "runs/set-tag", {"run_id": run_id, "key": key, "value": _clip(str(value), MAX_TAG_VALUE)})

    def metric_history(self, run_id: str, key: str) -> list[dict]:
        out, token = [], None
        while True:
            page = self.call("GET", "metrics/get-history", params={"run_id": run_id, "metric_key": key,
                                                                    "max_results": 25000,
                                                                    **({"page_token": token} if token else {})})
            out += page.get("metrics", [])
            if not (token := page.get("next_page_token")):
                return out

    # artifacts: through the server's proxy (mlflow-artifacts:/...), or straight to s3:// / a local path
    def _artifact_target(self, artifact_uri: str, path: str) -> tuple[str, str]:
        if artifact_uri.startswith("mlflow-artifacts:"):
            rest = urllib.parse.urlparse(artifact_uri).path.lstrip("/")
            return "proxy", f"{self.uri}/api/2.0/mlflow-artifacts/artifacts/{rest}/{path}"
        if artifact_uri.startswith("file://"):
            artifact_uri = urllib.parse.urlparse(artifact_uri).path
        return "storage", storage.join(artifact_uri, path)

    def upload_artifact(self, run: dict, path: str, data: bytes) -> None:
        kind, target = self._artifact_target(run["info"]["artifact_uri"], path)
        if kind == "storage":
            storage.write_bytes_atomic(target, data)
            return
        import requests

        try:
            r = self.http.put(target, data=data, timeout=max(self.timeout, 60))
        except requests.RequestException as e:
            raise MlflowError("UNREACHABLE", f"{self.uri}: {e}") from e
        if r.status_code >= 400:
            raise MlflowError(str(r.status_code), f"artifact upload {path}: {r.text[:300]}")

    def list_artifacts(self, run: dict, path: str = "") -> list[str]:
        """Relative paths of the run's artifacts (recursively)."""
        resp = self.call("GET", "artifacts/list", params={"run_id": run["info"]["run_id"], "path": path})
        out = []
        for f in resp.get("files", []):
            out += self.list_artifacts(run, f["path"]) if f.get("is_dir") else [f["path"]]
        return out

    def download_artifact(self, run: dict, path: str) -> bytes:
        kind, target = self._artifact_target(run["info"]["artifact_uri"], path)
        if kind == "storage":
            return storage.read_bytes(target)
        r = self.http.get(target, timeout=max(self.timeout, 60))
        if r.status_code >= 400:
            raise MlflowError(str(r.status_code), f"artifact {path}: {r.text[:300]}")
        return r.content


def _now_ms() -> int:
    return int(time.time() * 1000)


def _clip(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[:limit - 3] + "..."


def _number(value: Any) -> float | str:
    v = float(value)
    return v if math.isfinite(v) else ("NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity"))


def flatten_params(config: dict, prefix: str = "") -> dict[str, str]:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": "1"}``; lists of dicts (the phases) by index; keys and values
    clipped to MLflow's limits (a clipped value ends in ``...``)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten_params(value, name + "."))
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value):
                out.update(flatten_params(item, f"{name}.{i}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out[_clip(name, MAX_KEY)] = _clip(text, MAX_PARAM_VALUE)
    return out


