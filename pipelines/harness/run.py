"""A harness run: preflight (before anything starts), our endpoint for the run, lmms-eval against it,
``lmms_eval.json`` and the per-sample logs beside ``metrics.json``."""

from __future__ import annotations

import json
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from pipelines import answers, storage
from pipelines.harness.config import HarnessConfig, HarnessError
from pipelines.harness.lmms import harness_python, harness_version, known_tasks, read_results, response, run_lmms_eval
from pipelines.harness.task import export_task, our_rows


def resolve_model(cfg: HarnessConfig) -> str | None:
    """The model directory to serve: ``model``, or the registry version's; None for an endpoint."""
    if not cfg.registry:
        return cfg.model
    from pipelines.lifecycle.registry import Registry

    registry = Registry(cfg.registry)
    version = registry.production() if cfg.version == "production" else registry.get(cfg.version)
    if version is None:
        raise HarnessError(f"registry {cfg.registry} has no production version yet: give version=ID")
    return version.model_uri


def default_output(cfg: HarnessConfig, model: str | None) -> str:
    return cfg.output or storage.join(model.rstrip("/"), "eval", "lmms_eval.json")


def preflight(cfg: HarnessConfig) -> tuple[str, str | None]:
    """Before anything starts: (harness python, model directory to serve or None). Fails on a missing
    environment, model, shards or task, and on a result that would be replaced unasked."""
    from pipelines.data.ingest import DataConfig, list_shards

    python = harness_python(cfg)
    model = resolve_model(cfg)
    if model and not storage.exists(storage.join(model, "slime_config.yaml"), cfg.storage):
        raise HarnessError(f"model {model} has no slime_config.yaml: give a model directory written by slime "
                           "train or slime convert")
    output = default_output(cfg, model)
    if storage.exists(output, cfg.storage) and not cfg.overwrite:
        raise FileExistsError(f"{output} already holds a result: pass output=<another lmms_eval.json> to keep "
                              "both, or overwrite=true to replace it")
    if cfg.data.val:
        list_shards(DataConfig(shards=cfg.data.val, model=model or "", only_versions=cfg.data.only_versions,
                               storage=cfg.storage))
    if cfg.tasks:
        unknown = sorted(set(cfg.tasks) - known_tasks(python) - {cfg.task_name})
        if unknown:
            raise HarnessError(f"lmms-eval {harness_version(python)} has no task {', '.join(unknown)} "
                               f"(`{python} -m lmms_eval tasks` lists them)")
    return python, model


@contextmanager
def serve_for_run(cfg: HarnessConfig, model: str):
    """Our OpenAI app (the one ``slime serve`` runs) for the run; yields its base URL and removes it after.
    Needs a running Ray (the job starts one). With no Serve running, Serve is started on 127.0.0.1 at a
    free port and stopped after; on a cluster whose Serve already runs (other apps, its own port), the app
    gets a name and route of its own and only it is deleted after: the cluster's apps are left alone."""
    import uuid

    from ray import serve

    from pipelines.console import quiet_driver_logs
    from pipelines.serve.app import ServeArgs, build_app
    from pipelines.serve.ingress import free_port, running_serve_port

    running = running_serve_port()
    name = f"lmms-eval-{uuid.uuid4().hex[:8]}"
    if running is None:
        port, route = free_port(), "/"
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        quiet_driver_logs()
    else:
        port, route = running, f"/{name}"
    args = ServeArgs(model=model, model_id=cfg.model_id, engine=cfg.engine, mode=cfg.mode, num_cpus=cfg.serve_num_cpus,
                     num_gpus=cfg.serve_num_gpus, max_ongoing_requests=max(16, cfg.num_concurrent + 1),
                     max_tokens=max(cfg.max_tokens, 16), api_key=cfg.api_key)
    try:
        serve.run(build_app(args), name=name, route_prefix=route, blocking=False)
        yield f"http://127.0.0.1:{port}{route.rstrip('/')}/v1"
    finally:
        if running is None:
            serve.shutdown()
        else:
            serve.delete(name)


def endpoint_model_id(endpoint: str, api_key: str | None) -> str:
    """The first model the endpoint lists; an unreachable endpoint is a HarnessError naming it."""
    import httpx

    try:
        r = httpx.get(endpoint.rstrip("/") + "/models", timeout=30,
                      headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
        r.raise_for_status()
        return r.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
        raise HarnessError(f"endpoint {endpoint} did not list its models (GET /models): {type(e).__name__}: {e}") \
            from e


def run_harness(cfg: HarnessConfig, python: str, model: str | None, *, say=print) -> dict:
    """Export, serve (unless endpoint), run lmms-eval, write lmms_eval.json; returns what it wrote."""
    from pipelines.evaluate import score_rows

    start = time.perf_counter()
    output = default_output(cfg, model)
    work = Path(cfg.work_dir or tempfile.mkdtemp(prefix="slime-lmms-eval-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "lmms_eval.log"
    task_dir, exported = None, None
    if cfg.data.val:
        task_dir = work / "tasks"
        exported = export_task(cfg, task_dir)
        say(f"task {cfg.task_name}: {exported['questions']} questions from {exported['shards']} shards of "
            f"{cfg.data.val} -> {task_dir}" + (f" (left out: {exported['skipped']})" if exported["skipped"] else ""))
    tasks = ([cfg.task_name] if cfg.data.val else []) + [t for t in cfg.tasks if t != cfg.task_name]

    def run(endpoint: str) -> tuple[dict, dict, str]:
        model_id = cfg.model_id or endpoint_model_id(endpoint, cfg.api_key)
        say(f"lmms-eval {harness_version(python)} (openai backend) -> {endpoint} model {model_id!r}, tasks "
            f"{','.join(tasks)}; its log: {log}")
        out = run_lmms_eval(python, cfg, endpoint=endpoint, model_id=model_id, tasks=tasks, task_dir=task_dir,
                            work=work, log=log)
        return (*read_results(out), model_id)

    if model:
        from pipelines.serve.engine import resolve_engine

        say(f"serving {model} for the run on {resolve_engine(cfg.engine, model)}")
        with serve_for_run(cfg, model) as endpoint:
            results, samples, model_id = run(endpoint)
    else:
        endpoint = cfg.endpoint.rstrip("/")
        results, samples, model_id = run(endpoint)

    failed = {t: sum(response(s).startswith(answers.REQUEST_FAILED) for s in ss) for t, ss in samples.items()}
    report = {"harness": f"lmms-eval {harness_version(python)}", "backend": "openai", "endpoint": endpoint,
              "model": model, "model_id": model_id, "tasks": results.get("results", {}),
              "num_samples": {t: len(ss) for t, ss in samples.items()},
              "failed_requests": sum(failed.values()), "failed_requests_per_task": failed,
              "max_failed_fraction": cfg.max_failed_fraction, "log": str(log), "work_dir": str(work)}
    out_dir = output.rsplit("/", 1)[0] if "/" in output else "."
    if exported:
        rows = our_rows(samples.get(cfg.task_name, []), exported["parquet"])
        report["slime_task"] = {**exported, **score_rows(rows), "per_task": {
            t: score_rows([r for r in rows if (r["task"] or r["qtype"]) == t]) for t in sorted({r["task"] or r["qtype"]
                                                                                                for r in rows})},
            "per_qtype": {q: score_rows([r for r in rows if r["qtype"] == q]) for q in sorted({r["qtype"] for r in rows})}}
        report["predictions"] = storage.join(out_dir, "lmms_eval_predictions.jsonl")
        storage.write_bytes_atomic(report["predictions"], "".join(json.dumps(r) + "\n" for r in rows).encode(),
                                   cfg.storage)
    report["samples"] = {}
    for task, ss in samples.items():  # lmms-eval's own per-sample log, kept as it wrote it
        uri = storage.join(out_dir, f"lmms_eval_samples_{task}.jsonl")
        storage.write_bytes_atomic(uri, "".join(json.dumps(s) + "\n" for s in ss).encode(), cfg.storage)
        report["samples"][task] = uri
    report["wall_s"] = time.perf_counter() - start
    if storage.exists(output, cfg.storage):
        say(f"replacing the earlier result at {output} (overwrite=true)")
    storage.write_bytes_atomic(output, json.dumps(report, indent=1, default=str).encode(), cfg.storage)
    report["output"] = output
    total = sum(report["num_samples"].values())
    if total and report["failed_requests"] > cfg.max_failed_fraction * total:
        first = next((response(s) for ss in samples.values() for s in ss
                      if response(s).startswith(answers.REQUEST_FAILED)), "")
        raise HarnessError(f"{report['failed_requests']} of {total} requests failed after {cfg.max_retries} tries "
                           f"(first: {first[:160]}); results written to {output} with those scored wrong; "
                           f"max_failed_fraction={cfg.max_failed_fraction} tolerates fewer")
    return report
