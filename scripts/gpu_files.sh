#!/usr/bin/env bash
# scripts/gpu_files.sh OUT SECONDS FILE...: the given test files on the GPU, one pytest process per
# file side by side, each stopped after SECONDS; a summary line per file (for short device calls).
set -uo pipefail
OUT=$1; LIMIT=$2; shift 2
export PYTHONUNBUFFERED=1 GEOKERN_AUTOTUNE=0
for f in "$@"; do
  ( timeout "$LIMIT" python3 -m pytest -q -p no:cacheprovider -m "not huge" -rfE "$f" >"$OUT/$(basename "$f" .py).log" 2>&1
    echo "exit $?" >>"$OUT/$(basename "$f" .py).log" ) &
done
wait
for f in "$@"; do
  l="$OUT/$(basename "$f" .py).log"
  echo "== $f: $(grep -E '(passed|failed|error)' "$l" | tail -1) $(tail -1 "$l")"
  grep -E "^(FAILED|ERROR)" "$l" | cut -c1-300 | head -15
done
