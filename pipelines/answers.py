"""How an answer is scored, in the standard library only, and the same rule as an lmms-eval task.

``slime evaluate`` scores with ``score``. ``slime lmms-eval`` copies this file into the lmms-eval task folder
it writes (as ``slime_task.py``), where lmms-eval, in its own environment without slime-ray, calls the
hooks below: the harness and our evaluation therefore build the same conversation from a record and
cannot score one answer two ways. Nothing here may import beyond the standard library at module level
(PIL, present in both environments, is imported where an image is decoded).

A row of an exported task (``pipelines.harness.export_task``): ``id``, ``task``, ``qtype``, ``image`` (the
record's untouched image bytes, or null), ``messages`` (JSON: the conversation up to its last user turn, as
``pipelines.evaluate.split_record`` gives it, ``<image>`` where the record has it) and ``answer`` (the
final gpt turn).
"""

from __future__ import annotations

import io
import json
import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)
IMAGE = "<image>"
REQUEST_FAILED = "[LMMS_EVAL_REQUEST_FAILED"  # how lmms-eval's openai backend reports a request it gave up on


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation and the articles a/an/the removed, whitespace collapsed."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def score(prediction: str, reference: str) -> dict[str, bool]:
    """``exact``: equal after stripping whitespace; ``correct``: equal after ``normalize_answer``."""
    return {"exact": prediction.strip() == reference.strip(),
            "correct": normalize_answer(prediction) == normalize_answer(reference)}


# ----------------------------------------------------------------------------- lmms-eval task hooks


def doc_to_visual(doc: dict) -> list:
    if not doc.get("image"):
        return []
    from PIL import Image

    image = Image.open(io.BytesIO(doc["image"]))
    image.load()
    return [image]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The last user turn's text (what lmms-eval logs as the prompt); the request is ``doc_to_messages``."""
    return json.loads(doc["messages"])[-1]["content"].replace(IMAGE, "").strip()


def doc_to_messages(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> list[dict]:
    """The record's conversation as chat messages, the image as a content part where ``<image>`` stands.

    Our endpoint joins a message's parts with a newline, an image part becoming ``<image>``, so the text
    around the placeholder is split off without its adjacent newline: ``"<image>\\nQ"`` -> [image, "Q"]
    -> ``"<image>\\nQ"`` again, the prompt ``slime evaluate`` builds from the same record. A record without
    the placeholder gets the image first in its first user turn, as ``slime.predictor`` places it."""
    visuals = doc_to_visual(doc)
    out = []
    for m in json.loads(doc["messages"]):
        text, content = m["content"], []
        if visuals and IMAGE in text:
            before, _, after = text.partition(IMAGE)
            before, after = before.removesuffix("\n"), after.removeprefix("\n")
            if before:
                content.append({"type": "text", "text": before})
            content.append({"type": "image", "url": visuals.pop()})
            if after:
                content.append({"type": "text", "text": after})
        else:
            content.append({"type": "text", "text": text})
        out.append({"role": m["role"], "content": content})
    if visuals:  # no placeholder: the image goes first in the first user turn, as slime.predictor places it
        first = next(m for m in out if m["role"] == "user")
        first["content"].insert(0, {"type": "image", "url": visuals.pop()})
    return out


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    prediction = results[0] if results else ""
    failed = prediction.startswith(REQUEST_FAILED)
    scored = score(prediction, doc["answer"])
    return {"slime_accuracy": float(scored["correct"] and not failed),
            "slime_exact_match": float(scored["exact"] and not failed),
            "slime_request_failed": float(failed)}
