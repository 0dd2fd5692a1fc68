#!/bin/sh
# Squish vs mlx_lm on the same model and machine: start-up, load, latency, memory, prefix cache,
# concurrency, quantization quality; checked against benchmarks/contracts.toml.
# Results go to benchmarks/results/<UTC stamp>_baseline/ (never overwritten).
#   ./scripts/run_baseline.sh                  best local model, standard profile
#   ./scripts/run_baseline.sh --quick --check  smoke run; exit 1 naming each violated contract
#   ./scripts/run_baseline.sh --full --models qwen2.5:1.5b,qwen3:8b
#   ./scripts/run_baseline.sh --help
SQUISH_SYNC_ARGS="--group bench ${SQUISH_SYNC_ARGS:-}"
export SQUISH_SYNC_ARGS
. "$(dirname "$0")/_env.sh"
exec "$ROOT/.venv/bin/python" -m benchmarks.baseline "$@"
