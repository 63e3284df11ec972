#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: installs everything it needs first.
#   scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'

# PostgreSQL: the same journal tests run on it.  Start the local cluster if it is
# installed but down; without one, those tests are skipped with the reason.
if command -v pg_isready >/dev/null && ! pg_isready -q -h 127.0.0.1; then
  if command -v pg_ctlcluster >/dev/null; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
  fi
fi
# The MQTT tests start their own mosquitto; install it where apt is available.
if ! command -v mosquitto >/dev/null && [ -x /usr/sbin/mosquitto ]; then
  export PATH="$PATH:/usr/sbin"
fi
if ! command -v mosquitto >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq mosquitto mosquitto-clients) >/dev/null 2>&1 || true
  export PATH="$PATH:/usr/sbin"
fi

echo "== ruff"
.venv/bin/ruff check router sinks tests bench
echo "== mypy (core)"
.venv/bin/mypy
echo "== pytest"
set +e
.venv/bin/python -m pytest -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "pytest collected no tests: failing on purpose" >&2
  exit 1
fi
exit "$rc"
