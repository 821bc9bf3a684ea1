"""Lifecycle stage: what happens to a model after training -- versions, promotion, scheduled retraining.

    registry       versions/<id>/{model, metrics.json, lineage.json} + the atomic production pointer, a lock
    scheduler      on a cron: new shards? retrain on them (+ replay) -> evaluate -> promote only if not worse
                   -> roll Serve
    jobs_client    Ray Jobs from Python (slime submit/status/logs/stop) and JobsRunner, the scheduler's
                   steps as Ray Jobs plus the Serve rollout
    local_runner   LocalRunner: the same steps in this process, on the Ray it is connected to

May import: ``pipelines.train`` and ``pipelines.evaluate`` (LocalRunner runs them in-process),
``pipelines.storage``, ``slime``, ray. Never ``pipelines.serve`` or ``pipelines.data``: Serve is rolled
by ``import_path`` string through Serve's own API, and training reads the data. Nothing is imported here.
"""
