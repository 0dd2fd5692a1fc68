"""Prefix (prompt) KV-cache reuse across requests: a radix tree of token runs, bounded in bytes.

When a request finishes (or is cancelled), the engine stores its KV cache keyed by
the tokens it holds (prompt + completion). A new request whose prompt starts with
stored tokens gets a cache made of them and only prefills the rest. At least one
prompt token is always left to prefill so the model produces the first logits.

Layout. Entries share their common prefixes: the tree's nodes are runs of tokens,
each holding the keys and values of its run for every layer (contiguous arrays of
exactly the run's length, so byte counts are exact). Four agents that share a
1,000-token system prompt and tool list hold it once, not four times, and a turn
that extends a conversation adds only its new tokens. A lookup walks the tree as
far as the prompt matches and concatenates the runs on the way (a single run is
returned as a slice, without a copy). A run is split when a later sequence leaves
it in the middle (both halves are copied, so the old buffer is freed at once).

Eviction. Past ``max_bytes`` the least recently used *leaf* run goes first (a run
inside the tree is shared by everything below it, so it outlives them). Before
any of those, the tails that can no longer be hit: a stored sequence whose
conversation was continued with a different rendering of its reply. Agent loops
do that all the time: the client re-serializes the tool-call arguments the model
wrote (other spacing, other key order), a thinking model's template drops the
reasoning it generated, a client trims or edits a reply. The new prompt then
contains the whole stored *prompt* and leaves the stored sequence inside what the
model *generated*: that generated tail will never be sent again, and it is marked
stale. A prompt that leaves a stored sequence inside its prompt (sub-agents
forking from a shared system prompt) marks nothing: both branches stay live.
Where each stored sequence's prompt ended is taken from ``lookup``, which the
engine calls with every prompt before it runs it.

Determinism. Every decision depends only on the token sequences passed in, their
order, and byte counts proportional to token counts, never on wall time: a
distributed follower that replays the same ``lookup`` / ``store`` calls keeps and
evicts exactly what rank 0 does.

Only the engine thread uses this class (see engine.py); it is not locked. Only
caches made entirely of plain ``KVCache`` layers, or entirely of quantized ones
(``squish serve --kv-bits``, ``kv_cache.QuantizedKV``: each key and value is then a
(data, scales, biases) triple, cut along the same token axis), are reused; other
cache types (rotating windows, recurrent state) cannot be cut to a prefix, so for
such models the cache stays empty.
"""

from __future__ import annotations

from collections import OrderedDict

MIN_REUSE_TOKENS = 8
AUTO_MIN_BYTES = 64 << 20
AUTO_RAM_FRACTION = 0.10
PROMPTS_REMEMBERED = 256  # prompt lengths kept from lookup() until their sequence is stored


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


def auto_bound(model) -> int:
    """``auto_max_bytes`` for a loaded model on this machine."""
    from mlx.utils import tree_flatten

    from squish.hardware import total_memory_bytes

    return auto_max_bytes(sum(v.nbytes for _, v in tree_flatten(model.parameters())), total_memory_bytes())


def _match(run: list[int], tokens: list[int], start: int) -> int:
    """How many leading tokens of ``run`` equal ``tokens[start:]``."""
    n = min(len(run), len(tokens) - start)
    if run[:n] == tokens[start:start + n]:  # the usual case, at C speed
        return n
    i = 0
    step = 64
    while i + step <= n and run[i:i + step] == tokens[start + i:start + i + step]:
        i += step
    while i < n and run[i] == tokens[start + i]:
        i += 1
    return i


class _Node:
    __slots__ = ("run", "kv", "nbytes", "children", "parent", "used", "prompt_end", "stale")

    def __init__(self, run: list[int], kv: list, parent: "_Node | None"):
        self.run = run  # the tokens this node adds after its parent
        self.kv = kv  # per layer: (keys, values), each [1, heads, len(run), X] or a triple of such
        self.nbytes = _nbytes(kv)
        self.children: dict[int, _Node] = {}  # first token of a child's run -> child
        self.parent = parent
        self.used = 0  # logical clock of the last lookup / store through this node
        self.prompt_end: int | None = None  # a stored sequence ends here: where its prompt ended
        self.stale = False  # a sequence ends here whose generated tail was superseded


def _nbytes(kv: list) -> int:
    from mlx.utils import tree_reduce

    return tree_reduce(lambda total, a: total + a.nbytes, kv, 0)


def _slice(kv: list, start: int, stop: int) -> list:
    import mlx.core as mx
    from mlx.utils import tree_map

    out = tree_map(lambda a: mx.contiguous(a[..., start:stop, :]), kv)
    mx.eval(out)
    return out


class PrefixCache:
    def __init__(self, max_bytes: int, kv_quant: tuple[int, int] | None = None):
        self.max_bytes = max_bytes
        self.kv_quant = kv_quant  # the engine's KV cache: None plain, else (bits, group size); lookup makes alike
        self._root = _Node([], [], None)
        self._clock = 0
        self._prompts: OrderedDict[int, int] = OrderedDict()  # hash(prompt) -> its length
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        """Stored sequences (tree leaves)."""
        return sum(1 for n in self._nodes() if not n.children)

    def _nodes(self):
        stack = list(self._root.children.values())
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())

    @staticmethod
    def reusable(cache: list) -> bool:
        from mlx_lm.models.cache import KVCache

        from squish.runtime.kv_cache import QuantizedKV

        return bool(cache) and len({type(c) for c in cache}) == 1 and type(cache[0]) in (KVCache, QuantizedKV)

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    # ---- store ---------------------------------------------------------------------------
    def store(self, tokens: list[int], cache: list) -> None:
        """Keep ``cache`` (a finished sequence's per-layer ``KVCache``) for ``tokens``."""
        if self.max_bytes <= 0 or not self.reusable(cache):
            return
        n = min(len(tokens), cache[0].offset)
        if n < MIN_REUSE_TOKENS:
            return
        tokens = list(tokens[:n])
        prompt_end = self._prompt_end(tokens)
        now = self._tick()
        node, i = self._root, 0
        while i < n:
            child = node.children.get(tokens[i])
            if child is None:
                break
            j = _match(child.run, tokens, i)
            if j < len(child.run):
                if i + j == n:  # ends inside a stored run: nothing new to keep
                    child.used = now
                    return
                child = self._split(child, j)
            self._mark_superseded(node, child, i)
            child.used = now
            node, i = child, i + j
        if i < n:
            self._mark_superseded(node, None, i)
            kv = _slice([(c.keys, c.values) for c in cache], i, n)
            leaf = _Node(tokens[i:], kv, node)
            if leaf.nbytes > self.max_bytes:
                return
            leaf.used = now
            node.children[tokens[i]] = leaf
            self.nbytes += leaf.nbytes
            node = leaf
        node.prompt_end = prompt_end
        node.stale = False
        self._evict()

    def _prompt_end(self, tokens: list[int]) -> int | None:
        """The length of the prompt ``lookup`` saw for this sequence (None: unknown)."""
        for key, length in reversed(self._prompts.items()):
            if length <= len(tokens) and hash(tuple(tokens[:length])) == key:
                del self._prompts[key]
                return length
        return None

    def _split(self, node: _Node, j: int) -> _Node:
        """Cut ``node``'s run after ``j`` tokens; returns the new upper half (its parent's child)."""
        upper = _Node(node.run[:j], _slice(node.kv, 0, j), node.parent)
        upper.used = node.used
        lower_kv = _slice(node.kv, j, len(node.run))
        node.parent.children[node.run[0]] = upper
        node.run, node.kv, node.parent = node.run[j:], lower_kv, upper
        upper.children[node.run[0]] = node
        old = node.nbytes
        node.nbytes = _nbytes(lower_kv)
        self.nbytes += upper.nbytes + node.nbytes - old
        return upper

    def _mark_superseded(self, parent: _Node, taken: _Node | None, depth: int) -> None:
        """The new sequence leaves ``parent`` at ``depth`` (through ``taken``, or a new node):
        sequences below the other children whose prompt ended at or before ``depth``
        continued into a generated tail that this conversation replaced."""
        for sibling in parent.children.values():
            if sibling is taken:
                continue
            stack = [sibling]
            while stack:
                n = stack.pop()
                if n.prompt_end is not None and n.prompt_end <= depth and not n.children:
                    n.stale = True
                stack.extend(n.children.values())

    def _evict(self) -> None:
        while self.nbytes > self.max_bytes:
            leaves = [n for n in self._nodes() if not n.children]
            if not leaves:
                break
            victim = min(leaves, key=lambda n: (not n.stale, n.used))
            del victim.parent.children[victim.run[0]]
            self.nbytes -= victim.nbytes
            victim.kv = []

    # ---- lookup --------------------------------------------------------------------------
    def lookup(self, prompt: list[int]) -> tuple[list | None, int]:
        """(a per-layer cache holding the reused prefix, reused token count)."""
        self._remember(prompt)
        limit = len(prompt) - 1
        path: list[tuple[_Node, int]] = []
        node, i = self._root, 0
        while i < limit:
            child = node.children.get(prompt[i])
            if child is None:
                break
            j = min(_match(child.run, prompt, i), limit - i)
            if j == 0:
                break
            path.append((child, j))
            i += j
            if j < len(child.run):
                break
            node = child
        if i < MIN_REUSE_TOKENS:
            self.misses += 1
            return None, 0
        import mlx.core as mx
        from mlx.utils import tree_map

        from squish.runtime.kv_cache import layer as cache_layer

        now = self._tick()
        for n, _ in path:
            n.used = now
        out = []
        for at in range(len(path[0][0].kv)):
            if len(path) == 1:
                keys, values = tree_map(lambda a: a[..., :i, :], path[0][0].kv[at])
            else:
                parts = [tree_map(lambda a, j=j: a[..., :j, :], n.kv[at]) for n, j in path]
                keys, values = tree_map(lambda *a: mx.concatenate(a, axis=2), *parts)
            out.append(cache_layer(keys, values, i, self.kv_quant))
        self.hits += 1
        return out, i

    def _remember(self, prompt: list[int]) -> None:
        key = hash(tuple(prompt))
        self._prompts[key] = len(prompt)
        self._prompts.move_to_end(key)
        while len(self._prompts) > PROMPTS_REMEMBERED:
            self._prompts.popitem(last=False)
