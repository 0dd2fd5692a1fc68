"""The timed SSE client of the baseline benchmark, against a mock transport (no server)."""

import json
import sys
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.baseline.streaming import chat_body, stream_chat  # noqa: E402


def sse(*events):
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


def chunk(text=None, finish=None):
    delta = {"content": text} if text is not None else {}
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def client(body: str, status=200):
    def handler(request):
        assert json.loads(request.content)["stream_options"] == {"include_usage": True}
        return httpx.Response(status, text=body, headers={"content-type": "text/event-stream"})
    return httpx.Client(transport=httpx.MockTransport(handler))


def test_tokens_come_from_usage_not_chunks():
    # two chunks carrying five tokens: the usage field is the truth
    body = sse(chunk(""), chunk("Hello, wor"), chunk("ld!", "length"),
               {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 5}})
    r = stream_chat(client(body), "http://x", chat_body("m", "hi", 5))
    assert (r.completion_tokens, r.prompt_tokens, r.tokens_from) == (5, 12, "usage")
    assert r.text == "Hello, world!" and r.finish_reason == "length"
    assert r.ttft is not None and r.ttft <= r.total and len(r.chunk_gaps) == 1
    assert r.itl == pytest.approx(r.decode_s / 4)


def test_without_usage_the_tokenizer_counts():
    body = sse(chunk("a b c"), chunk(" d", "stop"))
    r = stream_chat(client(body), "http://x", chat_body("m", "hi", 5), count_tokens=lambda t: len(t.split()))
    assert (r.completion_tokens, r.tokens_from) == (4, "tokenizer")


def test_without_usage_or_tokenizer_it_refuses_to_guess():
    with pytest.raises(RuntimeError, match="no usage"):
        stream_chat(client(sse(chunk("a", "stop"))), "http://x", chat_body("m", "hi", 5))


def test_http_error_is_raised_with_status():
    with pytest.raises(RuntimeError, match="HTTP 429"):
        stream_chat(client('{"error": "slow down"}', status=429), "http://x", chat_body("m", "hi", 5))


def test_request_is_greedy_streaming_without_seed():
    b = chat_body("m", "hi", 7)
    assert b["temperature"] == 0.0 and b["stream"] and b["max_tokens"] == 7 and "seed" not in b
