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
# torch only for the SDK's torch.save round trip: the CPU build (pip on this kind of
# machine takes it from its local wheel; a plain `torch` could pull a CUDA build).
torch_ok=1
.venv/bin/python -c "import torch" 2>/dev/null \
  || .venv/bin/python -m pip install -q 'torch==2.13.0' || torch_ok=0

# PostgreSQL: the same journal tests run on it.  Start the local cluster if it is
# installed but down; without one, those tests are skipped with the reason.
if command -v pg_isready >/dev/null && ! pg_isready -q -h 127.0.0.1; then
  if command -v pg_ctlcluster >/dev/null; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
  fi
fi
# The MQTT tests start their own mosquitto; install it where apt is available (as root,
# or through sudo).
export PATH="$PATH:/usr/sbin"
if ! command -v mosquitto >/dev/null && command -v apt-get >/dev/null; then
  SUDO=""
  if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO="sudo -n"; fi
  if ! ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq mosquitto mosquitto-clients) \
      >/tmp/artifact-router-apt.log 2>&1; then
    echo "could not install mosquitto (see /tmp/artifact-router-apt.log):" >&2
    tail -5 /tmp/artifact-router-apt.log >&2
  fi
fi

# Tests that need a server this machine lacks are skipped with the reason; a whole
# suite passing with them skipped would hide that, so it fails unless told otherwise.
missing=()
command -v mosquitto >/dev/null || missing+=("mosquitto (MQTT tests: apt-get install mosquitto)")
[ "$torch_ok" = 1 ] || missing+=("torch (the SDK's torch round trip: pip install torch==2.13.0)")
if ! command -v pg_isready >/dev/null || ! pg_isready -q -h 127.0.0.1; then
  missing+=("PostgreSQL on 127.0.0.1:5432 (journal tests on PostgreSQL)")
fi
if [ "${#missing[@]}" -gt 0 ] && [ "${ROUTER_TEST_ALLOW_SKIPS:-0}" != 1 ]; then
  printf 'missing: %s\n' "${missing[@]}" >&2
  echo "install them, or set ROUTER_TEST_ALLOW_SKIPS=1 to run with those tests skipped" >&2
  exit 1
fi

echo "== ruff"
.venv/bin/ruff check router sinks tests bench
echo "== mypy (core)"
.venv/bin/mypy
echo "== pytest"
set +e
if [ "${ROUTER_TEST_ALLOW_SKIPS:-0}" != 1 ]; then export ROUTER_TEST_NO_SKIPS=1; fi
.venv/bin/python -m pytest -p no:cacheprovider -rs "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "pytest collected no tests: failing on purpose" >&2
  exit 1
fi
[ "$rc" = 0 ] || exit "$rc"
# A whole run (no pytest arguments) also runs what touches the libraries at the lowest
# versions pyproject.toml allows.
if [ "$#" = 0 ]; then
  echo "== pytest on the lowest allowed versions (scripts/test-lowest.sh)"
  scripts/test-lowest.sh
fi
