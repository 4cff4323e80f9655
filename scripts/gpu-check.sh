#!/usr/bin/env bash
# The checks for a machine with a CUDA GPU, in one go; docs/benchmarks.md records their numbers.
#  1. Builds build-cuda/lightning against the PyTorch wheel (scripts/build-cuda.sh; its cmake
#     output says whether the NCCL path is compiled in, and why not).
#  2. TESTS=1: also builds the tests there and runs those that exercise CUDA (TEST_FILTER).
#  3. The distillation dry run of full-size SDXL (random weights) on the GPU: every stage and
#     phase of recipes/sdxl-lightning.toml, ITERATIONS (5) each, IMAGE (1024) pixels, bf16
#     autocast; seconds per iteration, images/s and peak GPU memory per phase.
# Logs and the bench's table go to OUT (default gpu-check/). Where the GPU machine lacks the other
# libraries, make them on Debian 12 first (scripts/deps-prefix.sh .deps.tar.xz) and pass the file
# or an unpacked prefix as DEPS; CXX picks the compiler as usual.
#   DEPS=.deps.tar.xz CXX=/opt/gcc/bin/g++ scripts/gpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check}
mkdir -p "$out"
if [[ -n ${DEPS:-} ]]; then
  if [[ -f $DEPS ]]; then
    mkdir -p /tmp/lightning-deps && tar -C /tmp/lightning-deps -xf "$DEPS"
    export DEPS_PREFIX=/tmp/lightning-deps/usr
  else
    DEPS_PREFIX=$(cd "$DEPS" && pwd)/usr
    export DEPS_PREFIX
  fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"

step() { echo "== $1 ($(date +%T))"; }
step "build"
tests=OFF target=lightning
if [[ ${TESTS:-0} == 1 ]]; then tests=ON target="lightning lightning_tests"; fi
if ! TARGET=$target scripts/build-cuda.sh -DLIGHTNING_TESTS=$tests >"$out/build.log" 2>&1; then
  tail -40 "$out/build.log"
  exit 1
fi
grep -E "libtorch with CUDA|NCCL" "$out/build.log" || true

if [[ $tests == ON ]]; then
  step "tests"
  LIGHTNING_TEST_TMP=/tmp/lightning-tests build-cuda/tests/lightning_tests \
    --gtest_filter="${TEST_FILTER:-*Cuda*:*CUDA*:Cli.DistillDevice*:Dist.*:SdxlLightningRecipe.*}" \
    2>&1 | tee "$out/tests.log" | grep -E "^\[  (PASSED|FAILED|SKIPPED) |tests ran" || true
fi

step "distillation dry run"
build-cuda/lightning bench --distill sdxl --image "${IMAGE:-1024}" --iterations "${ITERATIONS:-5}" \
  --device cuda --mixed-precision bf16 --work-dir /tmp/lightning-distill-bench 2>&1 |
  tee "$out/distill-bench.log"
step "done"
