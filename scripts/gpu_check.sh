#!/usr/bin/env bash
# scripts/gpu_check.sh OUT [STAGE...]: device calls that check a change when device time is short, with
# geokern._C prebuilt on the CPU machine and carried in .carry/: a wheel (.carry/*.whl, installed, the
# tests then import the installed package) or a bare .carry/_C.abi3.so (built against the device's torch,
# dropped into an editable install). Stages, in order:
#   suite       (LIMIT seconds at most, default 480) the whole suite (not huge; PART=i/n: a part of it, see gpu.sh) and compute-sanitizer memcheck over the kernel tests at once
#               (correctness only: they share the GPU); logs in OUT/tests, OUT/sanitizer(_triton)
#   memcheck    (instead of suite) memcheck alone, MEMCHECK and PART as for suite
#   huge        the tests past 2**31 elements, one process (OUT/huge.log), alone: beside the suite and
#               memcheck (16 processes of ~5 GB each on the H100) every huge test and ~290 others ran out of memory
#   compare     the headline rows beside older trees (.base, .pre where present; scripts/compare.sh,
#               REPEATS times, default 3), alone on the GPU
#   overhead    what a call costs (#16): the overhead benchmark family and scripts/profile_calls.py
#               (autotuning on, as users run it), in OUT/overhead. Both write their JSON after every
#               call/dtype pair and stop starting pairs at --budget (their limit less a margin for the
#               import, the last pair and the table). Estimated ~130 s + ~80 s on the H100 (d29c939, all
#               46 pairs: ~6 s a pair, mostly compiling and autotuning, and the profile ~0.9 s each of 184
#               profiles; both limits were hit, ~465 s needed): the family's kernels are compiled by
#               OVERHEAD_JOBS processes at once first, the profile skips the second dtype's floors.
#   ncu         Nsight Compute counters of the kernels behind the done-means rows that miss their targets
#               (scripts/ncu_rows.py; NCU_MATCH, NCU_IMPLS (default triton), NCU_LIMIT seconds, default 300):
#               OUT/ncu/rows.txt, one line per kernel: throughputs, occupancy, registers, top stalls
#   new         the newest families' tests and benchmarks (FAMILIES, default: ultrametric
#               hypercomplex_linear hypercomplex_attention lior contrastive, ultrametric_retrieval; OUT/new;
#               NEW_TESTS=0 skips the tests when the suite stage ran them; BENCH_MATCH: only the cases
#               whose 'op shape dtype direction' match this regular expression, "done": the done-means rows)
# Autotuning results are cached on disk (TRITON_CACHE_AUTOTUNING): the repeats of one tree's
# headline rows, and a later stage's call of the same kernel, reuse the first tuning instead of
# re-tuning (the timed configs stay the tuned ones; the spread of repeats is then the run's noise).
# The device returns at most 8 files from OUT: at the end everything but info.json and the
# summary (OUT/summary.txt, this script's output) is packed into OUT/logs.tgz.
set -uo pipefail
OUT=$1; shift
STAGES=" ${*:-suite huge compare overhead} "
mkdir -p "$OUT"
exec > >(tee "$OUT/summary.txt") 2>&1
export PYTHONUNBUFFERED=1 GEOKERN_AUTOTUNE=0 TRITON_CACHE_AUTOTUNING=1
# compiled kernels in an ignored folder of the checkout: the device keeps ignored files between calls
# on a warm machine, so a later call (the suite's second part, the benchmarks) reuses what an earlier
# one compiled instead of compiling again (compiling is most of the suite's time on the H100)
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.kernel-cache/triton} TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/.kernel-cache/inductor}
wheel=$(ls .carry/*.whl 2>/dev/null | head -1)
if [ -n "$wheel" ]; then
  if ! python3 -m pip install -q --no-deps --force-reinstall "$wheel"; then
    # a manylinux tag newer than this machine's glibc: say so, then install the same files as a plain linux wheel
    ldd --version | head -1
    plain=/tmp/$(basename "$wheel" | sed -E 's/manylinux_[0-9]+_[0-9]+_x86_64/linux_x86_64/')
    cp "$wheel" "$plain" && python3 -m pip install -q --no-deps --force-reinstall "$plain" || exit 1
    wheel=$plain
  fi
  export WHEEL=$wheel PYTHONSAFEPATH=1  # the checkout's geokern/ must not shadow the installed one
else
  cp .carry/_C.abi3.so geokern/ && GEOKERN_BUILD_CUDA=0 python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
fi
python3 -c "import geokern, json; print(geokern.__file__); print(json.dumps(geokern.info()))" | tee "$OUT/info.json"
t0=$SECONDS
# PROBE=script.py: a diagnostic script run first (150 s at most; OUT/probe.log), e.g. scripts/probe_octonion_inf.py
[ -n "${PROBE:-}" ] && timeout 150 python3 "$PROBE" 2>&1 | tee "$OUT/probe.log" | tail -45
memcheck() {  # compute-sanitizer memcheck over the kernel tests (MEMCHECK: which of cuda, triton; LIMIT in all)
  local r=0
  if [[ " ${MEMCHECK:-cuda triton} " == *" cuda "* ]]; then
    JOBS=8 STEPS="sanitizer" BENCH=0 timeout "${LIMIT:-480}" bash scripts/gpu.sh "$OUT/sanitizer" cuda >/dev/null 2>&1 || r=1
  fi
  if [[ " ${MEMCHECK:-cuda triton} " == *" triton "* ]]; then
    JOBS=8 STEPS="sanitizer" BENCH=0 timeout $(( ${LIMIT:-480} - (SECONDS - t0) )) bash scripts/gpu.sh "$OUT/sanitizer_triton" triton >/dev/null 2>&1 || r=1
  fi
  return $r
}
huge() {  # the tests past 2**31 elements, one process
  python3 -m pytest -q -p no:cacheprovider -m huge tests >"$OUT/huge.log" 2>&1
  echo "huge exit $?, $((SECONDS - t0)) s"; tail -5 "$OUT/huge.log"
}
logs() { grep -hsE "passed|failed|^FAILED|^ERROR|ERROR SUMMARY" "$@" | cut -c1-240 | tail -40; }
cut_at() {  # the test each process cut by LIMIT was in (its -v log's last line: the id, no result yet)
  for f in "$@"; do [ -f "$f" ] && ! tail -3 "$f" | grep -qE " in [0-9.]+s" && echo "cut: $(basename "$f") in $(tail -1 "$f" | cut -c1-200)"; done
}
if [[ "$STAGES" == *" suite "* ]]; then
  JOBS=${JOBS:-8} STEPS="tests" BENCH=0 timeout "${LIMIT:-480}" bash scripts/gpu.sh "$OUT/tests" >/dev/null 2>&1 &
  tp=$!
  # memcheck beside the suite: the CUDA extension's tests first, then the Triton kernels' (if the
  # call's time runs out, the shard logs say how far each got). MEMCHECK=triton: the Triton kernels'
  # tests alone, when the CUDA sources are unchanged since a clean run; MEMCHECK=none: the suite alone
  memcheck & sp=$!
  wait $tp; trc=$?; wait $sp; src=$?
  echo "tests exit $trc, sanitizer exit $src, $((SECONDS - t0)) s"
  # (a process cut by LIMIT leaves its shard log, not gpu.log's copy of it: both are read)
  logs "$OUT"/tests/gpu.log "$OUT"/tests/tests.[0-9]*.log "$OUT"/sanitizer/gpu.log "$OUT"/sanitizer_triton/gpu.log
  cut_at "$OUT"/tests/tests.[0-9]*.log
elif [[ "$STAGES" == *" memcheck "* ]]; then
  # memcheck alone (the suite ran in an earlier call): PART=i/n splits it as it splits the suite.
  # HUGE_BESIDE=1 with the huge stage: the huge tests run at the same time (correctness only; ~40 GB
  # of memcheck processes beside them: fits an H200, may run out of memory on an H100)
  hp=
  if [[ "$STAGES" == *" huge "* && -n "${HUGE_BESIDE:-}" ]]; then huge & hp=$!; STAGES=${STAGES/ huge / }; fi
  memcheck; echo "sanitizer exit $?, $((SECONDS - t0)) s"
  logs "$OUT"/sanitizer/gpu.log "$OUT"/sanitizer/sanitizer.[0-9]*.log "$OUT"/sanitizer_triton/gpu.log "$OUT"/sanitizer_triton/sanitizer.[0-9]*.log
  [ -n "$hp" ] && wait $hp
fi
[[ "$STAGES" == *" huge "* ]] && huge
if [[ "$STAGES" == *" compare "* ]]; then
  unset GEOKERN_AUTOTUNE
  olds=()
  for d in .base .pre; do [ -d "$d" ] && olds+=("${d#.}=$d"); done
  timeout "${COMPARE_LIMIT:-540}" bash scripts/compare.sh "$OUT/compare" "${REPEATS:-3}" "${olds[@]}" 2>&1 | grep -v '^{' | tail -30
  echo "compare done, $((SECONDS - t0)) s"
fi
if [[ "$STAGES" == *" overhead "* ]]; then
  unset GEOKERN_AUTOTUNE
  ol=${OVERHEAD_LIMIT:-200} pl=${PROFILE_LIMIT:-110}
  timeout "$ol" python3 -m geokern.bench --family overhead --out "$OUT/overhead" --budget $((ol - 40)) \
    --jobs "${OVERHEAD_JOBS:-8}" 2>&1 | grep -vE '^  .* fwd (floor|cuda|triton)$' | sed -n 1,80p  # the table's first rows (#16's decode shape, one per family); sed reads on: no SIGPIPE
  timeout "$pl" python3 scripts/profile_calls.py --out "$OUT/overhead/profile_calls" --budget $((pl - 25)) 2>&1 | tail -3
  echo "overhead done, $((SECONDS - t0)) s"
fi
# BENCH_MATCH=done: the rows the issues' done-means name (#17-#22), 153 timed entries instead of ~290
done_rows='^ultrametric_attention B1H16T32768K8D64 bf16 fwd$|^ultrametric_attention B1H16T65536K8D64 bf16 fwd\+bwd$|^ultrametric_decode_step_ B32H16ctx(4096|1048576)|^ultrametric_attention soft B4H16T(1024|4096|16384)K8D64|^ultrametric_signatures|^ultrametric_top1 B1H8T8192D64K8 bf16|_linear (4096x|32x8192)|^(quaternion|octonion)_attention B4H16T(1024|4096|16384)D64|^sdpa \(baseline\) B4H16T(1024|4096|16384)D64|^lior_recurrence(\+gate)? T(1024|2048)|^lior_recurrence_step_(\+gate)? B(4096|8192)|^lior_action_ W64|^lior_memory_conv|^contrastive_update_many_|^contrastive_update_ in(4096-out4096|8192)'
if [[ "$STAGES" == *" ncu "* ]]; then
  # the hardware counters of the done-means rows that miss (scripts/ncu_rows.py): their measured cause
  unset GEOKERN_AUTOTUNE
  miss_rows='^ultrametric_attention B1H16T32768K8D64 bf16 fwd$|^ultrametric_attention soft B4H16T16384K8D64 bf16 fwd$|^(quaternion|octonion)_linear 4096x4096x4096 bf16 fwd$|^(quaternion|octonion)_attention B4H16T16384D64 bf16 fwd$|^lior_recurrence\+gate T2048-B32-D2048 bf16 fwd$|^lior_recurrence_step_\+gate B8192-D4096-p4 bf16 fwd$|^lior_action_ W64'
  nl=${NCU_LIMIT:-300}
  timeout "$nl" python3 scripts/ncu_rows.py profile "$OUT/ncu" --match "${NCU_MATCH:-$miss_rows}" --impls "${NCU_IMPLS:-triton}" \
    --budget $((nl - 90)) 2>&1 | tail -30
  echo "ncu done, $((SECONDS - t0)) s"
fi
if [[ "$STAGES" == *" new "* ]]; then
  mkdir -p "$OUT/new"
  fams=${FAMILIES:-ultrametric ultrametric_retrieval hypercomplex_linear hypercomplex_attention lior contrastive}
  files=$(for f in $fams; do ls tests/test_${f}*.py 2>/dev/null; done)
  if [ "${NEW_TESTS:-1}" != 0 ]; then
    GEOKERN_AUTOTUNE=0 python3 -m pytest -q -p no:cacheprovider $files >"$OUT/new/tests.log" 2>&1
    echo "new families' tests exit $?, $((SECONDS - t0)) s"; grep -E "^FAILED|^ERROR|passed|failed" "$OUT/new/tests.log" | cut -c1-300 | tail -30
  fi
  match=${BENCH_MATCH:-}
  [ "$match" = done ] && match=$done_rows
  for f in $fams; do
    ( unset GEOKERN_AUTOTUNE; timeout "${BENCH_LIMIT:-240}" python3 -m geokern.bench --family "$f" --out "$OUT/new" ${match:+--match "$match"} 2>&1 | tail -40 )
    echo "bench $f done, $((SECONDS - t0)) s"
  done
fi
# the shards' ids stay (packed): with a -q log's one character per test they say which tests a cut process ran
# (tar may exit 1 when a log still grows: the delete does not depend on it)
( cd "$OUT" && { tar czf logs.tgz --exclude=logs.tgz --exclude=info.json --exclude=summary.txt . 2>/dev/null
  find . -mindepth 1 -not -name logs.tgz -not -name info.json -not -name summary.txt -delete; } )
