"""OpenAI request parsing, validation and error bodies for the Serve app (pure: no Ray, no model)."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from pipelines.serve import openai as oai
from slime.errors import InputError
from slime.predictor import RequestLimits

LIMITS = RequestLimits(max_images=1, max_image_pixels=200 * 200, max_new_tokens=128)


def png_url(w: int = 64, h: int = 48) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def parse(body: dict | bytes, limits: RequestLimits = LIMITS) -> oai.ParsedChat:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return oai.to_chat(oai.parse_body(raw, limits), limits)


def err(body: dict | bytes, limits: RequestLimits = LIMITS) -> InputError:
    with pytest.raises(InputError) as info:
        parse(body, limits)
    return info.value


def user(*parts) -> dict:
    return {"messages": [{"role": "user", "content": list(parts)}]}


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def test_content_parts_flatten_to_one_image_placeholder():
    p = parse({**user(text("what is"), image(png_url()), text("this?")), "max_completion_tokens": 7,
               "temperature": 1, "top_p": 0.5, "stop": "\n", "seed": 3, "gamma": 0.5, "model": "m"})
    assert p.chat["messages"] == [{"role": "user", "content": "what is\n<image>\nthis?"}]
    assert p.chat["max_tokens"] == 7 and p.chat["temperature"] == 1.0 and p.chat["top_p"] == 0.5
    assert p.chat["stop"] == ["\n"] and p.chat["seed"] == 3 and p.chat["gamma"] == 0.5
    assert [param for _, param in p.images] == ["messages[0].content[1].image_url.url"]
    assert p.model == "m" and not p.stream


def test_string_content_defaults_and_roles():
    p = parse({"messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"},
                            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}],
               "stream": True, "stream_options": {"include_usage": True}, "user": "u-1"})
    assert [m["role"] for m in p.chat["messages"]] == ["system", "user", "assistant", "user"]
    assert p.chat["max_tokens"] == LIMITS.default_max_tokens and p.chat["temperature"] == 0.0
    assert p.chat["gamma"] is None and p.stream and p.include_usage


@pytest.mark.parametrize("body, status, param, code", [
    (b"{not json", 400, None, "invalid_json"),
    (b"[]", 400, None, "invalid_value"),
    ({}, 400, "messages", "missing_required_parameter"),
    ({"messages": []}, 400, "messages", "invalid_messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", "invalid_role"),
    ({"messages": [{"role": "user"}]}, 400, "messages[0].content", "invalid_messages"),
    ({"messages": [{"role": "system", "content": "x"}]}, 400, "messages", "invalid_messages"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "invalid_value"),
    (user({"type": "audio", "x": 1}), 400, "messages[0].content[0].type", "invalid_value"),
    (user({"type": "image_url"}), 400, "messages[0].content[0].image_url", "invalid_messages"),
    (user(text("a <image> b")), 400, "messages[0].content[0]", "invalid_messages"),
    (user(image(png_url()), image(png_url())), 400, "messages", "too_many_images"),
    (user(image("http://example.com/a.png")), 400, "messages[0].content[0].image_url.url", "invalid_image_url"),
    (user(image("s3://bucket/a.png")), 400, "messages[0].content[0].image_url.url", "invalid_image_url"),
    (user(image("file:///etc/passwd")), 400, "messages[0].content[0].image_url.url", "invalid_image_url"),
    ({**user(text("x")), "n": 9}, 400, "n", "invalid_value"),
    ({**user(text("x")), "n": 2, "stream": True}, 400, "n", "unsupported_value"),
    ({**user(text("x")), "unknown_field": 1}, 400, "unknown_field", "unsupported_parameter"),
    ({**user(text("x")), "logit_bias": {"5": 1}}, 400, "logit_bias", "unsupported_parameter"),
    ({**user(text("x")), "top_logprobs": 2}, 400, "top_logprobs", "invalid_value"),
    ({**user(text("x")), "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", "invalid_value"),
    ({**user(text("x")), "response_format": {"type": "xml"}}, 400, "response_format.type", "invalid_value"),
    ({**user(text("x")), "response_format": {"type": "json_schema"}}, 400, "response_format.json_schema",
     "missing_required_parameter"),
    ({**user(text("x")), "gamma": 0}, 400, "gamma", "invalid_value"),
    ({**user(text("x")), "gamma": 1.5}, 400, "gamma", "invalid_value"),
    ({**user(text("x")), "gamma": "0.5"}, 400, "gamma", "invalid_value"),
    ({**user(text("x")), "temperature": "hot"}, 400, "temperature", "invalid_value"),
    ({**user(text("x")), "temperature": True}, 400, "temperature", "invalid_value"),
    ({**user(text("x")), "temperature": 3}, 400, "temperature", "invalid_value"),
    ({**user(text("x")), "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ({**user(text("x")), "max_tokens": 129}, 400, "max_tokens", "invalid_value"),
    ({**user(text("x")), "max_completion_tokens": 1000}, 400, "max_completion_tokens", "invalid_value"),
    ({**user(text("x")), "stop": ["a", ""]}, 400, "stop", "invalid_value"),
    ({**user(text("x")), "seed": 1.5}, 400, "seed", "invalid_value"),
    ({**user(text("x")), "n": 3}, 400, "n", "invalid_value"),  # greedy by default: n copies of one answer
    ({**user(text("x")), "n": 2, "temperature": 0}, 400, "n", "invalid_value"),
])
def test_bad_requests_name_param_and_code(body, status, param, code):
    e = err(body)
    assert (e.status, e.param, e.code) == (status, param, code), e.message
    body = e.as_openai()["error"]
    assert body["type"] == "invalid_request_error" and body["message"] and body["param"] == param


def test_engine_options():
    p = parse({**user(text("x")), "n": 3, "temperature": 0.7, "logprobs": True, "top_logprobs": 2,
               "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}})
    assert (p.n, p.logprobs, p.response_format) == (3, 2, ("json_schema", {"type": "object"}))
    p = parse({**user(text("x")), "logprobs": True, "response_format": {"type": "json_object"}})
    assert (p.n, p.logprobs, p.response_format) == (1, 0, ("json_object", None))
    p = parse({**user(text("x")), "response_format": {"type": "text"}, "logprobs": False})
    assert (p.n, p.logprobs, p.response_format) == (1, None, None)


def test_request_size_cap_is_413():
    e = err(b"{}" + b" " * 100, RequestLimits(max_request_bytes=50))
    assert (e.status, e.code) == (413, "request_too_large")


def test_data_url_decodes_and_checks():
    img = oai.load_image(png_url(30, 20), LIMITS, "p")
    assert img.size == (30, 20) and img.mode == "RGB"
    cases = [
        ("data:image/png;base64,@@@notbase64", 400, "invalid_base64"),
        ("data:image/png," + "abc", 400, "invalid_image_url"),
        ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), 400, "invalid_image"),
        (png_url(300, 300), 413, "image_too_large"),
        ("https://example.com/x.png", 400, "invalid_image_url"),
    ]
    for url, status, code in cases:
        with pytest.raises(InputError) as info:
            oai.load_image(url, LIMITS, "messages[0].content[0].image_url.url")
        assert (info.value.status, info.value.code) == (status, code), url
        assert info.value.param == "messages[0].content[0].image_url.url"


def test_truncated_png_is_400_not_a_crash():
    raw = base64.b64decode(png_url(120, 90).split(",", 1)[1])
    url = "data:image/png;base64," + base64.b64encode(raw[: len(raw) // 2]).decode()
    with pytest.raises(InputError) as info:
        oai.load_image(url, LIMITS, "p")
    assert info.value.code == "invalid_image"


def test_allow_listed_scheme_fetch_failure_is_400():
    limits = RequestLimits(allowed_url_schemes=("data", "http"))
    parse(user(image("http://127.0.0.1:9/x.png")), limits)  # scheme now accepted by the parser
    with pytest.raises(InputError) as info:
        oai.load_image("http://127.0.0.1:9/x.png", limits, "p")  # nothing listens on port 9
    assert (info.value.status, info.value.code) == (400, "image_fetch_failed")


def test_validation_error_param_paths():
    assert oai._param(("body", "messages", 0, "content", "list[ContentPart]", 2, "type")) == "messages[0].content[2].type"
    assert oai._param(("body",)) is None
    assert oai.validation_error([]).code == "invalid_request"


def test_response_shapes():
    class R:
        text, finish_reason, prompt_tokens, completion_tokens, visual_tokens = "hi", "stop", 10, 2, 7

    body = oai.completion_body("id1", "m", R(), "fp")
    assert body["object"] == "chat.completion" and body["choices"][0]["message"] == {"role": "assistant",
                                                                                      "content": "hi"}
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12, "visual_tokens": 7}
    c = oai.chunk("id1", "m", 1, {"content": "x"})
    assert c["object"] == "chat.completion.chunk" and c["choices"][0]["delta"] == {"content": "x"}
    assert oai.sse(c).startswith("data: {") and oai.sse(c).endswith("\n\n")
    assert oai.SSE_DONE == "data: [DONE]\n\n"


def test_unexpected_errors_are_openai_500s_and_the_app_keeps_serving():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from pipelines.serve.ingress import install_error_handlers

    api = FastAPI()
    install_error_handlers(api)

    @api.get("/boom")
    async def boom():
        raise RuntimeError("a bug")

    @api.get("/ok")
    async def ok():
        return {"ok": True}

    client = TestClient(api, raise_server_exceptions=False)
    r = client.get("/boom")
    assert r.status_code == 500 and r.json() == {"error": {"message": "internal error: RuntimeError",
                                                           "type": "server_error", "param": None, "code": None}}
    assert client.get("/ok").json() == {"ok": True}


@pytest.mark.parametrize(("engine", "setting", "value"), [("vllm", "max_batch_size", 4), ("vllm", "device", "cuda"),
                                                         ("hf", "max_num_seqs", 64), ("hf", "tensor_parallel_size", 2),
                                                         ("hf", "lora_dir", "s3://b/loras"),
                                                         ("hf", "adapters", {"a": "/a"})])
def test_a_setting_the_engine_cannot_honour_is_an_error_naming_it(engine, setting, value):
    from pipelines.serve.ingress import ServeArgs, check_engine_settings

    check_engine_settings(ServeArgs(model="/m"), engine)  # defaults are fine for either engine
    with pytest.raises(ValueError, match=f"{setting}={value!r} is a setting of the"):
        check_engine_settings(ServeArgs(model="/m", **{setting: value}), engine)


@pytest.mark.parametrize(("settings", "message"), [({"max_lora_rank": 12}, "max_lora_rank must be one of"),
                                                   ({"max_loras": 4, "max_cpu_loras": 2}, "max_cpu_loras >= max_loras"),
                                                   ({"adapters": {"a/b": "/x"}}, "not a usable adapter name"),
                                                   ({"model_id": "m", "adapters": {"m": "/x"}}, "not the base's")])
def test_lora_serving_settings_are_checked(settings, message):
    from pipelines.serve.ingress import ServeArgs

    with pytest.raises(ValueError, match=message):
        ServeArgs(model="/m", **settings)


def test_default_model_id(tmp_path):
    from pipelines.serve.ingress import default_model_id

    (tmp_path / "versions" / "v7" / "model").mkdir(parents=True)
    assert default_model_id("s3://b/registry/versions/v7/model", tmp_path / "versions" / "v7" / "model") == "v7"
    assert default_model_id(str(tmp_path / "ckpt-3"), tmp_path / "nowhere") == "ckpt-3"
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "metadata.json").write_text('{"model_id": "slime-8b-sft"}')
    assert default_model_id("/x/model", tmp_path / "meta") == "slime-8b-sft"
