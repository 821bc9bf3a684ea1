"""lmms-eval, the field's multimodal evaluation harness, against a served slime-ray model.

    val shards --export_task--> an lmms-eval task folder (parquet + YAML + slime_task.py)
    model dir / registry version --serve_for_run--> our OpenAI endpoint on 127.0.0.1 (or: endpoint=URL)
    lmms-eval, in its own environment (``make harness``), as a subprocess: --model openai -> the endpoint
    its results + per-sample log --> lmms_eval.json + lmms_eval_samples.jsonl beside metrics.json

Why a subprocess in another environment: lmms-eval installed beside our stack pulls a CUDA torch and
PyPI's torchvision, which breaks CPU torch; ``make harness`` builds ``.venv-lmms`` from the pinned
``requirements-lmms.txt`` with CPU torch, and nothing of it enters the main venv.

The same questions, scored the same way: a task row is a record of our shards (its untouched image bytes,
its conversation up to the last user turn, the reference); ``pipelines/answers.py`` builds the request
and scores the answer on the harness side and is what ``slime evaluate`` scores with, so under greedy
decoding both give the same answer to every question (tests/test_harness.py runs both on one model).

What lmms-eval does not raise: a request that fails after its retries is scored as the text
``[LMMS_EVAL_REQUEST_FAILED ...]``. Those are counted here (``failed_requests``, always wrong), and a run
with more than ``max_failed_fraction`` of them ends in an error after its results are written.

    config   HarnessConfig (what a run evaluates, against what, where results go), HarnessError
    task     our val shards as an lmms-eval task folder; lmms-eval's samples back as our rows
    lmms     the harness environment and one lmms-eval run in it (a subprocess)
    run      preflight, the endpoint for the run, the whole run -> lmms_eval.json
"""
