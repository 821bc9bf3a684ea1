"""lmms-eval against a served model (``slime lmms-eval``, pipelines/harness).

Without the harness: the task hooks of pipelines/answers.py turn a record into the request our endpoint
parses back into the record's own conversation, and score as ``slime evaluate`` does; config and
environment mistakes are one line. With it (``make harness`` builds ``.venv-lmms``): lmms-eval 0.7.3's own
``openai`` backend, run as a subprocess against our vLLM endpoint, gives every question the answer
``slime evaluate`` gives, and requests it cannot get through are counted, not scored silently."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from pipelines import answers
from pipelines.harness.lmms import HARNESS_PYTHON


def _png(w: int = 64, h: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _wire(messages: list[dict]) -> dict:
    """lmms-eval's ChatMessages.to_openai_messages, reduced to what matters here: an image part becomes a
    PNG data URL part, text stays text."""
    out = []
    for m in messages:
        parts = []
        for p in m["content"]:
            if p["type"] == "image":
                buf = io.BytesIO()
                p["url"].save(buf, format="PNG")
                parts.append({"type": "image_url", "image_url": {
                    "url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}})
            else:
                parts.append(p)
        out.append({"role": m["role"], "content": parts})
    return {"messages": out}


@pytest.mark.parametrize("conversation", [
    [("user", "<image>\nWhat colour is the dot?")],
    [("user", "What colour is the dot?\n<image>")],
    [("user", "Look:\n<image>\nwhat colour is the dot?")],
    [("user", "What colour is the dot?")],  # no placeholder: the image goes first, as the Predictor puts it
    [("system", "Answer briefly."), ("user", "<image>\nWhat is it?"), ("assistant", "a dot"), ("user", "Colour?")],
])
def test_the_task_asks_our_endpoint_what_slime_evaluate_asks(conversation):
    """doc_to_messages -> lmms-eval's wire format -> our endpoint's parser gives back the record's messages
    (with the placeholder where slime.predictor would add it), and the image bytes unchanged."""
    from pipelines.serve import openai as oai
    from slime.predictor import IMAGE, RequestLimits

    messages = [{"role": r, "content": c} for r, c in conversation]
    doc = {"image": _png(), "messages": json.dumps(messages), "answer": "green"}
    limits = RequestLimits(max_images=1, max_image_pixels=10**6, max_new_tokens=64)
    parsed = oai.to_chat(oai.parse_body(json.dumps(_wire(answers.doc_to_messages(doc))).encode(), limits), limits)
    expected = [dict(m) for m in messages]
    if not any(IMAGE in m["content"] for m in expected):
        first = next(m for m in expected if m["role"] == "user")
        first["content"] = IMAGE + "\n" + first["content"]
    assert parsed.chat["messages"] == expected
    assert answers.doc_to_text(doc) == messages[-1]["content"].replace(IMAGE, "").strip()
    (url, _), = parsed.images
    sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert sent.tobytes() == Image.open(io.BytesIO(_png())).tobytes()


def test_the_task_scores_as_slime_evaluate_and_counts_failed_requests():
    from pipelines.evaluate import normalize_answer

    assert normalize_answer is answers.normalize_answer  # one rule, imported by evaluation
    doc = {"answer": "red circle"}
    assert answers.process_results(doc, ["The Red circle."]) == {
        "slime_accuracy": 1.0, "slime_exact_match": 0.0, "slime_request_failed": 0.0}
    assert answers.process_results(doc, ["red circle"])["slime_exact_match"] == 1.0
    failed = answers.process_results(doc, ["[LMMS_EVAL_REQUEST_FAILED after 3 retries] Connection error."])
    assert failed == {"slime_accuracy": 0.0, "slime_exact_match": 0.0, "slime_request_failed": 1.0}


def test_the_task_module_needs_only_the_standard_library():
    """The harness environment has no slime-ray: the copied module may import nothing of ours at the top."""
    import ast

    tree = ast.parse(Path(answers.__file__).read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {(n.module if isinstance(n, ast.ImportFrom) else a.name).split(".")[0] for n in top for a in n.names}
    assert names <= {"__future__", "io", "json", "re", "string"}, names


@pytest.mark.parametrize(("overrides", "message"), [
    (["model=/x", "endpoint=http://127.0.0.1:1/v1", "data.val=/y"], "exactly one of"),
    (["data.val=/y"], "exactly one of"),
    (["model=/x"], "nothing to evaluate"),
    (["endpoint=http://127.0.0.1:1/v1", "data.val=/y"], "give output="),
    (["model=/x", "data.val=/y", "task_name=bad-name"], "task_name"),
    (["registry=/r", "data.val=/y"], "registry and version go together"),
])
def test_config_mistakes_are_one_line(capsys, overrides, message):
    from jobs.lmms_eval import main

    assert main(overrides) == 2
    err = capsys.readouterr().err
    assert "slime lmms-eval: config error" in err and message in err and "Traceback" not in err


def test_a_missing_harness_environment_says_how_to_build_it(capsys, tmp_path):
    from jobs.lmms_eval import main

    assert main([f"model={tmp_path}", f"data.val={tmp_path}", f"python={tmp_path}/none/bin/python"]) == 2
    err = capsys.readouterr().err
    assert "no lmms-eval environment" in err and "make harness" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- with lmms-eval itself


@pytest.fixture(scope="module")
def harness():
    if not HARNESS_PYTHON.is_file():
        pytest.fail(f"{HARNESS_PYTHON} is missing: `make harness` builds it (make test does)")
    return str(HARNESS_PYTHON)


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory):
    """Synthetic questions packed as shards, and a tiny model vLLM serves (random: its answers are noise,
    which makes comparing them exact a strong check)."""
    from pipelines.data.pack import PackConfig, pack
    from pipelines.data.synth import SynthConfig, generate
    from slime.presets import save_tiny_checkpoint, tiny_vllm

    root = tmp_path_factory.mktemp("harness")
    model = save_tiny_checkpoint(root / "model", cfg=tiny_vllm())
    generate(SynthConfig(output_dir=str(root / "raw"), num_images=3, min_side=448, max_side=640, val_fraction=0.0,
                         progress=False))
    pack(PackConfig(inputs=(str(root / "raw" / "train.json"),), output_dir=str(root / "wds"), progress=False))
    return root, model


def test_an_unknown_task_is_one_line(harness, val_shards, capsys):
    from jobs.lmms_eval import main

    root, model = val_shards
    assert main([f"model={model}", f"data.val={root}/wds", "tasks=[mme,no_such_task]"]) == 2
    err = capsys.readouterr().err
    assert "has no task no_such_task" in err and "mme" not in err.split("has no task")[1]


@pytest.mark.integration
def test_lmms_eval_and_slime_evaluate_give_the_same_answers(harness, val_shards, ray_session, capsys):
    """One model, one set of questions: slime evaluate (vLLM, offline) and lmms-eval through our endpoint
    (vLLM, served) answer every question alike under greedy decoding, and score alike. References are made
    so that evaluation's answer is right on every other question: accuracy 0.5 on both sides only if both
    got the same answers."""
    from jobs.evaluate import main as evaluate
    from jobs.lmms_eval import main as lmms_eval
    from pipelines.data.pack import PackConfig, pack

    root, model = val_shards
    assert evaluate([f"model={model}", f"data.val={root}/wds", f"output={root}/eval/metrics.json", "max_tokens=8"]) == 0
    ours = {r["id"]: r for r in map(json.loads, (root / "eval" / "predictions.jsonl").read_text().splitlines())}
    records = json.loads((root / "raw" / "train.json").read_text())
    for i, r in enumerate(records):
        r["conversations"][-1]["value"] = ours[r["id"]]["prediction"] if i % 2 == 0 else "zq wrong answer"
    (root / "raw" / "known.json").write_text(json.dumps(records))
    pack(PackConfig(inputs=(str(root / "raw" / "known.json"),), output_dir=str(root / "known"), progress=False))

    capsys.readouterr()
    assert lmms_eval([f"model={model}", f"data.val={root}/known", "max_tokens=8", f"work_dir={root}/work"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads((model / "eval" / "lmms_eval.json").read_text())
    assert printed["output"] == str(model / "eval" / "lmms_eval.json") and report["harness"] == "lmms-eval 0.7.3"
    theirs = {r["id"]: r for r in map(json.loads, (model / "eval" / "lmms_eval_predictions.jsonl").read_text()
                                      .splitlines())}
    assert set(theirs) == set(ours) and len(theirs) == len(records)
    assert {i: r["prediction"] for i, r in theirs.items()} == {i: r["prediction"] for i, r in ours.items()}
    assert all(r["prediction"] for r in theirs.values())
    # lmms-eval's own aggregate and ours over its samples agree, and both are exactly half
    assert report["tasks"]["slime_val"]["slime_accuracy,none"] == pytest.approx(0.5, abs=0.5 / len(records))
    assert report["slime_task"]["accuracy"] == report["tasks"]["slime_val"]["slime_accuracy,none"]
    assert report["slime_task"]["accuracy"] == sum(i % 2 == 0 for i in range(len(records))) / len(records)
    assert report["failed_requests"] == 0 and report["num_samples"] == {"slime_val": len(records)}
    samples = (model / "eval" / "lmms_eval_samples_slime_val.jsonl").read_text().splitlines()
    assert len(samples) == len(records) and "filtered_resps" in json.loads(samples[0])
    # the harness reached nothing but our endpoint: offline, and its log is where the report says
    assert Path(report["log"]).is_file()


@pytest.mark.integration
def test_requests_that_fail_are_counted_wrong_and_fail_the_job(harness, val_shards, capsys, tmp_path):
    """An endpoint that does not answer: lmms-eval scores each request as the text
    [LMMS_EVAL_REQUEST_FAILED ...] without raising; the job counts them, writes its results (all wrong) and
    exits 2 naming how many failed."""
    from jobs.lmms_eval import main
    from pipelines.serve.ingress import free_port

    root, _ = val_shards
    out = tmp_path / "lmms_eval.json"
    assert main([f"endpoint=http://127.0.0.1:{free_port()}/v1", "model_id=gone", f"data.val={root}/wds", "limit=3",
                 "max_retries=1", "timeout_s=5", f"output={out}", f"work_dir={tmp_path}/work"]) == 2
    err = capsys.readouterr().err
    assert "3 of 3 requests failed" in err and str(out) in err
    report = json.loads(out.read_text())
    assert report["failed_requests"] == 3 and report["slime_task"]["accuracy"] == 0.0
    assert report["slime_task"]["errors"] == 3
