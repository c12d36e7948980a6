#!/usr/bin/env bash
# Create .venv-bench: Runlane (editable, with PostgreSQL support) plus the peers from the `bench` extra.
# The peers live only here, never in the dev venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
if [ ! -x .venv-bench/bin/python ]; then
    "$PYTHON" -m venv .venv-bench
fi
.venv-bench/bin/python -m pip install --quiet --upgrade pip
.venv-bench/bin/python -m pip install --quiet -e '.[postgres,bench]'
.venv-bench/bin/python - <<'PY'
from importlib.metadata import version
for name in ("runlane", "psycopg", "redis", "pgqueuer", "asyncpg", "procrastinate", "huey", "celery", "dramatiq", "rq",
             "taskiq", "taskiq-redis", "py-spy"):
    try:
        print(f"{name:14} {version(name)}")
    except Exception as exc:  # noqa: BLE001
        print(f"{name:14} MISSING ({exc})")
PY
for tool in pgbench redis-cli psql; do
    command -v "$tool" >/dev/null || echo "warning: $tool not found (needed by bench.ceilings / store resets)"
done
