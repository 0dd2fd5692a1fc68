#!/bin/sh
# The full test suite, exactly as CI runs it. Installs everything it needs (dev group included).
#   ./scripts/test.sh                 everything
#   ./scripts/test.sh tests/unit -x   any pytest arguments
# The bench group too: the benchmark harness has unit tests (statistics, contracts, report).
SQUISH_SYNC_ARGS="--group bench"
. "$(dirname "$0")/_env.sh"
exec "$ROOT/.venv/bin/python" -m pytest --timeout=120 -q "$@"
