"""End to end across ranks: `squish serve --hosts 127.0.0.1,127.0.0.1[,127.0.0.1]` (MLX's
ring backend over loopback, every rank started by mlx.launch) answers exactly as one
process does, through the official `openai` client, and fails cleanly when a rank dies
or stops answering.

Two clusters, each started once: the tiny random model (4 heads, 2 KV heads) on 2 ranks,
the real SmolLM2 artifact (9 heads, 3 KV heads) on 3. Three MLX processes on 2 cores
are slow (every token crosses the ring dozens of times), so the requests are short.
The last test of each cluster kills or stops one of its ranks: keep them last."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serving import Server  # noqa: E402
from tiny import make_tiny_artifact  # noqa: E402

START_S = 300  # a cluster's start-up on 2 loaded cores: three interpreters import MLX, mlx_lm, FastAPI
# pytest-timeout counts fixture set-up: any test here may be the one that starts a cluster
# (and the first SmolLM2 test may also build the artifact: conftest.BUILD_TIMEOUT_S).
CLUSTER_TEST_S = START_S + 240
# SmolLM2 on 3 ranks: ~60 collectives per token over loopback. Measured on the 2-core test
# machine under heavy load (load average ~18): ~6.5 s per token, and mlx_lm's own
# sharded_load + stream_generate was no faster (~8 s per token). The tool call is ~36 tokens.
REQUEST_S = 900
SMOL_TEST_S = CLUSTER_TEST_S + 900 + 2 * REQUEST_S  # + building the artifact when this test is first


class Cluster(Server):
    """A `squish serve --hosts ...` supervisor; ``rank_pid`` finds a rank's process."""

    def __init__(self, artifact: Path, hosts: str, *extra: str, timeout: float = REQUEST_S):
        super().__init__(artifact, "--hosts", hosts, "--rate-limit", "0", *extra, ready_s=START_S, timeout=timeout)

    def rank_pid(self, rank: int) -> int:
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if p.environ().get("MLX_RANK") == str(rank) and "squish" in p.cmdline():
                    return p.pid
            except psutil.Error:
                continue
        raise AssertionError(f"no rank {rank} process")

    def processes(self) -> list[int]:
        try:
            return [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []


def _ask(server, **kw):
    r = server.client(timeout=REQUEST_S).chat.completions.create(model="default", **kw)
    ch = r.choices[0]
    lps = [(t.token, round(t.logprob, 4)) for t in ch.logprobs.content] if ch.logprobs else None
    calls = [(c.function.name, c.function.arguments) for c in ch.message.tool_calls or ()]
    return ch.message.content, ch.finish_reason, calls, lps, r.usage.completion_tokens


def _stream(server, **kw) -> str:
    chunks = server.client(timeout=REQUEST_S).chat.completions.create(model="default", stream=True, **kw)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def _fails_cleanly(cluster: Cluster, rank: int, how: signal.Signals, *, within: float) -> None:
    """Kill or stop ``rank`` while a request streams: /health says 503 naming it within
    ``within`` seconds, the request ends with an error, every process ends."""
    outcome: dict = {}

    def long_request():
        try:
            for _ in cluster.client(timeout=REQUEST_S).chat.completions.create(
                    model="default", stream=True, max_tokens=400, temperature=0.9, seed=1,
                    # token 2 ends a turn in both models (<|im_end|>): never sampled, so the
                    # stream cannot finish before the rank is stopped
                    logit_bias={"2": -100},
                    messages=[{"role": "user", "content": "Write a long story."}]):
                outcome.setdefault("streaming", True)
            outcome["error"] = None
        except openai.APIError as exc:
            outcome["error"] = exc

    t = threading.Thread(target=long_request)
    t.start()
    deadline = time.monotonic() + REQUEST_S
    while not outcome and time.monotonic() < deadline:
        time.sleep(0.1)
    assert outcome.get("streaming"), outcome
    os.kill(cluster.rank_pid(rank), how)
    t0 = time.monotonic()
    while True:
        h = httpx.get(cluster.url + "/health", timeout=5)
        if h.status_code == 503:
            break
        assert time.monotonic() - t0 < within, h.text
        time.sleep(0.2)
    body = h.json()
    assert f"rank {rank} (127.0.0.1)" in body["error"]
    # The first failure is the one reported; mlx.launch then stops the other ranks too.
    assert body["ranks"][0]["up"] and not body["ranks"][rank]["up"]
    t.join(120)
    assert outcome["error"] is not None and f"rank {rank}" in str(outcome["error"])
    assert cluster.proc.wait(90) == 2  # rank 0 reports for a while, then everything stops
    assert not cluster.processes()
    out = cluster.output()
    assert "Traceback" not in out and f"rank {rank} (127.0.0.1)" in out


# ---- the tiny model on 2 ranks --------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_artifact(tmp_path_factory.mktemp("dist") / "tiny-4bit")


@pytest.fixture(scope="module")
def tiny_single(tiny):
    s = Server(tiny, "--rate-limit", "0")
    yield s
    s.stop()
    s.cleanup()


@pytest.fixture(scope="module")
def tiny_pair(tiny):
    s = Cluster(tiny, "127.0.0.1,127.0.0.1")
    yield s
    if s.proc.poll() is None:
        s.stop()
    s.cleanup()


LONG = "Tell me about " + "apples and bananas " * 6
TINY_REQUESTS = [  # what must be identical on every rank: inserts, samplers, processors, prefix hits
    dict(messages=[{"role": "user", "content": "Hello"}], max_tokens=10, temperature=0),
    dict(messages=[{"role": "user", "content": "Hi there"}], max_tokens=12, temperature=0.8, seed=7, top_p=0.9),
    dict(messages=[{"role": "user", "content": LONG}], max_tokens=8, temperature=0, logprobs=True, top_logprobs=2),
    dict(messages=[{"role": "user", "content": "Count"}], max_tokens=9, temperature=1.0, seed=3,
         presence_penalty=0.5, logit_bias={"5": 3}),
]


@pytest.mark.timeout(CLUSTER_TEST_S)
def test_two_ranks_answer_as_one_process_does(tiny_single, tiny_pair):
    def run(server):
        with cf.ThreadPoolExecutor(len(TINY_REQUESTS)) as pool:  # batched together
            out = list(pool.map(lambda kw: _ask(server, **kw), TINY_REQUESTS))
        reused = server.client().chat.completions.create(model="default", **TINY_REQUESTS[2])
        return out, reused.usage.prompt_tokens_details.cached_tokens, _stream(server, **TINY_REQUESTS[0])

    assert run(tiny_pair) == run(tiny_single)
    health = httpx.get(tiny_pair.url + "/health").json()
    assert health["parallel"] == "tensor" and [r["up"] for r in health["ranks"]] == [True, True]
    metrics = tiny_pair.metrics()
    for rank in (0, 1):
        assert f'squish_rank_mlx_memory_bytes{{kind="peak",rank="{rank}"}}' in metrics


@pytest.mark.timeout(CLUSTER_TEST_S)
def test_a_cancelled_stream_leaves_the_ranks_in_step(tiny_single, tiny_pair):
    chunks = tiny_pair.client().chat.completions.create(
        model="default", stream=True, max_tokens=200, temperature=0,
        messages=[{"role": "user", "content": "Go on and on"}])
    for i, _ in enumerate(chunks):
        if i == 3:
            break
    chunks.close()  # the client leaves: rank 0 cancels, every rank removes the sequence
    ask = dict(messages=[{"role": "user", "content": "Go on and on"}], max_tokens=6, temperature=0)
    assert _ask(tiny_pair, **ask) == _ask(tiny_single, **ask)
    tiny_pair.healthy()


@pytest.mark.timeout(CLUSTER_TEST_S)
def test_a_rank_that_stops_answering_is_reported_and_everything_stops(tiny_pair):
    _fails_cleanly(tiny_pair, 1, signal.SIGSTOP, within=15)


# ---- SmolLM2 on 3 ranks ---------------------------------------------------------------------
FRUITS = [{"role": "user", "content": "List three fruits."}]
ADD = {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def smol_single(smollm2_artifact):
    s = Server(smollm2_artifact, "--rate-limit", "0", timeout=REQUEST_S)
    yield s
    s.stop()
    s.cleanup()


@pytest.fixture(scope="module")
def smol_trio(smollm2_artifact):
    s = Cluster(smollm2_artifact, "127.0.0.1,127.0.0.1,127.0.0.1")
    yield s
    if s.proc.poll() is None:
        s.stop()
    s.cleanup()


@pytest.mark.timeout(SMOL_TEST_S)
def test_smollm2_on_three_ranks_answers_as_one_process_does(smol_single, smol_trio):
    tool = dict(messages=[{"role": "user", "content": "What is 17 plus 25?"}], tools=[ADD],
                tool_choice={"type": "function", "function": {"name": "add"}}, parallel_tool_calls=False,
                max_tokens=40, temperature=0)  # the call is ~36 tokens
    plain = dict(messages=FRUITS, max_tokens=8, temperature=0)
    trio = (_ask(smol_trio, **plain), _stream(smol_trio, **plain), _ask(smol_trio, **tool))
    assert trio == (_ask(smol_single, **plain), _stream(smol_single, **plain), _ask(smol_single, **tool))
    content, finish, calls, _, _ = trio[2]
    assert finish == "tool_calls" and calls[0][0] == "add"
    assert set(json.loads(calls[0][1])) == {"a", "b"}
    assert httpx.get(smol_trio.url + "/health").json()["ranks"][2]["up"]


@pytest.mark.timeout(CLUSTER_TEST_S + REQUEST_S)
def test_killing_a_rank_is_reported_and_everything_stops(smol_trio):
    _fails_cleanly(smol_trio, 2, signal.SIGKILL, within=5)
