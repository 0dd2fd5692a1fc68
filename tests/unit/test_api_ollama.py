"""The Ollama API (``/api/...``) on tiny models: shapes, NDJSON streaming, options,
validation, errors in Ollama's shape, auth, and the thinking split on the reasoning fixture.

The tiny random model's answers are noise: these tests check routing and contracts.
Whether a real model answers, calls tools and writes valid JSON through the official
``ollama`` client is tested end to end (tests/e2e/test_serve_ollama.py).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import jsonschema
import pytest
from fastapi.testclient import TestClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny import make_tiny_artifact  # noqa: E402
from tiny_reasoning import ANSWER, THOUGHT, make_reasoning_model  # noqa: E402

from squish.api.app import create_app  # noqa: E402
from squish.api.ollama import Shapes  # noqa: E402
from squish.api.settings import ServeSettings  # noqa: E402
from squish.runtime.engine import Engine  # noqa: E402
from squish.serving.errors import ServeError  # noqa: E402
from squish.serving.events import Done, Reply, ToolCall, Usage  # noqa: E402

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
HI = [{"role": "user", "content": "hi"}]
UNIT = {"type": "object", "required": ["unit"], "additionalProperties": False,
        "properties": {"unit": {"enum": ["c", "f"]}}}
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Weather", "parameters": UNIT}}]


def _serve(path: Path, **settings):
    def load():
        from squish.runtime.loader import load_artifact

        return load_artifact(path)

    engine = Engine(load, max_batch=4, max_queue=4)
    app = create_app(ServeSettings(rate_limit_per_minute=6000, rate_limit_burst=1000, **settings), engine)
    return app, engine


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    art = make_tiny_artifact(tmp_path_factory.mktemp("tiny") / "tiny-4bit")
    app, engine = _serve(art, api_key=KEY, max_tokens=64)
    with TestClient(app) as c:
        assert engine.ready.wait(120), engine.load_error
        c.artifact, c.app_ = art, app
        yield c


def post(client, path: str, **body):
    return client.post(path, json=body, headers=AUTH)


def chat(client, **kw):
    body = {"model": "tiny-4bit", "messages": HI, "options": {"num_predict": 5, "temperature": 0}, **kw}
    return post(client, "/api/chat", **body)


def lines(r) -> list[dict]:
    return [json.loads(x) for x in r.text.splitlines() if x]


# ---- probes and model metadata ------------------------------------------------------------------

def test_probe_and_version(client):
    r = client.get("/", headers=AUTH)
    assert r.status_code == 200 and r.text == "Ollama is running"
    assert client.head("/", headers=AUTH).status_code == 200
    v = client.get("/api/version", headers=AUTH).json()
    assert [int(x) for x in v["version"].split(".")] >= [0, 30] and v["squish"]


def test_tags_ps_show_describe_the_served_model(client):
    art = client.artifact
    (m,) = client.get("/api/tags", headers=AUTH).json()["models"]
    assert m["name"] == m["model"] == "tiny-4bit:latest"
    assert m["digest"] == hashlib.sha256((art / "squish.json").read_bytes()).hexdigest()
    assert m["size"] == sum(f.stat().st_size for f in art.iterdir() if f.is_file())
    assert m["modified_at"].endswith("Z")
    d = m["details"]
    assert (d["format"], d["family"], d["families"], d["quantization_level"]) == \
        ("safetensors", "llama", ["llama"], "INT4")
    assert d["parameter_size"].endswith("K")  # a few hundred thousand parameters
    (p,) = client.get("/api/ps", headers=AUTH).json()["models"]
    assert p["name"] == "tiny-4bit:latest" and p["expires_at"].startswith("9999")
    assert p["size"] == sum(f.stat().st_size for f in art.glob("*.safetensors")) and p["context_length"] == 512
    for body in ({"model": "tiny-4bit:latest"}, {"name": "tiny-4bit"}, {"model": "default"}):
        s = post(client, "/api/show", **body).json()
        assert s["details"] == d and s["capabilities"] == ["completion", "tools"]
    info = s["model_info"]
    assert info["general.architecture"] == "llama" and info["llama.context_length"] == 512
    assert info["general.parameter_count"] > 100_000 and "<|im_start|>" in s["template"]
    assert "PARAMETER num_ctx 512" in s["modelfile"] and "temperature" in s["parameters"]


@pytest.mark.parametrize("name", ["tiny-4bit", "tiny-4bit:latest", "default", "default:latest"])
def test_model_names_in_name_tag_form(client, name):
    r = chat(client, model=name, stream=False)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == name  # echoed as the client wrote it, as Ollama does


@pytest.mark.parametrize("path,body", [("/api/chat", {"messages": HI}), ("/api/generate", {"prompt": "x"}),
                                       ("/api/show", {})])
def test_unknown_model_is_404_in_ollama_wording(client, path, body):
    r = post(client, path, model="llama3:7b", **body)
    assert r.status_code == 404
    assert r.json() == {"error": "model 'llama3:7b' not found; this server serves 'tiny-4bit:latest'"}


# ---- chat and generate ----------------------------------------------------------------------

def test_chat_streams_ndjson_by_default_and_agrees_with_the_whole_reply(client):
    r = chat(client)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    chunks = lines(r)
    assert all(c["model"] == "tiny-4bit" and c["created_at"].endswith("Z") for c in chunks)
    assert [c["done"] for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert all(c["message"]["role"] == "assistant" for c in chunks)
    last = chunks[-1]
    assert last["message"]["content"] == "" and last["done_reason"] in ("stop", "length")
    assert last["eval_count"] == 5 and last["prompt_eval_count"] > 0
    parts = [last[k] for k in ("load_duration", "prompt_eval_duration", "eval_duration")]
    assert all(isinstance(x, int) and x >= 0 for x in parts) and last["total_duration"] > 0
    assert abs(sum(parts) - last["total_duration"]) <= 3  # the phases add up (nanosecond rounding)
    whole = chat(client, stream=False)
    assert whole.headers["content-type"].startswith("application/json")
    body = whole.json()
    assert body["done"] is True and body["message"]["content"] == "".join(c["message"]["content"] for c in chunks)
    assert body["eval_count"] == last["eval_count"] and body["prompt_eval_count"] == last["prompt_eval_count"]


def test_a_body_is_json_whatever_its_content_type(client):
    # Ollama's docs use `curl -d '{...}'`, which sends application/x-www-form-urlencoded.
    body = json.dumps({"model": "tiny-4bit", "prompt": "hi", "stream": False, "options": {"num_predict": 2}})
    r = client.post("/api/generate", content=body,
                    headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and r.json()["done"] is True, r.text


def test_generate_applies_the_template_unless_raw(client):
    prompt = "The quick brown fox"
    templated = post(client, "/api/generate", model="tiny-4bit", prompt=prompt, stream=False,
                     options={"num_predict": 3, "temperature": 0}).json()
    raw = post(client, "/api/generate", model="tiny-4bit", prompt=prompt, raw=True, stream=False,
               options={"num_predict": 3, "temperature": 0}).json()
    plain = post(client, "/v1/completions", model="tiny-4bit", prompt=prompt, max_tokens=3, temperature=0).json()
    assert raw["prompt_eval_count"] == plain["usage"]["prompt_tokens"]  # as is: no template
    assert raw["response"] == plain["choices"][0]["text"]
    assert templated["prompt_eval_count"] > raw["prompt_eval_count"]
    with_system = post(client, "/api/generate", model="tiny-4bit", prompt=prompt, system="Be brief.", stream=False,
                       options={"num_predict": 3, "temperature": 0}).json()
    assert with_system["prompt_eval_count"] > templated["prompt_eval_count"]
    assert "message" not in raw and raw["done"] is True and raw["eval_count"] <= 3
    streamed = lines(post(client, "/api/generate", model="tiny-4bit", prompt=prompt, raw=True,
                          options={"num_predict": 3, "temperature": 0}))
    assert "".join(c["response"] for c in streamed) == raw["response"] and streamed[-1]["done"]


def test_options_reach_the_sampler(client):
    # seed: same seed, same sample; stop: the reply ends before the stop string
    kw = {"stream": False, "options": {"num_predict": 12, "temperature": 1.5, "top_k": 0, "top_p": 0, "seed": 7}}
    a, b = chat(client, **kw).json(), chat(client, **kw).json()
    assert a["message"]["content"] == b["message"]["content"]
    text = a["message"]["content"]
    cut = next(i for i in range(2, len(text)) if text[i] not in text[:i])  # a character not seen before
    stopped = chat(client, stream=False, options={**kw["options"], "stop": [text[cut]]}).json()
    assert stopped["message"]["content"] == text[:cut] and stopped["done_reason"] == "stop"
    unlimited = chat(client, stream=False, options={"num_predict": -1, "temperature": 0}).json()
    assert unlimited["eval_count"] <= 64  # the server's --max-tokens caps "no limit"


def test_performance_options_are_accepted_without_effect(client):
    base = chat(client, stream=False).json()["message"]["content"]
    perf = {"num_thread": 4, "num_gpu": 99, "num_batch": 8, "main_gpu": 0, "use_mmap": True, "use_mlock": False,
            "numa": False, "low_vram": True, "f16_kv": True, "logits_all": False, "num_keep": 4,
            "draft_num_predict": 2, "mirostat": 0, "mirostat_tau": 5.0, "tfs_z": 1.0, "typical_p": 1.0,
            "repeat_last_n": 64, "penalize_newline": True}
    r = chat(client, stream=False, options={"num_predict": 5, "temperature": 0, **perf}, keep_alive="5m",
             truncate=True, shift=False, think=False)  # think off on a model that does not think
    assert r.status_code == 200, r.text
    assert r.json()["message"]["content"] == base


def test_num_ctx_caps_the_context_of_one_request(client):
    r = chat(client, stream=False, options={"num_predict": 5, "num_ctx": 50})  # the prompt is ~20 tokens
    assert r.status_code == 200, r.text
    over = chat(client, stream=False, options={"num_predict": 40, "num_ctx": 50})
    assert over.status_code == 400 and "options.num_ctx" in over.json()["error"]
    assert "options.num_predict" in over.json()["error"]
    tiny = chat(client, stream=False, options={"num_ctx": 4})
    assert tiny.status_code == 400 and "does not fit the context of 4 tokens" in tiny.json()["error"]
    big = chat(client, stream=False, options={"num_ctx": 100_000})
    assert big.status_code == 400 and big.json() == {
        "error": "options.num_ctx 100000 exceeds the model's context of 512 tokens; send at most 512"}


def test_logprobs(client):
    body = chat(client, stream=False, logprobs=True, top_logprobs=2).json()
    lp = body["logprobs"]
    assert len(lp) == body["eval_count"] and all(len(e["top_logprobs"]) == 2 for e in lp)
    assert "".join(e["token"] for e in lp) == body["message"]["content"]
    chunks = lines(chat(client, logprobs=True))
    assert sum(len(c.get("logprobs", [])) for c in chunks) == chunks[-1]["eval_count"]


@pytest.mark.parametrize("fmt", ["json", UNIT])
def test_format_json_and_schema(client, fmt):
    body = chat(client, stream=False, format=fmt, options={"num_predict": 40, "temperature": 0}).json()
    value = json.loads(body["message"]["content"])
    assert isinstance(value, dict)
    if fmt is UNIT:
        jsonschema.validate(value, UNIT)


def test_an_empty_request_loads_and_keep_alive_0_is_refused(client):
    for path, body in (("/api/chat", {"messages": []}), ("/api/generate", {})):
        r = post(client, path, model="tiny-4bit", **body)
        assert r.status_code == 200 and r.json()["done"] is True and r.json()["done_reason"] == "load"
        r = post(client, path, model="tiny-4bit", keep_alive=0, **body)
        assert r.status_code == 400 and "keeps its one model loaded" in r.json()["error"]


def test_tool_messages_and_history(client):
    client.app_.state.context_length = 4096  # the fallback tool prompt outgrows the tiny model's 512
    try:
        call = {"function": {"name": "weather", "arguments": {"unit": "c"}}}
        history = [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
        for tool_msg in ({"role": "tool", "content": "21 degrees", "tool_name": "weather"},
                         {"role": "tool", "content": "21 degrees"}):  # no name: answers the call before it
            r = chat(client, stream=False, messages=history + [tool_msg], tools=TOOLS)
            assert r.status_code == 200, r.text
        r = chat(client, stream=False, messages=history + [{"role": "tool", "content": "x", "tool_name": "other"}])
        assert r.status_code == 400 and "messages[2].tool_name" in r.json()["error"]
        r = chat(client, stream=False, messages=[{"role": "tool", "content": "x"}])
        assert r.status_code == 400 and "messages[0].tool_name is required" in r.json()["error"]
    finally:
        client.app_.state.context_length = None


def test_tool_calls_and_errors_in_ollama_shape():
    """The wire format of a call (arguments as an object) and of an error after a stream started."""
    s = Shapes("m:latest", "chat", 0.0, False)
    (line,) = s.event(ToolCall(0, "call_ab12", "weather", '{"unit": "c"}'))
    msg = json.loads(line)["message"]
    assert msg["tool_calls"] == [{"id": "call_ab12", "function": {"index": 0, "name": "weather",
                                                                  "arguments": {"unit": "c"}}}]
    reply = Reply(tool_calls=[ToolCall(0, "call_1", "weather", '{"unit": "f"}')],
                  done=Done("tool_calls", Usage(10, 5)))
    body = s.whole(reply)
    assert body["done_reason"] == "stop" and body["message"]["tool_calls"][0]["function"]["arguments"] == {"unit": "f"}
    assert (body["prompt_eval_count"], body["eval_count"]) == (10, 5)
    (err,) = s.error(ServeError(500, "the model produced no valid tool call"))
    assert json.loads(err) == {"error": "the model produced no valid tool call"}


@pytest.mark.parametrize("path,extra,status,needle", [
    ("/api/chat", {"options": {"mirostat": 2}}, 400, "options.mirostat"),
    ("/api/chat", {"options": {"tfs_z": 0.5}}, 400, "options.tfs_z"),
    ("/api/chat", {"options": {"typical_p": 0.7}}, 400, "options.typical_p"),
    ("/api/chat", {"options": {"repeat_penalty": 1.2, "repeat_last_n": 33}}, 400, "options.repeat_last_n"),
    ("/api/chat", {"options": {"repeat_penalty": 1.2, "penalize_newline": False}}, 400, "options.penalize_newline"),
    ("/api/chat", {"options": {"repeat_penalty": 0.001}}, 400, "options.repeat_penalty"),
    ("/api/chat", {"options": {"num_predict": 0}}, 400, "options.num_predict"),
    ("/api/chat", {"options": {"vocab_only": True}}, 400, "options.vocab_only"),
    ("/api/chat", {"options": {"frobnicate": 1}}, 400, "options.frobnicate"),
    ("/api/chat", {"options": {"temperature": -1}}, 400, "options.temperature"),  # Ollama: 400, not 422
    ("/api/chat", {"options": {"num_predict": "8"}}, 400, "options.num_predict"),
    ("/api/chat", {"frobnicate": 1}, 400, "frobnicate"),
    ("/api/chat", {"think": "extreme"}, 400, "invalid think value"),
    ("/api/chat", {"think": True}, 400, "cannot be switched on"),  # not a reasoning model
    ("/api/chat", {"format": "xml"}, 400, "format"),
    ("/api/chat", {"format": {"type": "object", "required": 3}}, 400, "format is not a valid JSON Schema"),
    ("/api/chat", {"format": "json", "tools": TOOLS}, 400, "format cannot be combined with tools"),
    ("/api/chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 7}}}]}, 400,
     "tools[0].function.parameters"),
    ("/api/chat", {"keep_alive": "soon"}, 400, "keep_alive"),
    ("/api/chat", {"messages": [{"role": "user", "content": "hi", "images": ["aGk="]}]}, 400, "images"),
    ("/api/chat", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
    ("/api/chat", {"format": {}, "tools": TOOLS}, 400, "format cannot be combined with tools"),  # {}: a schema
    ("/api/chat", {"logprobs": True, "format": "json"}, 400, "logprobs"),
    ("/api/generate", {"prompt": "x", "template": "{{ .Prompt }}"}, 400, "template"),
    ("/api/generate", {"prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("/api/generate", {"prompt": "x", "context": [1, 2, 3]}, 400, "context"),
    ("/api/generate", {"prompt": "x", "images": ["aGk="]}, 400, "images"),
    ("/api/generate", {"prompt": "x", "raw": True, "system": "s"}, 400, "raw mode"),
    ("/api/generate", {"prompt": "x", "raw": True, "format": "json"}, 400, "raw mode"),
    ("/api/generate", {"prompt": "x", "width": 512}, 400, "image generation"),
])
def test_bad_input_is_an_ollama_error(client, path, extra, status, needle):
    body = {"model": "tiny-4bit", "options": {"num_predict": 5}, **({"messages": HI} if path == "/api/chat" else {}),
            **extra}
    r = post(client, path, **body)
    assert r.status_code == status, r.text
    assert list(r.json()) == ["error"] and isinstance(r.json()["error"], str)
    assert needle in r.json()["error"]


@pytest.mark.parametrize("method,path", [("POST", "/api/pull"), ("POST", "/api/push"), ("POST", "/api/create"),
                                         ("POST", "/api/copy"), ("DELETE", "/api/delete"), ("POST", "/api/embed"),
                                         ("POST", "/api/embeddings"), ("POST", "/api/blobs/sha256:ab")])
def test_model_management_is_a_clear_501(client, method, path):
    r = client.request(method, path, json={"model": "x"}, headers=AUTH)
    assert r.status_code == 501 and list(r.json()) == ["error"]
    assert "squish" in r.json()["error"]


def test_auth_errors_in_ollama_shape(client):
    r = client.get("/api/tags", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and list(r.json()) == ["error"]
    assert chat(client).status_code == 200
    assert client.post("/api/chat", json={"model": "tiny-4bit", "messages": HI}).status_code == 401


# ---- the reasoning fixture: think -> message.thinking ----------------------------------------

@pytest.fixture(scope="module")
def reasoner(tmp_path_factory):
    path = make_reasoning_model(tmp_path_factory.mktemp("reasoning") / "tiny-reasoner")
    app, engine = _serve(path, max_tokens=256)
    with TestClient(app) as c:
        assert engine.ready.wait(120), engine.load_error
        yield c


def ask(client, path="/api/chat", **kw):
    body = {"model": "tiny-reasoner", "options": {"num_predict": 64, "temperature": 0}, **kw}
    if path == "/api/chat":
        body.setdefault("messages", [{"role": "user", "content": "6 x 7?"}])
    else:
        body.setdefault("prompt", "6 x 7?")
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    return r


@pytest.mark.parametrize("think", [None, True, "high"])
def test_thinking_is_split_into_message_thinking(reasoner, think):
    extra = {} if think is None else {"think": think}
    msg = ask(reasoner, stream=False, **extra).json()["message"]
    assert (msg["thinking"], msg["content"]) == (THOUGHT, ANSWER)
    chunks = lines(ask(reasoner, **extra))
    assert "".join(c["message"].get("thinking", "") for c in chunks) == THOUGHT
    assert "".join(c["message"]["content"] for c in chunks) == ANSWER
    assert not any(c["message"].get("thinking") and c["message"]["content"] for c in chunks)


def test_think_false_switches_it_off(reasoner):
    msg = ask(reasoner, stream=False, think=False).json()["message"]
    assert msg["content"] == ANSWER and "thinking" not in msg
    chunks = lines(ask(reasoner, think=False))
    assert "".join(c["message"]["content"] for c in chunks) == ANSWER
    assert not any("thinking" in c["message"] for c in chunks)


def test_generate_splits_thinking_too(reasoner):
    body = ask(reasoner, "/api/generate", stream=False).json()
    assert (body["thinking"], body["response"]) == (THOUGHT, ANSWER)
    chunks = lines(ask(reasoner, "/api/generate"))
    assert "".join(c.get("thinking", "") for c in chunks) == THOUGHT
    assert "".join(c["response"] for c in chunks) == ANSWER


def test_json_format_starts_after_the_thinking(reasoner):
    msg = ask(reasoner, stream=False, format=UNIT).json()["message"]
    assert msg["thinking"] == THOUGHT
    jsonschema.validate(json.loads(msg["content"]), UNIT)
    show = reasoner.post("/api/show", json={"model": "tiny-reasoner"}).json()
    assert show["capabilities"] == ["completion", "tools", "thinking"]
    assert show["details"]["quantization_level"] == "F32"


def test_a_thinking_history_and_tool_round_trip(reasoner):
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": "", "thinking": "I should call it.",
                 "tool_calls": [{"function": {"name": "weather", "arguments": {"unit": "c"}}}]},
                {"role": "tool", "content": "21 degrees", "tool_name": "weather"}]
    msg = ask(reasoner, stream=False, messages=messages, tools=TOOLS).json()["message"]
    assert msg["content"] == ANSWER and msg["thinking"] == THOUGHT and "tool_calls" not in msg
