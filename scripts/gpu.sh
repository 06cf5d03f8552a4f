#!/usr/bin/env bash
# make gpu [OUT=folder] [SELECT=family] [BENCH=0] [STEPS="build tests sanitizer bench"] [WHEEL=dist/x.whl] [PART=i/n] [IDS=file] [ORDER=reverse]: the one
# script for a GPU machine that may have no network (python3 there already has torch, triton, pytest, ninja).
# Builds geokern._C (or, given WHEEL, installs that wheel and tests the installed package instead),
# runs the whole test suite on CUDA, compute-sanitizer (memcheck) over the CUDA
# extension's tests, then the benchmarks. Everything is logged to OUT/gpu.log; result
# files (one JSON and one PNG per op family) land in OUT.
set -uo pipefail
PY=${PYTHON:-python3}
OUT=${1:-}
SELECT=${2:-}
if [ -z "$OUT" ]; then
  OUT=benchmarks/results/$($PY -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name(0).lower()).strip('-'))")
fi
mkdir -p "$OUT"
LOG="$OUT/gpu.log"
: >"$LOG"
status=0
step() {  # step NAME CMD...: run, log, remember failure, go on
  local name=$1; shift
  echo "=== $name: $*" | tee -a "$LOG"
  local t0=$SECONDS
  "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || status=1
}
export MAX_JOBS=${MAX_JOBS:-16}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export PYTHONUNBUFFERED=1
# a "cuda" test fails, not skips, when _C cannot run here (tests/_helpers.need)
export GEOKERN_REQUIRE_C=1
COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
K=${SELECT:+-k $SELECT}
# STEPS: which of build, tests, sanitizer, bench to run (a later call on the same, still warm
# machine can run the rest when one call would outlast a time limit)
STEPS=" ${STEPS:-build tests huge sanitizer bench} "
[ "${BENCH:-1}" = 0 ] && STEPS=${STEPS/ bench / }
want() { [[ "$STEPS" == *" $1 "* ]]; }
for s in $STEPS; do
  case $s in build|tests|huge|sanitizer|bench) ;; *) echo "make gpu: unknown step '$s' in STEPS (build tests huge sanitizer bench)"; exit 2 ;; esac
done
if [ -n "${WHEEL:-}" ]; then
  # the checkout's own geokern/ must not shadow the installed one: no cwd on sys.path, in the child
  # processes too (pytest itself puts tests/ on the path, not the root)
  export PYTHONSAFEPATH=1
  want build && step install-wheel $PY -m pip install --no-deps --force-reinstall -q "$WHEEL"
else
  want build && step build $PY -m pip install --no-build-isolation --no-deps -e . -q
fi
step info $PY -c "import geokern, json; print(geokern.__file__); print(json.dumps(geokern.info(), indent=1))"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv >>"$LOG" 2>&1
# tests take one fixed config per Triton kernel (GEOKERN_AUTOTUNE=0): autotuning every
# test shape would cost minutes and test nothing the benchmarks do not
# The tests run in JOBS pytest processes at once (one GPU is far from busy with one): shards()
# deals the selected test ids out round-robin, so each file's tests spread over every process and
# the processes end together (one file's tests under memcheck took 9 minutes alone).
JOBS=${JOBS:-4}
shards() {  # shards NAME SELECT...: the ids pytest selects with SELECT, in JOBS files OUT/NAME.ids.<i>
  local name=$1; shift
  rm -f "$OUT/$name".ids*
  # PART=i/n: only every n-th id from the i-th (1-based), so n device calls together run the whole
  # selection when one cannot (each part spreads over every file, as the shards do)
  # The ids are shuffled (a fixed seed) before they are dealt: in collection order a parametrization
  # alternates (octonion / quaternion, ...), so round-robin gave some processes every expensive
  # variant (the octonion attention tests, whose kernels take the longest to compile): five of
  # fourteen processes had done 35% of their tests when the others had finished.
  # IDS=file: only the selected ids that the file lists (e.g. the ids a cut memcheck did not reach)
  $PY -m pytest --collect-only -q -p no:cacheprovider "$@" tests 2>/dev/null | grep '::' | LC_ALL=C sort -u |
    { if [ -n "${IDS:-}" ]; then grep -Fxf "$IDS"; else cat; fi; } |
    awk 'BEGIN { srand(12345) } { printf "%.12f\t%s\n", rand(), $0 }' | sort -k1,1 | cut -f2- |
    awk -v part="${PART:-1/1}" 'BEGIN { split(part, a, "/") } (NR - 1) % a[2] == a[1] - 1' >"$OUT/$name.ids"
  # nothing selected: no shard and no process (pytest given no ids would run the whole suite); an
  # IDS file that matches no collected id is an error, an empty SELECT only a note
  if [ ! -s "$OUT/$name.ids" ]; then
    echo "$name: no test id selected${IDS:+ (IDS=$IDS matches none)}" >&2
    [ -z "${IDS:-}" ]; return
  fi
  awk -v n="$JOBS" -v f="$OUT/$name.ids." '{ print > (f (NR % n)) }' "$OUT/$name.ids"
  # ORDER=reverse: each process runs its shard from the end, so a call cut by its time limit covers
  # what an earlier cut call of the same shards (same ids, run from the start) did not reach
  if [ "${ORDER:-}" = reverse ]; then for f in "$OUT/$name".ids.*; do tac "$f" >"$f.r" && mv "$f.r" "$f"; done; fi
}
parallel() {  # parallel NAME SELECT... -- CMD...: CMD + one shard's test ids in each process; logs appended in order
  local name=$1; shift
  local sel=()
  while [ "$1" != "--" ]; do sel+=("$1"); shift; done
  shift
  shards "$name" "${sel[@]}" || return 1
  [ -s "$OUT/$name.ids" ] || return 0
  local pids=() rc=0
  for ids in "$OUT/$name".ids.*; do
    # exit 5: nothing selected in this shard, which is no failure
    ( readarray -t t <"$ids"; "$@" "${t[@]}"; r=$?; [ $r -eq 5 ] && r=0; exit $r ) >"${ids/.ids./.}.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  for f in "$OUT/$name".[0-9]*.log; do cat "$f"; rm -f "$f"; done
  return $rc
}
# --durations: what the suite's time on the GPU goes to (3175 tests no longer end within one 600 s device call);
# -v: one line per test, so a process cut by a time limit still says which test it was in (with -q a
# cut process left dots only, and the test that held it could not be named)
want tests && step tests parallel tests -m "not huge" $K -- env GEOKERN_AUTOTUNE=0 $PY -m pytest -v -p no:cacheprovider --durations=15
# tensors past 2**31 elements: one process at a time (each test takes much of the GPU's memory)
want huge && step huge env GEOKERN_AUTOTUNE=0 $PY -m pytest -q -p no:cacheprovider -m huge $K tests
# memcheck over every kernel test, CUDA and Triton (not the compile tests: inductor's own kernels
# add nothing of ours). Each allocation its own cudaMalloc, so memcheck sees out-of-bounds
# accesses that the caching allocator would otherwise hide inside a larger block.
want sanitizer && step sanitizer parallel sanitizer -m "not huge" -k "(cuda or triton) and not compile${SELECT:+ and $SELECT}" -- \
  env GEOKERN_AUTOTUNE=0 PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
  $PY -m pytest -q -p no:cacheprovider
want bench && step bench $PY -m geokern.bench --out "$OUT" --commit "$COMMIT" ${SELECT:+--family $SELECT}
echo "=== make gpu: $([ $status -eq 0 ] && echo PASS || echo FAIL)" | tee -a "$LOG"
exit $status
