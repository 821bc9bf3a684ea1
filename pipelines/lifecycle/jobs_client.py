"""Ray Jobs from Python: submit ``python -m jobs.<name> ...``, follow its logs, wait for the verdict.

Used by ``slime submit|status|logs|stop`` and by the scheduler's production runner (``JobsRunner``).
Token auth (Ray >= 2.59): Ray's own client attaches the token only when ``RAY_AUTH_MODE=token`` is set
in the client's environment, so when a token is available (``RAY_AUTH_TOKEN``, or the token file with
``RAY_AUTH_MODE=token``) we pass the Authorization header explicitly. ``RAY_AUTH_MODE`` is passed
through to the job's environment so a job that itself talks to the cluster uses the same mode.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, TextIO

from pipelines import storage

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# never uploaded with working_dir (the upload limit is 500 MiB; a venv alone is gigabytes)
WORKING_DIR_EXCLUDES = (".venv", "venv", ".git", "**/__pycache__", "*.egg-info", ".pytest_cache", "runs", "demo_out",
                        "build")


# ---------------------------------------------------------------- the job command lines (one place)
def train_args(config: str, parent: str | None, shards: list[str], export_dir: str, run_name: str,
               overrides: tuple[str, ...] = ()) -> list[str]:
    """Arguments of ``python -m jobs.train`` reading exactly ``shards`` (tar URIs: ``data.shards`` wins
    over any ``data.manifest`` in the config); without a parent the run starts from the config's init."""
    init = [f"init_from={parent}"] if parent else []
    return ["--config", config, *init, f"data.shards={json.dumps(list(shards))}", f"export_dir={export_dir}",
            f"name={run_name}", *overrides]


def shard_uris(manifest: str, names: list[str]) -> list[str]:
    """Manifest shard names -> URIs (the names are relative to the manifest's directory)."""
    root = manifest.rstrip("/")
    root = root.rsplit("/", 1)[0] if root.endswith(".json") else root
    return [storage.join(root, n) for n in names]


def eval_args(config: str, model: str, val: str, output: str, overrides: tuple[str, ...] = ()) -> list[str]:
    """Arguments of ``python -m jobs.evaluate``; it writes its metrics as JSON to ``output``. A retried
    tick evaluates the same model on the same val set again, so replacing that result is intended."""
    return ["--config", config, f"model={model}", f"data.val={val}", f"output={output}", "overwrite=true",
            *overrides]


def entrypoint(name: str, args: list[str]) -> str:
    return shlex.join(["python", "-m", f"jobs.{name}", *args])


# ---------------------------------------------------------------- client
def resolve_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    return address if "://" in address else f"http://{address}"


def auth_headers() -> dict[str, str]:
    token = os.environ.get("RAY_AUTH_TOKEN")
    if not token and os.environ.get("RAY_AUTH_MODE") == "token":
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        token = path.read_text().strip() if path.exists() else None
    return {"Authorization": f"Bearer {token}"} if token else {}


def connect(address: str | None = None, timeout_s: float = 30.0) -> JobSubmissionClient:
    """A client for the cluster's dashboard; retries while a just-started head is still coming up."""
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return JobSubmissionClient(resolve_address(address), headers=auth_headers() or None)
        except ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def runtime_env(working_dir: str | None = ".", pip: list[str] | tuple[str, ...] = (),
                env_vars: dict[str, str] | None = None) -> dict[str, Any]:
    env = {k: os.environ[k] for k in ("RAY_AUTH_MODE",) if k in os.environ}  # the token itself never travels
    env.update(env_vars or {})
    out: dict[str, Any] = {"env_vars": env}
    if working_dir:
        out["working_dir"] = working_dir
        out["excludes"] = list(WORKING_DIR_EXCLUDES)
    if pip:
        out["pip"] = list(pip)
    return out


def submit(client: JobSubmissionClient, name: str, args: list[str], *, runtime_env: dict[str, Any],
           submission_id: str | None = None, metadata: dict[str, str] | None = None,
           entrypoint_num_cpus: float | None = None, entrypoint_num_gpus: float | None = None,
           retry_s: float = 30.0) -> str:
    """Submit ``python -m jobs.<name> args``; returns the job id. A head that has just started answers
    "No available agent to submit job" for a few seconds: retried for up to ``retry_s``."""
    deadline = time.monotonic() + retry_s
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint(name, args), runtime_env=runtime_env,
                                     submission_id=submission_id, metadata=metadata,
                                     entrypoint_num_cpus=entrypoint_num_cpus, entrypoint_num_gpus=entrypoint_num_gpus)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2.0)


class HeadLost(RuntimeError):
    """The cluster's dashboard stopped answering for longer than allowed, or no longer knows the job: the head
    was lost (and maybe restarted). Without GCS fault tolerance a head restart loses every running job."""


def job_status(client: JobSubmissionClient, job_id: str, timeout_s: float = 30.0) -> str:
    """The job's status from the Jobs REST API (``GET /api/jobs/<id>``, what ``get_job_status`` asks) with a
    request timeout: Ray's client sets none, so a head host that vanished without a TCP reset (a lost node,
    a dropped route) would block the call for good. Raises ``HeadLost`` if the cluster does not know the job
    (404: a head restarted without GCS fault tolerance has no record of it), ``requests`` errors if the
    dashboard does not answer."""
    import requests

    r = requests.get(f"{client.get_address()}/api/jobs/{job_id}", headers=auth_headers() or None, timeout=timeout_s)
    if r.status_code == 404:
        raise HeadLost(f"job {job_id} is unknown to the cluster at {client.get_address()}: its head restarted "
                       "(without GCS fault tolerance) and lost the job")
    if r.status_code != 200:
        raise RuntimeError(f"GET /api/jobs/{job_id} at {client.get_address()}: HTTP {r.status_code}: {r.text[:500]}")
    return str(r.json()["status"])


def wait(client: JobSubmissionClient, job_id: str, timeout_s: float | None = None, poll_s: float = 1.0,
         on_poll: Callable[[], None] | None = None, unreachable_s: float = 60.0,
         request_timeout_s: float = 30.0) -> str:
    """Block until the job is terminal; returns "SUCCEEDED" | "FAILED" | "STOPPED". A dashboard that does not
    answer (refused, reset, or silent for ``request_timeout_s``) is asked again each poll; once it has not
    answered for ``unreachable_s`` the wait ends with ``HeadLost`` (a restarted dashboard that no longer knows
    the job ends it at once): a lost head must fail the step, not hold it for ``timeout_s``."""
    import requests

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    status, silent_since = None, None
    while True:
        asked = time.monotonic()
        try:
            status = job_status(client, job_id, request_timeout_s)
            silent_since = None
        except (requests.ConnectionError, requests.Timeout) as e:
            now = time.monotonic()
            silent_since = silent_since or asked  # silent since the first unanswered question was asked
            if now - silent_since >= unreachable_s:
                last = f"was {status} at its last answer" if status else "had no status yet"
                raise HeadLost(f"lost the Ray head: its dashboard at {client.get_address()} has not answered for "
                               f"{now - silent_since:.1f} s; job {job_id} {last} "
                               f"({type(e).__name__}: {str(e)[:200]})") from e
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {status} after {timeout_s} s")
        if on_poll:
            on_poll()
        time.sleep(poll_s if silent_since is None else min(poll_s, 2.0))


def stop_earlier_attempts(client: JobSubmissionClient, run_name: str, step: str, timeout_s: float = 300.0) -> list[str]:
    """Stop the jobs of this run and step that are still PENDING or RUNNING, and wait until they have ended;
    returns their ids. Such a job is an earlier tick's attempt whose tick gave up on a silent dashboard
    (``HeadLost``) while the head, and the job, lived on: resubmitting beside it would put two drivers on one
    run (same name, same checkpoints)."""
    live = [j.submission_id for j in client.list_jobs()
            if (j.metadata or {}).get("slime_run") == run_name and (j.metadata or {}).get("step") == step
            and j.submission_id and str(j.status.value) not in TERMINAL]
    for job_id in live:
        print(f"[slime] stopping {step} job {job_id} of run {run_name}: an earlier attempt still running",
              file=sys.stderr, flush=True)
        client.stop_job(job_id)
    for job_id in live:
        wait(client, job_id, timeout_s=timeout_s, poll_s=1.0)
    return live


def follow(client: JobSubmissionClient, job_id: str, out: TextIO | None = None, poll_s: float = 1.0) -> str:
    """Stream the job's logs to ``out`` until it ends; returns its terminal status. Uses the websocket
    tail and falls back to polling ``get_job_logs`` if the tail breaks (proxies that drop websockets)."""
    out = out or sys.stdout  # resolved per call: callers (and pytest) may have swapped sys.stdout
    printed = 0

    async def tail() -> None:
        nonlocal printed
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()
            printed += len(chunk)

    try:
        asyncio.run(tail())
    except Exception as e:  # noqa: BLE001 - any transport failure: fall back to polling
        print(f"[slime] log tail failed ({type(e).__name__}: {e}); polling instead", file=sys.stderr)
    while True:
        status = str(client.get_job_status(job_id).value)
        logs = client.get_job_logs(job_id)
        if len(logs) > printed:
            out.write(logs[printed:])
            out.flush()
            printed = len(logs)
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


# ---------------------------------------------------------------- the scheduler's production runner
@dataclass(frozen=True, kw_only=True)
class JobsConfig:
    """How the scheduler runs retrain/evaluate: Ray Jobs on the cluster at ``address``."""

    address: str = DEFAULT_ADDRESS
    working_dir: str | None = "."
    pip: tuple[str, ...] = ()
    env_vars: dict[str, str] = field(default_factory=dict)
    train_config: str = "jobs/configs/train_tiny.yaml"
    eval_config: str = "jobs/configs/eval_tiny.yaml"
    train_overrides: tuple[str, ...] = ()  # e.g. the fine-tune phase schedule
    eval_overrides: tuple[str, ...] = ()
    timeout_s: float = 24 * 3600.0
    # A dashboard silent for this long fails the step (HeadLost): the head is gone, and with it the job
    # (no GCS fault tolerance); the next tick resubmits the run, which resumes from its last checkpoint.
    unreachable_s: float = 60.0
    poll_s: float = 5.0


@dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    """How a promoted model reaches the Serve app. ``deploy`` = what ``serve deploy`` does: PUT the
    Serve config (the app's args[model_arg] set to the new model) to the dashboard; Serve rolls the
    replicas without downtime. ``run`` = ``serve.run`` from this process (connected with
    ``ray.init(address="auto")``). ``none`` = registry only (e.g. a RayService whose CR you patch)."""

    mode: Literal["deploy", "run", "none"] = "none"
    serve_config: str = "cluster/serve_config.yaml"
    app_name: str = "slime"
    model_arg: str = "model"
    address: str | None = None  # dashboard; defaults to jobs.address


def serve_config_for(path: str, app_name: str, model_arg: str, model_dir: str,
                     live: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Serve config to deploy: what is running (``live`` = ServeSubmissionClient.get_serve_details();
    deploy is declarative, so every running app must be in it) or else the file at ``path``, with the
    app's ``args[model_arg]`` set to ``model_dir``."""
    import yaml

    running = [a.get("deployed_app_config") for a in ((live or {}).get("applications") or {}).values()]
    if running and all(running) and any(a["name"] == app_name for a in running):
        config = {"applications": running, **{k: live[k] for k in ("proxy_location", "http_options") if live.get(k)}}
    else:
        config = yaml.safe_load(storage.read_bytes(path))
    apps = [a for a in config.get("applications", []) if a.get("name") == app_name]
    if not apps:
        raise ValueError(f"{path}: no application named {app_name!r}")
    apps[0].setdefault("args", {})[model_arg] = model_dir
    return config


class JobsRunner:
    """RetrainRunner that submits the train/evaluate jobs to a Ray cluster and rolls Serve forward.
    ``work_dir`` (shared storage the cluster can reach: s3:// in production) receives each run's
    exported model and metrics."""

    def __init__(self, jobs: JobsConfig, rollout: RolloutConfig, work_dir: str, val: str,
                 heartbeat: Callable[[], None] | None = None):
        self.jobs, self.rollout_cfg, self.work_dir, self.val = jobs, rollout, work_dir, val
        self.heartbeat = heartbeat
        self.job_ids: dict[str, str] = {}  # step -> job id of the current tick (the scheduler clears it)

    def _run(self, step: str, name: str, args: list[str], run_name: str) -> None:
        client = connect(self.jobs.address)
        env = runtime_env(self.jobs.working_dir, self.jobs.pip, self.jobs.env_vars)
        stop_earlier_attempts(client, run_name, step)
        job_id = submit(client, name, args, runtime_env=env, metadata={"slime_run": run_name, "step": step})
        self.job_ids[step] = job_id
        status = wait(client, job_id, timeout_s=self.jobs.timeout_s, poll_s=self.jobs.poll_s, on_poll=self.heartbeat,
                      unreachable_s=self.jobs.unreachable_s)
        if status != "SUCCEEDED":
            tail = client.get_job_logs(job_id)[-2000:]
            raise RuntimeError(f"{step} job {job_id} ended {status}; last log lines:\n{tail}")

    def retrain(self, parent_model_dir: str | None, manifest_uri: str, shards: list[str], run_name: str) -> str:
        export_dir = storage.join(self.work_dir, run_name, "model")
        self._run("train", "train", train_args(self.jobs.train_config, parent_model_dir,
                                               shard_uris(manifest_uri, shards), export_dir, run_name,
                                               self.jobs.train_overrides), run_name)
        return export_dir

    def evaluate(self, model_dir: str) -> dict[str, Any]:
        output = storage.join(model_dir.rstrip("/").rsplit("/", 1)[0], "metrics.json")
        self._run("evaluate", "evaluate", eval_args(self.jobs.eval_config, model_dir, self.val, output,
                                                    self.jobs.eval_overrides), model_dir)
        return json.loads(storage.read_bytes(output))

    def rollout(self, model_dir: str) -> None:
        cfg = self.rollout_cfg
        if cfg.mode == "none":
            return
        if cfg.mode == "deploy":  # same app name + new args -> Serve replaces replicas without downtime
            from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

            client = ServeSubmissionClient(resolve_address(cfg.address or self.jobs.address),
                                           headers=auth_headers() or None)
            client.deploy_applications(serve_config_for(cfg.serve_config, cfg.app_name, cfg.model_arg, model_dir,
                                                         live=client.get_serve_details()))
            return
        config = serve_config_for(cfg.serve_config, cfg.app_name, cfg.model_arg, model_dir)
        import importlib

        import ray
        from ray import serve

        app = next(a for a in config["applications"] if a["name"] == cfg.app_name)
        module, attr = app["import_path"].split(":")
        builder = getattr(importlib.import_module(module), attr)
        if not ray.is_initialized():
            ray.init(address="auto")
        serve.run(builder(app["args"]), name=cfg.app_name, route_prefix=app.get("route_prefix", "/"))
