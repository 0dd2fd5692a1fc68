# Sourced by scripts/squish and scripts/test.sh: make sure the pinned environment exists.
# Needs only python3 (>= 3.11) on PATH. Installs uv into .tools/ (a private venv) if uv is not
# installed, then syncs .venv from uv.lock. Idempotent and quick when nothing changed.
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
if command -v uv >/dev/null 2>&1; then
  UV=uv
else
  if [ ! -x .tools/bin/uv ]; then
    echo "installing uv into .tools/ ..." >&2
    python3 -m venv .tools
    .tools/bin/python -m pip install -q --disable-pip-version-check uv
  fi
  UV="$ROOT/.tools/bin/uv"
fi
"$UV" sync --frozen --inexact --quiet ${SQUISH_SYNC_ARGS:-}
