"""Prefix (prompt) KV-cache reuse across requests, bounded in bytes.

When a request finishes (or is cancelled), the engine stores its KV cache keyed
by the tokens it holds (prompt + completion). A new request whose prompt starts
with such a sequence gets a copy of that cache trimmed to the common prefix and
only prefills the rest. At least one prompt token is always left to prefill so
the model produces the first logits.

Entries are evicted least-recently-used first once their total size exceeds
``max_bytes``. Copies are cheap: MLX arrays are immutable, a trimmed copy is a
slice that shares the buffer until written, and entries are stored as
contiguous arrays so their byte count is exact.

Only the engine thread uses this class (see engine.py); it is not locked.
Only caches made entirely of plain ``KVCache`` layers are reused; other cache
types (rotating windows, recurrent state) cannot be trimmed to a prefix, so
for such models the cache stays empty.
"""

from __future__ import annotations

from collections import OrderedDict

MIN_REUSE_TOKENS = 8
AUTO_MIN_BYTES = 64 << 20
AUTO_RAM_FRACTION = 0.10


def auto_max_bytes(weight_bytes: int, total_ram: int) -> int:
    """The default bound: as many bytes as the model's weights, at least
    ``AUTO_MIN_BYTES``, at most ``AUTO_RAM_FRACTION`` of physical memory.

    KV bytes per token grow with the model (layers x KV heads x head size), so
    the number of tokens a weights-sized cache holds varies far less than a
    fixed bound's. Computed, not measured: SmolLM2-135M's INT4 weights are
    93.8 MiB and its float32 KV (CPU backend) 46 KB/token, ~2k tokens; a
    Llama-3-8B-shaped model's bf16 KV is 128 KB/token, so a 4k-token prompt is
    512 MB, more than the old fixed 256 MiB."""
    return int(max(AUTO_MIN_BYTES, min(weight_bytes, AUTO_RAM_FRACTION * total_ram)))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    # Compare in blocks first: Python list slices compare at C speed.
    step = 256
    while i + step <= n and a[i : i + step] == b[i : i + step]:
        i += step
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, tuple[list[int], list, int]] = OrderedDict()
        self._next_id = 0
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def reusable(cache: list) -> bool:
        from mlx_lm.models.cache import KVCache

        return bool(cache) and all(type(c) is KVCache for c in cache)

    def store(self, tokens: list[int], cache: list) -> None:
        if self.max_bytes <= 0 or not self.reusable(cache):
            return
        import mlx.core as mx
        from mlx_lm.models.cache import KVCache

        n = min(len(tokens), cache[0].offset)
        if n < MIN_REUSE_TOKENS:
            return
        tokens = list(tokens[:n])
        # Drop entries this one supersedes (a prefix of it) or duplicates.
        for eid, (toks, _, size) in list(self._entries.items()):
            if len(toks) <= n and tokens[: len(toks)] == toks:
                del self._entries[eid]
                self.nbytes -= size
        layers = []
        for c in cache:
            copy = KVCache()
            copy.keys = mx.contiguous(c.keys[..., :n, :])
            copy.values = mx.contiguous(c.values[..., :n, :])
            copy.offset = n
            layers.append(copy)
        mx.eval([(c.keys, c.values) for c in layers])
        size = sum(c.nbytes for c in layers)
        if size > self.max_bytes:
            return
        self._entries[self._next_id] = (tokens, layers, size)
        self._next_id += 1
        self.nbytes += size
        while self.nbytes > self.max_bytes and self._entries:
            _, (_, _, old) = self._entries.popitem(last=False)
            self.nbytes -= old

    def lookup(self, prompt: list[int]) -> tuple[list | None, int]:
        """(cache copy trimmed to the reused prefix, reused token count)."""
        best, best_n = None, 0
        limit = len(prompt) - 1
        for eid, (toks, _, _) in self._entries.items():
            n = min(_common_prefix(toks, prompt), limit)
            if n > best_n:
                best, best_n = eid, n
        if best is None or best_n < MIN_REUSE_TOKENS:
            self.misses += 1
            return None, 0
        from mlx_lm.models.cache import KVCache

        self._entries.move_to_end(best)
        _, layers, _ = self._entries[best]
        out = []
        for c in layers:
            copy = KVCache()
            copy.keys = c.keys[..., :best_n, :]
            copy.values = c.values[..., :best_n, :]
            copy.offset = best_n
            out.append(copy)
        self.hits += 1
        return out, best_n
