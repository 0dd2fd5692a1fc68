"""Run a server module with an MLX-memory probe beside it (benchmarks only).

    python -m benchmarks.memprobe STATS_FILE MODULE [ARGS ...]

Runs ``MODULE`` as ``__main__`` (``squish`` or ``mlx_lm.server``) in this process
and, on a daemon thread, writes MLX's allocator figures to ``STATS_FILE`` (JSON:
``active``, ``peak``, ``cache`` bytes, ``loaded``, ``resets``) every 50 ms. Writing
``reset`` to ``STATS_FILE.cmd`` resets MLX's peak (``mx.reset_peak_memory``); the
next write counts it in ``resets``, so a caller knows the peak it reads is the
new phase's. Neither server needs to cooperate, and both run under the same probe.

``loaded`` is when the server's model is in memory: mlx_lm.server answers
``/health`` before it loads its model (on its generation thread), so for it the
probe wraps ``ModelProvider.load`` and sets the flag when that returns; for
Squish the harness reads ``/health`` instead (it answers 200 only once loaded).
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import threading
import time


def _probe(path: str, state: dict) -> None:
    import mlx.core as mx

    cmd = path + ".cmd"
    while True:
        if os.path.exists(cmd):
            try:
                os.remove(cmd)
            except OSError:
                pass
            mx.reset_peak_memory()
            state["resets"] += 1
        out = {"active": mx.get_active_memory(), "peak": mx.get_peak_memory(),
               "cache": mx.get_cache_memory(), "loaded": state["loaded"], "resets": state["resets"],
               "t": time.time()}
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f)
        os.replace(tmp, path)
        time.sleep(0.05)


def main() -> None:
    path, module, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    state = {"loaded": False, "resets": 0}
    threading.Thread(target=_probe, args=(path, state), daemon=True, name="memprobe").start()
    sys.argv = [module, *args]
    if module == "mlx_lm.server":
        import mlx_lm.server as server

        original = server.ModelProvider.load

        def load(self, *a, **k):
            out = original(self, *a, **k)
            state["loaded"] = True
            return out

        server.ModelProvider.load = load
        server.main()
    else:
        runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
