#!/bin/sh
# The full test suite, exactly as CI runs it. Installs everything it needs (dev group included).
#   ./scripts/test.sh                 everything
#   ./scripts/test.sh tests/unit -x   any pytest arguments
. "$(dirname "$0")/_env.sh"
exec "$ROOT/.venv/bin/python" -m pytest --timeout=120 -q "$@"
