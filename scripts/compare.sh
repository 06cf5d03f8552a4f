#!/usr/bin/env bash
# scripts/compare.sh BASE_DIR OUT [REPEATS] [MATCH]: the headline rows (scripts/headline.py) of this
# tree and of an older one, in one run on one machine, REPEATS times alternating (the spread of
# repeats says what a difference must exceed). BASE_DIR holds the older tree (git archive REV |
# tar -x -C BASE_DIR); its _C is built in place beside this tree's (built by make gpu's build step
# or here if missing). Rows land in OUT/headline.jsonl, a table in OUT/headline.txt.
set -uo pipefail
PY=${PYTHON:-python3}
BASE=$(cd "$1" && pwd); OUT=$2; REPEATS=${3:-3}; MATCH=${4:-}
ROOT=$(pwd)
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONUNBUFFERED=1
# the older tree imports without installing: geokern.kernels is the top-level kernels/ (setup.py's package_dir)
ln -sfn ../kernels "$BASE/geokern/kernels"
bpid=
if ! ls "$BASE"/geokern/_C*.so >/dev/null 2>&1; then  # built in place unless carried prebuilt
  ( cd "$BASE" && MAX_JOBS=8 $PY setup.py -q build_ext --inplace >"$OUT/base_build.log" 2>&1 ) &
  bpid=$!
fi
ls geokern/_C*.so >/dev/null 2>&1 || MAX_JOBS=8 $PY -m pip install --no-build-isolation --no-deps -e . -q
[ -z "$bpid" ] || wait $bpid || { echo "baseline build failed"; tail -20 "$OUT/base_build.log"; exit 1; }
( cd /tmp && PYTHONPATH="$BASE" $PY -c "import geokern; assert geokern.__file__.startswith('$BASE'), geokern.__file__; print('base', geokern.info()['cuda_extension'])" ) || exit 1
for i in $(seq "$REPEATS"); do
  $PY scripts/headline.py --label "new" --out "$OUT/headline.jsonl" ${MATCH:+--match "$MATCH"} || exit 1
  ( cd /tmp && PYTHONPATH="$BASE" $PY "$ROOT/scripts/headline.py" --label "base" --out "$OUT/headline.jsonl" ${MATCH:+--match "$MATCH"} ) || exit 1
done
$PY - "$OUT/headline.jsonl" <<'PYEOF' | tee "$OUT/headline.txt"
import collections, json, statistics, sys
t = collections.defaultdict(list)
for line in open(sys.argv[1]):
    r = json.loads(line)
    t[(r["case"], r["impl"], r["label"])].append(r["ms"])
keys = sorted({(c, i) for c, i, _ in t})
print(f"{'case':<58} {'impl':<7} {'base ms (min..max)':>24} {'new ms (min..max)':>24} {'new/base':>8}")
for c, i in keys:
    b, n = t.get((c, i, "base"), []), t.get((c, i, "new"), [])
    fmt = lambda v: f"{statistics.median(v):.4f} ({min(v):.4f}..{max(v):.4f})" if v and None not in v else "-"
    ratio = statistics.median(n) / statistics.median(b) if b and n and None not in b + n else float("nan")
    print(f"{c:<58} {i:<7} {fmt(b):>24} {fmt(n):>24} {ratio:8.3f}")
PYEOF
