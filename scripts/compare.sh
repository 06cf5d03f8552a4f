#!/usr/bin/env bash
# scripts/compare.sh OUT REPEATS LABEL=DIR [LABEL=DIR ...] (HEADLINE_ARGS: more arguments of headline.py): the headline rows (scripts/headline.py) of
# the geokern this checkout imports (label "new": the editable install or an installed wheel) and of
# older trees, in one run on one machine, REPEATS times alternating (the spread of repeats says what a
# difference must exceed). Each DIR holds an older tree (git archive REV | tar -x -C DIR) with its
# _C built in place (setup.py build_ext --inplace, against this machine's torch). Rows land in
# OUT/headline.jsonl, a table in OUT/headline.txt (each label's median beside "new"'s).
set -uo pipefail
PY=${PYTHON:-python3}
OUT=$1; REPEATS=$2; shift 2
ROOT=$(pwd)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
labels=()
for spec in "$@"; do
  label=${spec%%=*}; dir=$(cd "${spec#*=}" && pwd)
  # an older tree imports without installing: geokern.kernels is the top-level kernels/ (setup.py's package_dir)
  ln -sfn ../kernels "$dir/geokern/kernels"
  ( cd /tmp && PYTHONPATH="$dir" $PY -c "import geokern; assert geokern.__file__.startswith('$dir'), geokern.__file__; print('$label', geokern.info()['cuda_extension'])" ) || exit 1
  labels+=("$label=$dir")
done
$PY -c "import geokern; print('new', geokern.__file__, geokern.info()['cuda_extension'])" || exit 1
for i in $(seq "$REPEATS"); do
  $PY "$ROOT/scripts/headline.py" --label new --out "$OUT/headline.jsonl" ${HEADLINE_ARGS:-} || exit 1
  for spec in "${labels[@]}"; do
    ( cd /tmp && PYTHONPATH="${spec#*=}" $PY "$ROOT/scripts/headline.py" --label "${spec%%=*}" --out "$OUT/headline.jsonl" ${HEADLINE_ARGS:-} ) || exit 1
  done
done
$PY - "$OUT/headline.jsonl" <<'PYEOF' | tee "$OUT/headline.txt"
import collections, json, statistics, sys
t = collections.defaultdict(list)
for line in open(sys.argv[1]):
    r = json.loads(line)
    t[(r["case"], r["impl"], r["label"])].append(r["ms"])
keys = sorted({(c, i) for c, i, _ in t})
olds = sorted({l for _, _, l in t} - {"new"})
fmt = lambda v: f"{statistics.median(v):.4f} ({min(v):.4f}..{max(v):.4f})" if v and None not in v else "-"
print(f"{'case':<58} {'impl':<7} {'new ms (min..max)':>24}" + "".join(f" {l + ' ms':>24} {'new/' + l:>10}" for l in olds))
for c, i in keys:
    n = t.get((c, i, "new"), [])
    row = f"{c:<58} {i:<7} {fmt(n):>24}"
    for l in olds:
        b = t.get((c, i, l), [])
        ratio = statistics.median(n) / statistics.median(b) if b and n and None not in b + n else float("nan")
        row += f" {fmt(b):>24} {ratio:10.3f}"
    print(row)
PYEOF
