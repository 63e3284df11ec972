#!/usr/bin/env bash
# The same three-step pipeline as examples/pipeline.py, from bash with `artifact-router emit`.
#
#   ROUTER_RUN_ID=run-7 examples/pipeline.sh     # config: $ROUTER_CONFIG or ./router.yaml
#
# Each step writes its files, then hands them over as one bundle (built under
# incoming/.tmp-<id>/ and renamed into place); --input records lineage.
set -euo pipefail

pipeline=fraud_training
run_id=${ROUTER_RUN_ID:-run-$(date +%Y%m%dT%H%M%S)-$$}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
emit() { artifact-router emit --pipeline "$pipeline" --run-id "$run_id" "$@" >/dev/null; }

# prep: a small labelled data set (amount, hour, label)
awk 'BEGIN { srand(7); print "amount,hour,label"
             for (i = 0; i < 400; i++) { a = int(rand() * 200); h = int(rand() * 24)
                                         print a "," h "," (a > 120 ? 1 : 0) } }' \
  > "$work/train.csv"
emit --step prep --type dataset --name train_data --upload "$work/train.csv"

# train: pick the amount threshold that separates the labels best
threshold=$(awk -F, 'NR > 1 { n[$1 > 100] += 1; f[$1 > 100] += $3 }
                     END { print (f[1] / n[1] > 0.5) ? 100 : 150 }' "$work/train.csv")
printf '{"kind": "threshold", "feature": "amount", "threshold": %s}\n' "$threshold" \
  > "$work/model.json"
emit --step train --type model --name fraud_detector --upload \
  --param "threshold=$threshold" \
  --input "$pipeline/$run_id/prep/train_data" "$work/model.json"

# evaluate: accuracy of the threshold rule on the data
accuracy=$(awk -F, -v t="$threshold" 'NR > 1 { ok += (($1 > t) == $3); n++ }
                                      END { printf "%.4f", ok / n }' "$work/train.csv")
emit --step evaluate --type metrics --name evaluation --metric "accuracy=$accuracy" \
  --input "$pipeline/$run_id/train/fraud_detector"

echo "emitted $pipeline/$run_id: prep -> train -> evaluate (accuracy $accuracy)"
