"""The ranks of a server that spans several machines: who they are, how they talk, how
they start.

``ClusterSpec`` is what the CLI tells every rank (the environment variable
``SQUISH_CLUSTER``). ``Comm`` is every exchange between the ranks, all of it through
MLX's collectives (``all_sum``, ``all_gather``) on the MLX group the launcher formed:
rank 0's broadcasts, the ranks' start-up reports, the sampled tokens. The start-up steps
every rank runs in the same order: ``init_group`` (MLX's backend, with a watchdog),
``agree`` (every rank holds the same artifact), ``load_rank`` (its share of the model,
cut by mlx_lm: ``squish.runtime.sharding``) and ``pipeline_prefix`` (a prefix-cache bound
every rank can keep alike). Each step ends with a collective that tells every rank how
every other one fared, so a refusal names the rank and its host on all of them.

Everything here runs on the one thread that drives MLX on its rank.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from squish.errors import InputError, SquishError, SystemFailure
from squish.runtime import sharding

ENV = "SQUISH_CLUSTER"
INIT_S = 60.0  # MLX's backend may take this long to connect ranks that all joined
HEAD_BYTES = 1024  # a broadcast's first collective carries this much (longer ones take a second)
RECORD_BYTES = 1024  # one rank's start-up report


@dataclass(frozen=True)
class ClusterSpec:
    """What every rank is told by the CLI (environment variable ``SQUISH_CLUSTER``)."""

    hosts: list  # a display name per rank
    leader: str  # rank 0's address, for the health channel
    health_port: int
    token: str  # a random secret: connections that do not present it are refused
    backend: str

    def to_env(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_env(cls) -> "ClusterSpec | None":
        raw = os.environ.get(ENV)
        return cls(**json.loads(raw)) if raw else None

    def name(self, rank: int) -> str:
        return f"rank {rank} ({self.hosts[rank]})"


def fingerprint(path: Path) -> str:
    """What the ranks compare: the manifest (which lists every file's sha256), or for a
    plain mlx_lm folder its config and the sizes of its weight files."""
    h = hashlib.sha256()
    manifest = path / "squish.json"
    if manifest.is_file():
        h.update(manifest.read_bytes())
    else:
        h.update((path / "config.json").read_bytes())
        for f in sorted(path.glob("*.safetensors")):
            h.update(f"{f.name}:{f.stat().st_size};".encode())
    return h.hexdigest()


class Comm:
    """The ranks' collectives: rank 0's broadcasts, start-up reports, sampled tokens."""

    def __init__(self, group):
        self.group, self.rank, self.size = group, group.rank(), group.size()
        self.stream = None  # the generator's stream once it exists: one stream, one order
        self._last = None  # the previous token collective (the chain)

    def _all_sum(self, data):
        import mlx.core as mx
        import numpy as np

        out = mx.distributed.all_sum(mx.array(data), group=self.group, stream=self.stream or mx.cpu)
        return np.array(out)

    def broadcast(self, obj=None):
        """Rank 0's ``obj`` (JSON) on every rank; the others pass nothing."""
        import numpy as np

        data = json.dumps(obj, separators=(",", ":")).encode() if self.rank == 0 else b""
        head = np.zeros(HEAD_BYTES, np.uint8)
        if self.rank == 0:
            head[:8] = np.frombuffer(len(data).to_bytes(8, "little"), np.uint8)
            first = data[: HEAD_BYTES - 8]
            head[8:8 + len(first)] = np.frombuffer(first, np.uint8)
        head = self._all_sum(head)
        length = int.from_bytes(head[:8].tobytes(), "little")
        body = head[8:8 + min(length, HEAD_BYTES - 8)].tobytes()
        if length > HEAD_BYTES - 8:
            rest = np.zeros(length - (HEAD_BYTES - 8), np.uint8)
            if self.rank == 0:
                rest[:] = np.frombuffer(data[HEAD_BYTES - 8:], np.uint8)
            body += self._all_sum(rest).tobytes()
        return obj if self.rank == 0 else json.loads(body)

    def gather(self, record: dict) -> list[dict]:
        """Every rank's ``record`` (JSON, at most ``RECORD_BYTES``), in rank order."""
        import mlx.core as mx
        import numpy as np

        raw = json.dumps(record, separators=(",", ":")).encode()[:RECORD_BYTES]
        buf = np.zeros(RECORD_BYTES, np.uint8)
        buf[:len(raw)] = np.frombuffer(raw, np.uint8)
        out = np.array(mx.distributed.all_gather(mx.array(buf), group=self.group, stream=mx.cpu))
        return [json.loads(out[i * RECORD_BYTES:(i + 1) * RECORD_BYTES].tobytes().rstrip(b"\0") or b"{}")
                for i in range(self.size)]

    # ---- sampled tokens: rank 0 adds the token, the others add zero -----------------------
    def _share(self, tokens):
        import mlx.core as mx

        tokens = tokens.astype(mx.uint32)
        if self._last is not None:
            tokens = mx.depends(tokens, self._last)  # keep every rank's collectives in one order
        self._last = mx.distributed.all_sum(tokens, group=self.group)
        return self._last

    def leader_sampler(self, sampler: Callable) -> Callable:
        return lambda logprobs: self._share(sampler(logprobs))

    def follower_sampler(self) -> Callable:
        import mlx.core as mx

        return lambda logprobs: self._share(mx.depends(mx.zeros((logprobs.shape[0],), mx.uint32), logprobs))


def init_group(spec: ClusterSpec, on_timeout: Callable[[str], None]):
    """``mx.distributed.init`` with a watchdog: MLX waits on an unreachable peer for a long time."""
    import mlx.core as mx

    why = (f"MLX's {spec.backend} backend did not connect the {len(spec.hosts)} ranks within {INIT_S:g} s, "
           "although every rank started: the ranks' ports must be reachable between the hosts "
           "(docs/distributed.md, 'Ports')")
    timer = threading.Timer(INIT_S, on_timeout, args=(why,))
    timer.daemon = True
    timer.start()
    try:
        group = mx.distributed.init(strict=True, backend=spec.backend)
    finally:
        timer.cancel()
    if group.size() != len(spec.hosts):
        raise SystemFailure(f"MLX formed a group of {group.size()} ranks, expected {len(spec.hosts)}")
    return group


def _refuse(problems: list[str], what: str, exc_type=InputError) -> None:
    if problems:
        raise exc_type(f"{what}: " + "; ".join(problems))


def agree(comm: Comm, spec: ClusterSpec, model: str, resolve: Callable[[str], Path]) -> Path:
    """Every rank finds the model on its own disk and checks its files (sizes, headers);
    the ranks compare fingerprints. A rank that differs or lacks it is named."""
    from squish.artifact import check_files, read_manifest

    try:
        path = resolve(model)
        check_files(path, read_manifest(path))
        rec = {"fp": fingerprint(path), "path": str(path)}
    except (SquishError, OSError) as exc:
        rec = {"error": str(exc)[:RECORD_BYTES - 64]}
    recs = comm.gather(rec)
    problems = [f"{spec.name(r)}: {x['error']}" for r, x in enumerate(recs) if "error" in x]
    _refuse(problems, "a rank cannot open the model")
    ref = recs[0]["fp"]
    _refuse([f"{spec.name(r)} holds a different artifact at {x['path']} (fingerprint {x['fp'][:12]}, "
             f"rank 0 has {ref[:12]}); copy the same artifact to every host"
             for r, x in enumerate(recs) if x["fp"] != ref], "the ranks do not hold the same model")
    return path


def load_rank(comm: Comm, spec: ClusterSpec, path: Path):
    """This rank's share of the model (mlx_lm's own split), then a report from every rank."""
    from squish.runtime.loader import load_artifact

    config = json.loads((path / "config.json").read_text())
    mode = sharding.plan(config, comm.size)
    info, rec = None, {}
    try:
        info = load_artifact(path, shard=lambda m: sharding.shard_model(m, comm.group, mode))
    except SquishError as exc:
        rec = {"error": str(exc)[:RECORD_BYTES - 64], "input": isinstance(exc, InputError)}
    except Exception as exc:  # noqa: BLE001 - reported by every rank, by name
        rec = {"error": f"{type(exc).__name__}: {exc}"[:RECORD_BYTES - 64]}
    recs = comm.gather(rec)
    problems = [f"{spec.name(r)}: {x['error']}" for r, x in enumerate(recs) if "error" in x]
    kind = InputError if all(x.get("input") for x in recs if "error" in x) else SystemFailure
    _refuse(problems, "a rank failed to load its share of the model", kind)
    return info, mode


def pipeline_prefix(comm: Comm, model, mode: str, max_bytes: int | None) -> int | None:
    """The prefix cache's bound per layer in pipeline mode (None in tensor mode).

    Every rank's prefix cache must keep and evict the same entries. Tensor-parallel
    ranks hold the same shapes, so rank 0's byte bound works everywhere. Pipeline ranks
    hold different numbers of layers: each gets ``per_layer * its layers`` bytes, and
    since every layer's cache costs the same per token, every rank then decides alike.
    If any rank's caches are not plain KV caches (recurrent or windowed layers), no
    rank keeps prefixes (0)."""
    if mode != sharding.PIPELINE:
        return None
    from mlx_lm.models.cache import make_prompt_cache

    from squish.runtime.prompt_cache import PrefixCache

    recs = comm.gather({"plain": PrefixCache.reusable(make_prompt_cache(model)), "layers": len(model.layers)})
    if not all(r["plain"] for r in recs) or not max_bytes:
        return 0
    return max_bytes // recs[0]["layers"]
