#!/usr/bin/env bash
# Run the daemon on the embedded defaults and show a demo: artifacts emitted
# with `artifact-router emit` (dataset, model, metrics, parameters), routed to ./demo/artifacts and the jsonl tracker.
#   scripts/demo.sh            (Ctrl-C stops the daemon)
#   DEMO_ONESHOT=1 scripts/demo.sh   (stop after the demo, for scripts and tests)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
demo=${DEMO_DIR:-$repo/demo}

if [ ! -x "$repo/.venv/bin/artifact-router" ]; then
  "${PYTHON:-python3}" -m venv "$repo/.venv"
  "$repo/.venv/bin/python" -m pip install -q --upgrade pip
  "$repo/.venv/bin/python" -m pip install -q -e "$repo"
fi
router="$repo/.venv/bin/artifact-router"

mkdir -p "$demo" && cd "$demo"
echo "== starting artifact-router in $demo (embedded defaults: ./spool, ./artifacts, ./.router)"
"$router" run > router.log 2>&1 &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  grep -q "artifact-router started" router.log 2>/dev/null && break
  sleep 0.1
done

run="demo-$(date +%H%M%S)"
printf 'id,amount,label\n1,12.5,0\n2,99.0,1\n' > train.csv
head -c 2048 /dev/urandom > model.pkl
echo "== emitting a dataset, then a model with its metrics and parameters (pipeline fraud_training, run $run)"
"$router" emit --pipeline fraud_training --run-id "$run" --step prep --type dataset \
  --name train_data --upload train.csv
"$router" emit --pipeline fraud_training --run-id "$run" --step train --type model \
  --name fraud_detector --upload --metric accuracy=0.97 --metric f1_score=0.91 \
  --param lr=0.001 --input "fraud_training/$run/prep/train_data" model.pkl

for _ in $(seq 1 100); do
  if "$router" status --json | "$repo/.venv/bin/python" -c \
    'import json,sys; s=json.load(sys.stdin); d=s["deliveries"]; sys.exit(0 if s["events"].get("done",0)>=2 and d["pending"]+d["in_flight"]==0 else 1)'; then
    break
  fi
  sleep 0.2
done
echo "== status"
"$router" status
echo "== catalog"
"$router" artifacts --run "$run"
echo "== files in the local store"
find artifacts -type f | sort
echo "== metrics and parameters in the jsonl tracker"
cat ".router/tracking/fraud_training/$run.jsonl"
if [ -n "${DEMO_ONESHOT:-}" ]; then
  exit 0
fi
echo "== the daemon keeps running; drop bundles into $demo/spool/incoming (Ctrl-C to stop)"
wait $pid
