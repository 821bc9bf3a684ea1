"""Our val shards as an lmms-eval task folder (parquet + YAML + ``slime_task.py``, a copy of
``pipelines/answers.py``), and lmms-eval's samples of it back as rows scored the way ``slime evaluate``
scores (``pipelines.evaluate.score_rows`` takes them)."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

from pipelines import answers, storage
from pipelines.harness.config import HarnessConfig, HarnessError
from pipelines.harness.lmms import response


def export_task(cfg: HarnessConfig, task_dir: Path) -> dict:
    """Our val shards -> ``task_dir/<task_name>.parquet`` + ``.yaml`` + ``slime_task.py``. Records the
    harness cannot ask (no final gpt turn) are left out and counted (``skipped``), as are what the shard
    reader skips (``read_skipped``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.data.ingest import DataConfig, list_shards
    from pipelines.data.preprocess import iter_tar_samples
    from pipelines.evaluate import split_record

    shards = list_shards(DataConfig(shards=cfg.data.val, model=cfg.model or "", only_versions=cfg.data.only_versions,
                                    storage=cfg.storage))
    rows, skipped, read_counts = [], Counter(), Counter()
    for uri in shards:
        fs, path = storage.filesystem(uri, cfg.storage)
        with fs.open(path, "rb") as f:
            for sample in iter_tar_samples(f, uri, read_counts):
                try:
                    record = json.loads(sample["json"])
                    messages, reference = split_record(record)
                except (ValueError, KeyError, TypeError):
                    skipped["invalid_record"] += 1
                    continue
                if cfg.prompt_suffix:
                    messages[-1] = {**messages[-1], "content": messages[-1]["content"] + cfg.prompt_suffix}
                rows.append({"id": str(record.get("id", sample["key"])), "task": str(record.get("task", "")),
                             "qtype": str(record.get("qtype", "all")), "image": sample["image"],
                             "messages": json.dumps(messages), "answer": reference})
                if cfg.limit and len(rows) >= cfg.limit:
                    break
        if cfg.limit and len(rows) >= cfg.limit:
            break
    if not rows:
        raise HarnessError(f"no question to ask in {cfg.data.val}: {dict(skipped + read_counts) or 'no records'}")
    task_dir.mkdir(parents=True, exist_ok=True)
    data = task_dir / f"{cfg.task_name}.parquet"
    pq.write_table(pa.table({k: pa.array([r[k] for r in rows], pa.binary() if k == "image" else pa.string())
                             for k in rows[0]}), data)
    shutil.copyfile(answers.__file__, task_dir / "slime_task.py")
    (task_dir / f"{cfg.task_name}.yaml").write_text(_task_yaml(cfg, data))
    return {"task": cfg.task_name, "questions": len(rows), "shards": len(shards), "skipped": dict(skipped),
            "read_skipped": dict(read_counts), "parquet": str(data)}


def _task_yaml(cfg: HarnessConfig, data: Path) -> str:
    # Greedy, at most max_tokens, as slime evaluate decodes; the metrics are process_results' keys.
    return f"""# Written by slime lmms-eval from {cfg.data.val}: {cfg.task_name}
task: {cfg.task_name}
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data))}
test_split: test
output_type: generate_until
doc_to_visual: !function slime_task.doc_to_visual
doc_to_text: !function slime_task.doc_to_text
doc_to_messages: !function slime_task.doc_to_messages
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {cfg.max_tokens}
  temperature: 0
  do_sample: false
process_results: !function slime_task.process_results
metric_list:
  - metric: slime_accuracy
    aggregation: mean
    higher_is_better: true
  - metric: slime_exact_match
    aggregation: mean
    higher_is_better: true
  - metric: slime_request_failed
    aggregation: mean
    higher_is_better: false
metadata:
  - version: 1.0
"""


def our_rows(samples: list[dict], parquet: str) -> list[dict]:
    """The exported task's samples as rows of ``pipelines.evaluate`` (id, task, qtype, reference, prediction,
    exact, correct, error): scored here again with ``answers.score``, the rule both sides share."""
    import pyarrow.parquet as pq

    table = pq.read_table(parquet, columns=["id", "task", "qtype", "answer"]).to_pylist()
    rows = []
    for s in sorted(samples, key=lambda s: int(s["doc_id"])):
        doc = table[int(s["doc_id"])]
        prediction = response(s)
        failed = prediction.startswith(answers.REQUEST_FAILED)
        scored = answers.score(prediction, doc["answer"])
        rows.append({"id": doc["id"], "task": doc["task"], "qtype": doc["qtype"], "reference": doc["answer"],
                     "prediction": "" if failed else prediction.strip(),
                     "error": prediction if failed else "", "error_code": "request_failed" if failed else "",
                     "exact": scored["exact"] and not failed, "correct": scored["correct"] and not failed})
    return rows
