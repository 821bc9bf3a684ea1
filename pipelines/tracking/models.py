"""MLflow Model Registry: model versions, aliases (``champion`` = production) and ``models:/`` URIs.

A version points at a slime model directory (local or s3://, as ``slime train`` exported it): the directory is
the version tag ``slime.model_uri``. Its MLflow ``source`` is ``runs:/<run>/export`` when the model came from
a tracked run (the run holds the export's metadata; MLflow refuses a bare local path as a source) and the
directory itself otherwise (s3:// sources are accepted). Weights are not copied into MLflow: serving reads the
directory, as it does from the file registry's ``versions/<id>/model``.

``resolve_model_uri("models:/NAME@champion")`` / ``("models:/NAME/3")`` -> that directory (``slime serve``).
"""

from __future__ import annotations

import json
import os
import re

from pipelines import storage
from pipelines.tracking.client import MAX_TAG_VALUE, MlflowClient, MlflowError

MODELS_RE = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")


def tracking_uri(uri: str | None = None) -> str:
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ValueError("a models:/ URI needs the MLflow server: set MLFLOW_TRACKING_URI=http://host:port "
                         "(or pass the tracking URI)")
    return uri


class ModelRegistry:
    """One registered model's versions and aliases over MLflow's REST API."""

    def __init__(self, uri: str | None, name: str) -> None:
        self.client, self.name = MlflowClient(tracking_uri(uri)), name

    def _call(self, method: str, endpoint: str, body: dict | None = None, **params) -> dict:
        return self.client.call(method, endpoint, body, params=params or None)

    def ensure(self) -> None:
        try:
            self._call("POST", "registered-models/create", {"name": self.name})
        except MlflowError as e:
            if e.code != "RESOURCE_ALREADY_EXISTS":
                raise

    def register(self, model_dir: str, tags: dict[str, str], run_id: str | None = None) -> str:
        """A new version of ``model_dir``; ``run_id`` defaults to the run in the model's ``mlflow_run.json``.
        Returns the version number (a string, as MLflow gives it)."""
        if run_id is None:
            record = storage.join(model_dir.rstrip("/"), "mlflow_run.json")
            run_id = json.loads(storage.read_bytes(record))["run_id"] if storage.exists(record) else None
        self.ensure()
        body = {"name": self.name, "source": f"runs:/{run_id}/export" if run_id else model_dir,
                "tags": [{"key": k, "value": str(v)[:MAX_TAG_VALUE]}
                         for k, v in {"slime.model_uri": model_dir, **tags}.items()]}
        if run_id:
            body["run_id"] = run_id
        return self._call("POST", "model-versions/create", body)["model_version"]["version"]

    def get(self, version: str) -> dict:
        mv = self._call("GET", "model-versions/get", name=self.name, version=str(version))["model_version"]
        return {**mv, "tags": {t["key"]: t["value"] for t in mv.get("tags", [])}}

    def set_tags(self, version: str, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self._call("POST", "model-versions/set-tag", {"name": self.name, "version": str(version), "key": k,
                                                          "value": str(v)[:MAX_TAG_VALUE]})

    def alias(self, alias: str) -> dict | None:
        """The version ``alias`` points at, or None when it points nowhere."""
        try:
            mv = self._call("GET", "registered-models/alias", name=self.name, alias=alias)["model_version"]
        except MlflowError as e:
            if e.code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise
        return {**mv, "tags": {t["key"]: t["value"] for t in mv.get("tags", [])}}

    def set_alias(self, alias: str, version: str) -> None:
        self._call("POST", "registered-models/alias", {"name": self.name, "alias": alias, "version": str(version)})

    def tags(self) -> dict[str, str]:
        """The registered model's own tags."""
        rm = self._call("GET", "registered-models/get", name=self.name)["registered_model"]
        return {t["key"]: t["value"] for t in rm.get("tags", [])}

    def set_model_tag(self, key: str, value: str) -> None:
        self._call("POST", "registered-models/set-tag", {"name": self.name, "key": key, "value": str(value)})

    def versions(self) -> list[dict]:
        out = self._call("GET", "model-versions/search", filter=f"name='{self.name}'").get("model_versions", [])
        return sorted(({**mv, "tags": {t["key"]: t["value"] for t in mv.get("tags", [])}} for mv in out),
                      key=lambda mv: int(mv["version"]))

    def promote(self, version: str, reason: str, alias: str = "champion") -> dict:
        """Move ``alias`` to ``version``; the version records the one it replaced (what ``rollback`` returns to)."""
        self.get(version)  # unknown versions are refused before the alias moves
        current = self.alias(alias)
        previous = current["version"] if current else None
        if previous and previous != str(version):
            self.set_tags(version, {f"slime.previous_{alias}": previous})
        self.set_tags(version, {"slime.verdict": "promoted", "slime.reason": reason})
        self.set_alias(alias, version)
        return {"version": str(version), "previous": previous}

    def reject(self, version: str, reason: str) -> None:
        self.set_tags(version, {"slime.verdict": "rejected", "slime.reason": reason})

    def rollback(self, reason: str, alias: str = "champion") -> dict:
        """Move ``alias`` back to the version it pointed at before the current one was promoted."""
        current = self.alias(alias)
        previous = current and current["tags"].get(f"slime.previous_{alias}")
        if not previous:
            raise ValueError(f"{self.name}@{alias}: no earlier version to roll back to")
        self.set_tags(current["version"], {"slime.verdict": "rolled_back", "slime.reason": reason})
        self.set_alias(alias, previous)
        return {"version": previous, "previous": current["version"]}


def model_dir(mv: dict) -> str:
    """The slime model directory of a model version (``slime.model_uri``, else a directory ``source``)."""
    uri = mv["tags"].get("slime.model_uri") or mv.get("source", "")
    if uri.startswith(("runs:/", "models:/", "mlflow-artifacts:")):
        raise ValueError(f"model version {mv.get('name')}/{mv.get('version')} has no slime.model_uri tag and its "
                         f"source {uri} is not a model directory")
    return uri


def resolve_model_uri(uri: str, tracking: str | None = None) -> tuple[str, dict | None]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> (model directory, the model version); any other
    URI is returned as it is, with None."""
    m = MODELS_RE.match(uri)
    if not uri.startswith("models:/"):
        return uri, None
    if m is None:
        raise ValueError(f"{uri}: give models:/NAME@ALIAS or models:/NAME/VERSION")
    registry = ModelRegistry(tracking, m["name"])
    if m["alias"]:
        mv = registry.alias(m["alias"])
        if mv is None:
            raise ValueError(f"{uri}: alias {m['alias']!r} of {m['name']!r} points at no version")
    else:
        mv = registry.get(m["version"])
    return model_dir(mv), mv


class AliasWatch:
    """Follows ``models:/NAME@ALIAS``: ``changed()`` returns (model directory, model version) when the alias
    moved since the last call (moved by a promotion, a rollback, or by hand in the UI / a client), else None.

    Polling, not MLflow webhooks: it works against any MLflow server (webhooks need 3.3+, a receiver the server
    can reach and a secret), and the process that polls is the one that owns the Serve app it rolls. A poll
    that fails (server down) is counted and changes nothing: the endpoint keeps serving what it serves."""

    def __init__(self, uri: str, tracking: str | None = None, current: str | None = None) -> None:
        m = MODELS_RE.match(uri)
        if m is None or not m["alias"]:
            raise ValueError(f"{uri}: follow needs models:/NAME@ALIAS")
        self.uri, self.alias = uri, m["alias"]
        self.registry = ModelRegistry(tracking, m["name"])
        self.version, self.failures = current, 0

    def changed(self) -> tuple[str, dict] | None:
        try:
            mv = self.registry.alias(self.alias)
        except MlflowError:
            self.failures += 1
            return None
        if mv is None or mv["version"] == self.version:
            return None
        self.version = mv["version"]
        return model_dir(mv), mv
