"""Evaluation: answer normalisation and aggregation (no Ray), then a real Ray Data run on a fixture whose
answers are known: the reference Predictor (in this process, no Ray) records what the model generates
greedily; the evaluation job then runs on the vLLM engine (one in-process ``vllm.LLM`` per Ray Data actor)
over shards whose reference equals that output for every other record and is wrong for the rest ->
accuracy 0.5 exactly, which also holds only if vLLM and the Predictor generate the same answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipelines.evaluate import normalize_answer, split_record, summarize


def test_normalize_answer():
    assert normalize_answer("  The Red circle. ") == "red circle"
    assert normalize_answer("An A-7!") == "a7"
    assert normalize_answer("a") == ""


def test_split_record_and_summarize():
    rec = {"id": "x", "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"},
                                        {"from": "human", "value": "Q2?"}, {"from": "gpt", "value": "B"}]}
    messages, ref = split_record(rec)
    assert ref == "B" and [m["role"] for m in messages] == ["user", "assistant", "user"]
    with pytest.raises(ValueError, match="gpt turn"):
        split_record({"id": "y", "conversations": [{"from": "human", "value": "Q"}]})
    base = {"visual_tokens": 10, "latency_s": 0.1, "error": ""}
    rows = [{**base, "qtype": "detail", "exact": True, "correct": True},
            {**base, "qtype": "detail", "exact": False, "correct": True},
            {**base, "qtype": "global", "exact": False, "correct": False},
            {**base, "qtype": "global", "exact": False, "correct": False, "error": "InputError: bad",
             "error_code": "image_too_large"}]
    m = summarize(rows)
    assert m["num_samples"] == 4 and m["errors"] == 1 and m["error_codes"] == {"image_too_large": 1}
    assert m["accuracy"] == pytest.approx(2 / 4) and m["exact_match"] == pytest.approx(1 / 4)
    assert m["per_qtype"]["detail"] == {"num_samples": 2, "exact_match": 0.5, "accuracy": 1.0, "errors": 0}


def test_failures_count_as_wrong_and_chance_is_uniform_over_the_answers():
    """A model that fails on half the set scores on all of it (not 1.0 on the half it answered); chance is
    1 / |answer set|, not the majority answer's rate among the scored references (here 3/6)."""
    base = {"visual_tokens": 10, "latency_s": 0.1, "error": "", "error_code": "", "qtype": "detail",
            "task": "texture", "exact": True, "correct": True}
    refs = ["red-cyan", "red-cyan", "red-cyan", "blue-yellow", "green-magenta", "black-white"]
    rows = [{**base, "reference": r} for r in refs[:3]]
    rows += [{**base, "reference": r, "exact": False, "correct": False, "error": "InputError: too long",
              "error_code": "context_length_exceeded", "latency_s": 0.0} for r in refs[3:]]
    m = summarize(rows)
    assert m["accuracy"] == 0.5 and m["num_samples"] == 6
    assert m["errors"] == 3 and m["error_codes"] == {"context_length_exceeded": 3}
    assert m["per_task"]["texture"]["chance"] == 0.25 and m["per_task"]["texture"]["accuracy"] == 0.5
    assert m["latency_s_per_request"]["p50"] == pytest.approx(0.1)  # failed samples have no latency
    assert "per request" in m["latency_s_per_request"]["measures"]
    # a row flagged both failed and correct is still wrong
    assert summarize([{**rows[0], "error": "ValueError: x", "error_code": "invalid_record"}])["accuracy"] == 0.0


def test_eval_predictor_reports_failures_and_per_request_latency(tmp_path):
    """The HF engine in this process: a record without a final gpt turn fails alone with its code; the
    others' latencies are their own (a 1-token answer is done before a 12-token one), not batch / size."""
    import io

    from PIL import Image

    from pipelines.evaluate import EvalPredictor
    from slime.presets import save_tiny_checkpoint

    model = save_tiny_checkpoint(tmp_path / "tiny")
    buf = io.BytesIO()
    Image.new("RGB", (448, 336), (200, 30, 30)).save(buf, format="PNG")
    conv = lambda *turns: [{"from": f, "value": v} for f, v in turns]
    records = [{"id": "a", "task": "t", "conversations": conv(("human", "<image>\nWhat colour?"), ("gpt", "red"))},
               {"id": "bad", "task": "t", "conversations": conv(("human", "<image>\nWhat colour?"))},
               {"id": "c", "task": "t", "conversations": conv(("human", "<image>\nAnd now?"), ("gpt", "blue"))}]
    short = EvalPredictor(model=str(model), max_tokens=12, gamma=None, prompt_suffix="", device="cpu", dtype=None,
                          engine="hf")
    out = short({"image": np.array([buf.getvalue()] * 3, dtype=object),
                 "json": np.array([json.dumps(r) for r in records], dtype=object)})
    assert list(out["error_code"]) == ["", "invalid_record", ""] and out["latency_s"][1] == 0.0
    assert not out["correct"][1]
    # Same batch with one request capped at 1 token: its latency is shorter than the 12-token one's.
    from slime.predictor import ChatRequest

    img = Image.open(io.BytesIO(buf.getvalue()))
    reqs = [ChatRequest(messages=[{"role": "user", "content": "What colour?"}], images=[img], max_tokens=n)
            for n in (1, 12)]
    one, twelve = short.predictor.generate(reqs)
    assert one.completion_tokens == 1 and twelve.completion_tokens > 4, (one, twelve)
    assert 0 < one.latency_s < twelve.latency_s


@pytest.mark.integration
def test_evaluate_known_answers(ray_session, tmp_path):
    from jobs.evaluate import main
    from pipelines.data.pack import PackConfig, pack
    from pipelines.data.synth import SynthConfig, generate
    from pipelines.evaluate import EvalPredictor
    from slime.presets import save_tiny_checkpoint, tiny_vllm

    model = save_tiny_checkpoint(tmp_path / "models" / "tiny", cfg=tiny_vllm())  # engine auto -> vLLM
    raw = tmp_path / "raw"
    generate(SynthConfig(output_dir=str(raw), num_images=4, min_side=448, max_side=640, val_fraction=0.0,
                         progress=False))
    pack(PackConfig(inputs=(str(raw / "train.json"),), output_dir=str(tmp_path / "wds" / "v1"), progress=False))
    # What the model answers greedily, from the reference Predictor fed exactly what an actor gets: the
    # packed record's JSON and its untouched image bytes.
    records = json.loads((raw / "train.json").read_text())
    reference = EvalPredictor(model=str(model), max_tokens=6, gamma=None, prompt_suffix="", device="cpu", dtype=None,
                              engine="hf")
    rows = reference({"image": np.array([(raw / r["image"]).read_bytes() for r in records], dtype=object),
                      "json": np.array([json.dumps(r) for r in records], dtype=object)})
    predicted = dict(zip(rows["id"], rows["prediction"]))

    assert set(predicted) == {r["id"] for r in records} and all(predicted.values()) and not any(rows["error"])
    for i, r in enumerate(records):  # same prompts, same images, same order: only the references change
        r["conversations"][-1]["value"] = predicted[r["id"]] if i % 2 == 0 else "zq wrong answer"
    (raw / "known.json").write_text(json.dumps(records))
    pack(PackConfig(inputs=(str(raw / "known.json"),), output_dir=str(tmp_path / "wds" / "known"), progress=False))

    # Default output: inside the model directory it measures, with its accuracy chart beside it.
    assert main(["--config", "jobs/configs/eval_tiny.yaml", f"model={model}", f"data.val={tmp_path}/wds/known",
                 "batch_size=4", "max_tokens=6"]) == 0
    metrics = json.loads(Path(model / "eval" / "metrics.json").read_text())
    assert metrics["engine"] == "vllm"  # evaluation measures the engine the endpoint serves
    assert (model / "eval" / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(metrics["per_task"]) and all(0 < t["chance"] <= 1 for t in metrics["per_task"].values())
    assert metrics["num_samples"] == len(records) and metrics["errors"] == 0
    assert metrics["accuracy"] == 0.5 and metrics["exact_match"] == 0.5
    expected = {}
    for i, r in enumerate(records):
        n, ok = expected.get(r["qtype"], (0, 0))
        expected[r["qtype"]] = (n + 1, ok + (i % 2 == 0))
    assert {q: (v["num_samples"], round(v["accuracy"] * v["num_samples"])) for q, v in
            metrics["per_qtype"].items()} == expected
    assert metrics["visual_tokens_per_sample"] > 16  # global view + separator + local tokens
    latency = metrics["latency_s_per_request"]
    assert 0 < latency["p50"] <= latency["p95"] <= metrics["wall_s"] and "per request" in latency["measures"]
    rows = [json.loads(line) for line in (model / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert all(r["latency_s"] > 0 for r in rows)  # vLLM: each request's own finish on the engine


@pytest.mark.integration
def test_two_models_keep_two_results(ray_session, tmp_path):
    """Evaluating model a then model b (same parent directory) leaves both results; a third run on a
    refuses to replace a's result unless asked, and says so when asked."""
    import shutil

    from pipelines.data.pack import PackConfig, pack
    from pipelines.data.synth import SynthConfig, generate
    from pipelines.evaluate import EvalConfig, EvalDataSection, evaluate
    from slime.presets import save_tiny_checkpoint

    a = save_tiny_checkpoint(tmp_path / "models" / "a")
    b = tmp_path / "models" / "b"
    shutil.copytree(a, b)
    raw = tmp_path / "raw"
    generate(SynthConfig(output_dir=str(raw), num_images=2, min_side=448, max_side=512, val_fraction=0.0,
                         progress=False))
    pack(PackConfig(inputs=(str(raw / "train.json"),), output_dir=str(tmp_path / "wds"), progress=False))
    cfg = lambda m, **kw: EvalConfig(model=str(m), data=EvalDataSection(val=str(tmp_path / "wds"), limit=2),
                                     max_tokens=2, engine="hf", **kw)  # the result files, not the engine
    first = evaluate(cfg(a))
    second = evaluate(cfg(b))
    assert first["output"] == str(a / "eval" / "metrics.json") != second["output"] == str(b / "eval" / "metrics.json")
    assert json.loads((a / "eval" / "metrics.json").read_text())["model"] == str(a)
    assert json.loads((b / "eval" / "metrics.json").read_text())["model"] == str(b)
    before = (a / "eval" / "metrics.json").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=true"):
        evaluate(cfg(a))
    assert (a / "eval" / "metrics.json").read_bytes() == before
    assert evaluate(cfg(a, overwrite=True))["output"] == str(a / "eval" / "metrics.json")
