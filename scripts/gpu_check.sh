#!/usr/bin/env bash
# scripts/gpu_check.sh OUT [BASE_DIR]: one device call that checks a change when device time is short:
# the whole suite (not huge) and compute-sanitizer memcheck over the CUDA tests at once (correctness
# only: they share the GPU), then the headline rows beside BASE_DIR's (scripts/compare.sh, one repeat)
# alone on the GPU. geokern._C comes prebuilt (.carry/_C.abi3.so, built against the device's torch).
set -uo pipefail
OUT=$1; BASE=${2:-}
export PYTHONUNBUFFERED=1 GEOKERN_AUTOTUNE=0
cp .carry/_C.abi3.so geokern/ && GEOKERN_BUILD_CUDA=0 python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
python3 -c "import geokern, json; print(json.dumps(geokern.info()))" | tee "$OUT/info.json"
t0=$SECONDS
JOBS=9 STEPS="tests" BENCH=0 bash scripts/gpu.sh "$OUT/tests" >/dev/null 2>&1 &
tp=$!
JOBS=6 STEPS="sanitizer" BENCH=0 bash scripts/gpu.sh "$OUT/sanitizer" >/dev/null 2>&1 &
sp=$!
wait $tp; trc=$?; wait $sp; src=$?
echo "tests exit $trc, sanitizer exit $src, $((SECONDS - t0)) s"
grep -hE "passed|failed|^FAILED|^ERROR|ERROR SUMMARY" "$OUT"/tests/gpu.log "$OUT"/sanitizer/gpu.log | cut -c1-240 | tail -40
if [ -n "$BASE" ]; then
  unset GEOKERN_AUTOTUNE
  bash scripts/compare.sh "$BASE" "$OUT" "${REPEATS:-1}" 2>&1 | grep -v '^{' | tail -30
fi
