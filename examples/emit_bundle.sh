#!/usr/bin/env bash
# Hand one model file to artifact-router from any job, with nothing but coreutils.
#
#   examples/emit_bundle.sh SPOOL PIPELINE RUN_ID STEP NAME FILE [ACCURACY]
#
# The bundle is built under incoming/.tmp-<id>/ (names starting with '.' are never
# read) and renamed into place in one step, so the daemon never sees half a bundle.
# Values are written into JSON as-is: keep them to letters, digits, '-', '_' and '.'.
set -euo pipefail

spool=$1 pipeline=$2 run_id=$3 step=$4 name=$5 file=$6 accuracy=${7:-}
id="${pipeline}-${run_id}-${step}-${name}-$(date +%s%N)-$$"
tmp="$spool/incoming/.tmp-$id"

mkdir -p "$tmp"
cp "$file" "$tmp/"
metadata=""
if [ -n "$accuracy" ]; then
  metadata=", \"metadata\": {\"metrics\": {\"accuracy\": $accuracy}}"
fi
cat > "$tmp/manifest.json" <<JSON
{
  "manifest_version": 1,
  "id": "$id",
  "pipeline": "$pipeline",
  "run_id": "$run_id",
  "step_name": "$step",
  "artifacts": [
    {"type": "model", "name": "$name", "upload": true,
     "files": [{"path": "$(basename "$file")"}]$metadata}
  ]
}
JSON
mv "$tmp" "$spool/incoming/$id"
echo "$id"
