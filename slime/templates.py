"""Chat templates rendered as segments, so label and instruction masks are exact (MODEL_SPEC A4).

A conversation (LLaVA ``{"from": human|gpt|system, "value"}`` or OpenAI ``{"role", "content"}``) is
rendered to a list of ``Segment``s; the processor tokenizes each segment separately, so a mask is the
segment's flag repeated over its tokens, and no offset arithmetic over a joined string is needed.

    plain      <image>{caption}\n                                 (caption + "\n" supervised)
    vicuna_v1  {system} USER: <image>\n{q} ASSISTANT: {a}</s>USER: {q2} ASSISTANT: {a2}</s>
    llama3     <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{q}<|eot_id|>...
    llama3_dc  Dense Connector's released Llama-3 format (its conv_llama_3): a system turn, answers under a
               ``system`` header, and the tokenizer's BOS before the template's own <|begin_of_text|>
    chatml     <|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n

``instruction`` marks only the user's own text (the selector's query, MODEL_SPEC C1); ``literal``
marks user/assistant content, in which special-token strings must be tokenized as plain text.
"""

from __future__ import annotations

from dataclasses import dataclass

from slime.errors import InputError

IMAGE = "<image>"
# conv_vicuna_v1 of the official LLaVA-1.5 / SliME / Dense Connector code ("v1"): "user", not "human"
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")
TEMPLATES = ("plain", "vicuna_v1", "llama3", "llama3_dc", "chatml")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_STOPS = {"plain": ["\n"], "vicuna_v1": ["</s>"], "llama3": ["<|eot_id|>"], "llama3_dc": ["<|eot_id|>"],
          "chatml": ["<|im_end|>"]}
DC_LLAMA3_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                    "that the user provides, and assist the user with a variety of tasks using natural language.")


@dataclass(frozen=True)
class Segment:
    text: str
    supervised: bool = False
    instruction: bool = False
    literal: bool = False
    joined: bool = False  # tokenized as a continuation of the previous segment (upstream's one chunk)


def normalize(messages: list[dict]) -> list[dict]:
    """Messages -> ``[{"role": user|assistant|system, "content": str}]``; bad input -> InputError."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InputError("messages must be a non-empty list", param="messages", code="invalid_messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InputError(f"messages[{i}] is not an object", param=f"messages[{i}]", code="invalid_messages")
        role = m.get("from", m.get("role"))
        text = m.get("value", m.get("content"))
        if role not in _ROLES:
            raise InputError(f"messages[{i}] has unknown role {role!r} (expected one of {sorted(_ROLES)})",
                             param=f"messages[{i}].role", code="invalid_role")
        if not isinstance(text, str):
            raise InputError(f"messages[{i}] content must be a string", param=f"messages[{i}].content",
                             code="invalid_messages")
        out.append({"role": _ROLES[role], "content": text})
    return out


def count_images(messages: list[dict]) -> int:
    return sum(m["content"].count(IMAGE) for m in normalize(messages))


def split_rounds(messages: list[dict]) -> tuple[list[dict], list[list[dict]]]:
    """(system messages, rounds); a round starts at a user message that follows a non-user message."""
    msgs = normalize(messages)
    system = [m for m in msgs if m["role"] == "system"]
    rounds: list[list[dict]] = []
    prev = None
    for m in msgs:
        if m["role"] == "system":
            continue
        if not rounds or (m["role"] == "user" and prev != "user"):
            rounds.append([])
        rounds[-1].append(m)
        prev = m["role"]
    return system, rounds


def move_image_first(messages: list[dict]) -> list[dict]:
    """LLaVA ``preprocess_multimodal``: strip every ``<image>`` and put one at the front of the first
    user turn followed by "\n" (only if the conversation had one)."""
    msgs = normalize(messages)
    if not any(IMAGE in m["content"] for m in msgs):
        return msgs
    out = [{"role": m["role"], "content": m["content"].replace(IMAGE, "").strip() if IMAGE in m["content"]
            else m["content"]} for m in msgs]
    first_user = next((i for i, m in enumerate(out) if m["role"] == "user"), None)
    if first_user is None:
        raise InputError("the image must belong to a user message", param="messages", code="invalid_messages")
    out[first_user]["content"] = IMAGE + "\n" + out[first_user]["content"]
    return out


def _user_content(text: str) -> list[Segment]:
    """The (moved) image placeholder, its newline, then the question as the instruction."""
    segs = []
    if text.startswith(IMAGE):
        segs += [Segment(IMAGE), Segment("\n")]
        text = text[len(IMAGE) + 1:]
    if text:
        segs.append(Segment(text, instruction=True, literal=True, joined=True))
    return segs


def _plain(msgs: list[dict], for_generation: bool) -> list[Segment]:
    # Upstream preprocess_plain: the human text is replaced by the bare <image>; caption = first answer.
    has_image = any(IMAGE in m["content"] for m in msgs)
    segs = [Segment(IMAGE)] if has_image else []
    if for_generation:
        return segs
    caption = next((m["content"] for m in msgs if m["role"] == "assistant"), None)
    if caption is None:
        raise InputError("plain template needs an assistant caption", param="messages", code="invalid_messages")
    return segs + [Segment(caption, supervised=True, literal=True), Segment("\n", supervised=True)]


def _vicuna(msgs: list[dict], for_generation: bool) -> list[Segment]:
    system = " ".join(m["content"] for m in msgs if m["role"] == "system") or VICUNA_SYSTEM
    segs = [Segment(system)]
    after_answer = False  # conv_vicuna_v1 sep2 "</s>" is not followed by a space, sep " " is
    for m in (m for m in msgs if m["role"] != "system"):
        if m["role"] == "user":
            segs.append(Segment(("USER: " if after_answer else " USER: ")))
            segs += _user_content(m["content"])
            after_answer = False
        else:
            segs += [Segment(" ASSISTANT:"), Segment(" " + m["content"], supervised=True, literal=True),
                     Segment("</s>", supervised=True)]
            after_answer = True
    if for_generation:
        segs.append(Segment(" ASSISTANT:"))
    return segs


def _header(template: str, role: str) -> str:
    if template == "llama3_dc" and role == "assistant":
        role = "system"  # sic: the released DC Llama-3 models answer under a system header (MODEL_SPEC C5)
    if template in ("llama3", "llama3_dc"):
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n"
    return f"<|im_start|>{role}\n"


def _tagged(template: str, msgs: list[dict], for_generation: bool) -> list[Segment]:
    end, tail = ("<|im_end|>", "\n") if template == "chatml" else ("<|eot_id|>", "")
    segs = [Segment("<|begin_of_text|>")] if template in ("llama3", "llama3_dc") else []
    if template == "llama3_dc":
        system = " ".join(m["content"] for m in msgs if m["role"] == "system") or DC_LLAMA3_SYSTEM
        segs += [Segment(_header(template, "system")), Segment(system), Segment(end)]
        msgs = [m for m in msgs if m["role"] != "system"]
    for m in msgs:
        segs.append(Segment(_header(template, m["role"])))
        if m["role"] == "assistant":
            segs += [Segment(m["content"], supervised=True, literal=True), Segment(end, supervised=True)]
        else:
            segs += (_user_content(m["content"]) if m["role"] == "user"
                     else [Segment(m["content"], literal=True)]) + [Segment(end)]
        if tail:
            segs.append(Segment(tail))
    if for_generation:
        segs.append(Segment(_header(template, "assistant")))
    return [s for s in segs if s.text]


def render(template: str, messages: list[dict], for_generation: bool = False) -> list[Segment]:
    """Conversation -> segments. ``for_generation`` ends with the assistant header (no answer needed)."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r} (expected one of {TEMPLATES})")
    msgs = move_image_first(messages)
    if for_generation and msgs[-1]["role"] == "assistant":
        raise InputError("the last message must be from the user", param="messages", code="invalid_messages")
    if template == "plain":
        return _plain(msgs, for_generation)
    if template == "vicuna_v1":
        return _vicuna(msgs, for_generation)
    return _tagged(template, msgs, for_generation)


def render_generation_prompt(template: str, messages: list[dict]) -> list[Segment]:
    return render(template, messages, for_generation=True)


def render_text(segments: list[Segment]) -> str:
    return "".join(s.text for s in segments)


def stop_strings(template: str) -> list[str]:
    """Strings that end an assistant turn (generation stops on them and strips them)."""
    if template not in _STOPS:
        raise ValueError(f"unknown template {template!r} (expected one of {TEMPLATES})")
    return list(_STOPS[template])
