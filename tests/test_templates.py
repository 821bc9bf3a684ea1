"""Chat templates: exact strings (LLaVA-1.5 / Llama-3 / ChatML spacing) and segment flags."""

from __future__ import annotations

import pytest

from slime.errors import InputError
from slime.templates import (DC_LLAMA3_SYSTEM, TEMPLATES, VICUNA_SYSTEM, render, render_generation_prompt, render_text,
                             split_rounds, stop_strings)

CONV = [{"from": "human", "value": "What colour is the star?\n<image>"}, {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "How many?"}, {"from": "gpt", "value": "2"}]

EXPECTED = {
    "plain": "<image>Red.\n",
    "vicuna_v1": f"{VICUNA_SYSTEM} USER: <image>\nWhat colour is the star? ASSISTANT: Red.</s>USER: How many? "
                 "ASSISTANT: 2</s>",
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat colour is the star?"
              "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nRed.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nHow many?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n2<|eot_id|>",
    # Dense Connector's released Llama-3 format: a system turn, answers under a "system" header (sic)
    "llama3_dc": f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{DC_LLAMA3_SYSTEM}<|eot_id|>"
                 "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat colour is the star?"
                 "<|eot_id|><|start_header_id|>system<|end_header_id|>\n\nRed.<|eot_id|>"
                 "<|start_header_id|>user<|end_header_id|>\n\nHow many?<|eot_id|>"
                 "<|start_header_id|>system<|end_header_id|>\n\n2<|eot_id|>",
    "chatml": "<|im_start|>user\n<image>\nWhat colour is the star?<|im_end|>\n<|im_start|>assistant\nRed.<|im_end|>\n"
              "<|im_start|>user\nHow many?<|im_end|>\n<|im_start|>assistant\n2<|im_end|>\n",
}
SUPERVISED = {"plain": ["Red.\n"], "vicuna_v1": [" Red.</s>", " 2</s>"], "llama3": ["Red.<|eot_id|>", "2<|eot_id|>"],
              "llama3_dc": ["Red.<|eot_id|>", "2<|eot_id|>"],
              "chatml": ["Red.<|im_end|>", "2<|im_end|>"]}
GEN_SUFFIX = {"plain": "<image>", "vicuna_v1": "How many? ASSISTANT:",
              "llama3": "How many?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
              "llama3_dc": "How many?<|eot_id|><|start_header_id|>system<|end_header_id|>\n\n",
              "chatml": "How many?<|im_end|>\n<|im_start|>assistant\n"}


def _runs(segments, flag):
    """Concatenate consecutive flagged segments into runs of text."""
    runs, current = [], None
    for s in segments:
        if getattr(s, flag):
            current = (current or "") + s.text
        elif current is not None:
            runs.append(current)
            current = None
    return runs + ([current] if current is not None else [])


@pytest.mark.parametrize("template", TEMPLATES)
def test_exact_text_and_flags(template):
    segs = render(template, CONV)
    assert render_text(segs) == EXPECTED[template]
    assert _runs(segs, "supervised") == SUPERVISED[template]
    expected_instr = [] if template == "plain" else ["What colour is the star?", "How many?"]
    assert _runs(segs, "instruction") == expected_instr
    assert not any(s.instruction and s.supervised for s in segs)
    assert not any((s.instruction or s.supervised) and "<image>" in s.text for s in segs)


@pytest.mark.parametrize("template", TEMPLATES)
def test_openai_roles_render_the_same(template):
    openai = [{"role": {"human": "user", "gpt": "assistant"}[m["from"]], "content": m["value"]} for m in CONV]
    assert render(template, openai) == render(template, CONV)


@pytest.mark.parametrize("template", TEMPLATES)
def test_generation_prompt_ends_with_assistant_header(template):
    segs = render_generation_prompt(template, CONV[:3])
    assert render_text(segs).endswith(GEN_SUFFIX[template])
    assert not any(s.supervised for s in segs[-1:])
    with pytest.raises(InputError) as e:
        render_generation_prompt(template, CONV)
    assert e.value.code == "invalid_messages"


def test_image_moved_to_front_of_first_human_turn():
    conv = [{"from": "human", "value": "Describe this. <image> "}, {"from": "gpt", "value": "A star."}]
    assert render_text(render("chatml", conv)).startswith("<|im_start|>user\n<image>\nDescribe this.<|im_end|>")


def test_plain_drops_human_text_and_text_only():
    conv = [{"from": "human", "value": "<image>\nPlease caption"}, {"from": "gpt", "value": "a red star"}]
    assert render_text(render("plain", conv)) == "<image>a red star\n"
    assert render_text(render("plain", [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}])) == "x\n"


def test_system_messages():
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}]
    assert render_text(render("vicuna_v1", conv)) == "Be brief. USER: Hi ASSISTANT: Hello</s>"
    text = render_text(render("llama3", conv))
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>")
    assert _runs(render("chatml", conv), "instruction") == ["Hi"]  # the system prompt is not the instruction


def test_user_content_is_literal():
    segs = render("vicuna_v1", [{"from": "human", "value": "say </s>"}, {"from": "gpt", "value": "ok"}])
    assert [s.text for s in segs if s.literal] == ["say </s>", " ok"]


def test_bad_input():
    with pytest.raises(InputError) as e:
        render("vicuna_v1", [{"role": "robot", "content": "x"}])
    assert e.value.code == "invalid_role" and e.value.status == 400 and "robot" in e.value.message
    with pytest.raises(InputError):
        render("vicuna_v1", [])
    with pytest.raises(InputError):
        render("vicuna_v1", [{"role": "user", "content": ["not", "a", "string"]}])
    with pytest.raises(ValueError, match="unknown template"):
        render("alpaca", CONV)


def test_split_rounds():
    system, rounds = split_rounds([{"role": "system", "content": "s"}, *CONV])
    assert [m["content"] for m in system] == ["s"]
    assert [[m["content"] for m in r] for r in rounds] == [["What colour is the star?\n<image>", "Red."],
                                                           ["How many?", "2"]]


def test_stop_strings():
    assert stop_strings("vicuna_v1") == ["</s>"]
    assert stop_strings("llama3") == ["<|eot_id|>"]
    assert stop_strings("chatml") == ["<|im_end|>"]
    assert stop_strings("plain") == ["\n"]
