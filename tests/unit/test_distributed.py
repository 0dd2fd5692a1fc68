"""Serving across machines, the parts that need no second process: the sharding plan
and its refusals, the host list, the ranks' artifact agreement, the health channel."""

from __future__ import annotations

import argparse
import json
import socket
import time

import pytest

from squish.cli import cluster
from squish.errors import InputError
from squish.runtime import liveness, sharding
from squish.runtime.ranks import ClusterSpec, agree

SMOLLM2 = {"model_type": "llama", "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
           "intermediate_size": 1536, "num_hidden_layers": 30, "quantization": {"group_size": 64, "bits": 4}}
LLAMA = sharding.Capabilities("llama", tensor=True, pipeline=False, layers=30)


# ---- the plan ------------------------------------------------------------------------------
def test_smollm2_splits_over_3_ranks_and_is_refused_over_2_naming_why_and_what_works():
    assert sharding.plan(SMOLLM2, 3, LLAMA) == "tensor"
    with pytest.raises(InputError) as e:
        sharding.plan(SMOLLM2, 2, LLAMA)
    msg = str(e.value)
    assert "9 attention heads do not divide by 2" in msg and "3 KV heads" in msg
    assert "no pipeline split" in msg and "rank counts that work: 3 (or 1" in msg


def test_quantization_groups_must_not_be_cut():
    tiny = {**SMOLLM2, "hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4,
            "intermediate_size": 256}
    assert sharding.plan(tiny, 2, LLAMA) == "tensor"
    with pytest.raises(InputError, match=r"\(32 columns\) is not a whole number of 64-wide quantization groups.*"
                                          r"rank counts that work: 2 "):
        sharding.plan(tiny, 4, LLAMA)


def test_pipeline_when_tensor_parallelism_cannot_and_refusal_when_neither_exists():
    qwen = {**SMOLLM2, "model_type": "qwen2", "num_attention_heads": 12, "num_key_value_heads": 2,
            "hidden_size": 768}
    both = sharding.Capabilities("qwen2", tensor=True, pipeline=True, layers=24)
    assert sharding.plan(qwen, 2, both) == "tensor"
    assert sharding.plan(qwen, 3, both) == "pipeline"  # 2 KV heads cannot be cut in 3
    with pytest.raises(InputError, match="pipeline: 25 ranks for 24 layers"):
        sharding.plan(qwen, 25, both)
    neither = sharding.Capabilities("gpt2", tensor=False, pipeline=False, layers=12)
    with pytest.raises(InputError, match="defines neither tensor-parallel `shard` nor pipeline"):
        sharding.plan(SMOLLM2, 2, neither)


def test_capabilities_come_from_mlx_lms_own_classes():
    caps = sharding.capabilities({**SMOLLM2, "vocab_size": 512, "rms_norm_eps": 1e-5})
    assert (caps.tensor, caps.pipeline, caps.layers) == (True, False, 30)
    qwen = sharding.capabilities({**SMOLLM2, "model_type": "qwen2", "vocab_size": 512, "rms_norm_eps": 1e-5})
    assert qwen.tensor and qwen.pipeline


# ---- the hosts -----------------------------------------------------------------------------
def _args(hosts=None, hostfile=None, backend=None):
    return argparse.Namespace(hosts=hosts, hostfile=hostfile, backend=backend)


def test_a_host_listed_twice_runs_two_ranks():
    hosts, backend = cluster.read_hosts(_args("127.0.0.1,127.0.0.1,127.0.0.1"))
    assert [h.ip for h in hosts] == ["127.0.0.1"] * 3 and backend == "ring"


@pytest.mark.parametrize("hosts, message", [
    ("127.0.0.1", "one rank"),
    ("127.0.0.1,,127.0.0.1", "empty host name"),
    ("127.0.0.1,macmini.local", "macmini.local: MLX's ring backend connects the ranks by IP"),
    ("192.0.2.1,127.0.0.1", "192.0.2.1: rank 0 .* must be this machine"),
])
def test_bad_host_lists_are_refused_naming_the_host(hosts, message):
    with pytest.raises(InputError, match=message):
        cluster.read_hosts(_args(hosts))


def test_jaccl_needs_a_hostfile_with_rdma_devices(tmp_path):
    with pytest.raises(InputError, match="--backend jaccl needs --hostfile"):
        cluster.read_hosts(_args("127.0.0.1,127.0.0.1", backend="jaccl"))
    hf = tmp_path / "hosts.json"
    hf.write_text(json.dumps({"backend": "jaccl", "hosts": [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]},
                                                            {"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}]}))
    with pytest.raises(InputError, match="\"rdma\" list"):
        cluster.read_hosts(_args(hostfile=hf))
    hf.write_text(json.dumps([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}, {"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}]))
    hosts, backend = cluster.read_hosts(_args(hostfile=hf))
    assert len(hosts) == 2 and backend == "ring"


def test_ports_skip_a_busy_block_unless_one_was_asked_for():
    hosts, _ = cluster.read_hosts(_args("127.0.0.1,127.0.0.1"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        with pytest.raises(InputError, match=f"--dist-port {busy}: port {busy} is in use"):
            cluster.choose_ports(hosts, busy)
        with pytest.raises(InputError, match=f"port {busy} is in use"):
            cluster.choose_ports(hosts, busy - 2)
    base = cluster.choose_ports(hosts, None)
    assert base >= cluster.DEFAULT_PORT


# ---- the ranks agree on the artifact ---------------------------------------------------------
class FakeComm:
    """Stands in for MLX's all_gather: the other ranks' records are given."""

    def __init__(self, others):
        self.others = others

    def gather(self, record):
        return [record, *self.others]


def test_a_rank_with_another_artifact_or_none_is_named(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tiny import make_tiny_artifact

    art = make_tiny_artifact(tmp_path / "tiny-4bit")
    spec = ClusterSpec(["127.0.0.1", "studio.local"], "127.0.0.1", 1, "t", "ring")
    assert agree(FakeComm([{"fp": _fp(art), "path": "/x"}]), spec, str(art), Path) == art
    with pytest.raises(InputError, match=r"rank 1 \(studio.local\) holds a different artifact at /x"):
        agree(FakeComm([{"fp": "0" * 64, "path": "/x"}]), spec, str(art), Path)
    with pytest.raises(InputError, match=r"rank 1 \(studio.local\): /x: no such model folder"):
        agree(FakeComm([{"error": "/x: no such model folder"}]), spec, str(art), Path)


def _fp(path):
    from squish.runtime.ranks import fingerprint

    return fingerprint(path)


# ---- the health channel ----------------------------------------------------------------------
@pytest.fixture
def monitor():
    failures: list[str] = []
    beats: list[tuple[int, dict]] = []
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    m = liveness.Monitor("127.0.0.1", port, "tok", ["127.0.0.1", "127.0.0.1", "127.0.0.1"],
                         on_failure=lambda r, msg: failures.append(msg), on_beat=lambda r, b: beats.append((r, b)),
                         timeout=1.0, load_timeout=1.0)
    m.start()
    m.failures, m.beats, m.port = failures, beats, port
    yield m
    m.close()


def _wait(cond, seconds=5.0):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


def _beacon(monitor, rank, lost=None, token="tok"):
    b = liveness.Beacon("127.0.0.1", monitor.port, token, rank, stats=lambda: {"phase": "ready", "active": 1,
                                                                              "peak": 2, "cache": 3},
                        on_lost=(lost or (lambda why: None)))
    b.connect(time.monotonic() + 5)
    b.start()
    return b


def test_ranks_join_and_report_memory_and_a_dead_one_is_named_at_once(monitor):
    b1 = _beacon(monitor, 1)
    assert monitor.wait_for_workers(time.monotonic() + 0.5) == [2]  # rank 2 never came
    _beacon(monitor, 2)
    assert monitor.wait_for_workers(time.monotonic() + 5) == []
    assert _wait(lambda: {r for r, _ in monitor.beats} == {1, 2})
    assert monitor.beats[-1][1]["peak"] == 2
    t0 = time.monotonic()
    b1._sock.close()  # the process is gone: its connection closes
    assert _wait(lambda: monitor.failures, 2.0)
    assert time.monotonic() - t0 < 1.0
    assert monitor.failures == ["rank 1 (127.0.0.1) exited or closed its connection (the process is gone)"]
    rows = {r["rank"]: r for r in monitor.status()}
    assert not rows[1]["up"] and rows[2]["up"] and rows[0]["up"]


def test_a_rank_that_stops_answering_is_named_after_the_timeout(monitor):
    with socket.create_connection(("127.0.0.1", monitor.port)) as s:
        s.sendall(b'{"rank": 2, "token": "tok"}\n')  # joins, then says nothing more
        assert monitor.wait_for_workers(time.monotonic() + 0.3) == [1]
        assert _wait(lambda: monitor.failures, 4.0)
    assert monitor.failures == ["rank 2 (127.0.0.1) stopped answering (no heartbeat for 1 s)"]


def test_strangers_are_refused_and_an_orderly_stop_is_no_failure(monitor):
    _beacon(monitor, 1, token="wrong")
    assert monitor.wait_for_workers(time.monotonic() + 0.5) == [1, 2]
    b1, b2 = _beacon(monitor, 1), _beacon(monitor, 2)
    assert monitor.wait_for_workers(time.monotonic() + 5) == []
    monitor.stopping()
    b1.quiet(), b2.quiet()
    b1._sock.close(), b2._sock.close()
    assert monitor.wait_closed(3.0)
    assert monitor.failures == []


@pytest.mark.parametrize("rank0, why", [("closes", "rank 0 closed the health channel"),
                                         ("hangs", "rank 0 stopped answering (no reply for 1 s)")])
def test_a_worker_notices_when_rank_0_goes_away(rank0, why):
    lost: list[str] = []
    with socket.create_server(("127.0.0.1", 0)) as server:
        b = liveness.Beacon("127.0.0.1", server.getsockname()[1], "tok", 1, stats=dict, on_lost=lost.append,
                            timeout=1.0, load_timeout=1.0)
        b.connect(time.monotonic() + 5)
        conn, _ = server.accept()
        with conn:
            assert json.loads(conn.makefile().readline())["rank"] == 1
            b.start()
            if rank0 == "closes":
                conn.close()
            assert _wait(lambda: lost, 4.0)
    assert lost[0].startswith(why)
