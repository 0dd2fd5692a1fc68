"""The contract benchmark: Squish and mlx_lm side by side (``scripts/run_baseline.sh``).

Modules: ``runner`` (experiments, interleaving), ``systems`` (server processes, RSS),
``streaming`` (timed SSE requests), ``inproc`` (fresh-subprocess measurements),
``prompts``, ``stats`` (percentiles, Wilcoxon), ``metrics`` (raw samples → named
metrics), ``contracts`` (benchmarks/contracts.toml), ``quality`` (the quantization
table), ``plots``, ``report``, ``cli``. Method: docs/benchmarks.md.
"""
