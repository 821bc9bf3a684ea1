"""The Ray side of slime-ray, one sub-package per stage of the data flow (ARCHITECTURE.md):

    data/       synthesise, pack into shards, read + preprocess on Ray Data
    train/      the run config, the explicit loop on Ray Train, checkpoints, DDP / DeepSpeed
    serve/      the Ray Serve app, the OpenAI wire format, the vLLM engine and model adapter
    lifecycle/  registry, scheduled retraining, Ray Jobs client and the in-process runner

Shared by the stages, at the top: ``storage`` (local or s3://), ``console`` and ``plots`` (what a person
sees), ``tracking`` (MLflow runs over MLflow's REST API), ``answers`` (how an answer is scored; standard library only); ``evaluate`` (held-out shards on the
serving engine), ``harness`` (lmms-eval, in its own environment, against a served model) and ``demo``
(every stage end to end), ``cluster`` (a local multi-node Ray cluster on one machine: tests, ``slime cluster``).
Imports flow ``jobs -> pipelines -> slime``; which stage may import which is in each ``__init__`` and
is checked by ``tests/test_import_rules.py``. Nothing is imported here.
"""
