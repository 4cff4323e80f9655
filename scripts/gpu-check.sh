#!/usr/bin/env bash
# The checks for a machine with a CUDA GPU, in one go; docs/benchmarks.md records their numbers.
#  1. Builds build-cuda/lightning against the PyTorch wheel (scripts/build-cuda.sh; its cmake
#     output says whether the NCCL path is compiled in, and why not). Where src/dist/group.cpp
#     does not compile against that libtorch with NCCL, it builds again without (the log says).
#  2. TESTS=1: also builds the tests there and runs those that exercise CUDA (TEST_FILTER).
#  3. SMOKE=1 (default): the whole SDXL recipe on the tiny SDXL-shaped pipeline on the GPU, about
#     a minute: the trainer's CUDA path end to end before the long run.
#  4. The distillation dry run of full-size SDXL (random weights) on the GPU: every stage and
#     phase of RECIPE (recipes/sdxl-lightning.toml), ITERATIONS (5) each, IMAGE (1024) pixels,
#     BATCH (1) images, bf16 autocast; seconds per iteration, images/s and peak GPU memory per
#     phase, and nvidia-smi's memory and load every 2 s (nvidia-smi.csv).
#  5. STAGE_BATCH=N: then one stage of the recipe (STAGE, default 2) at batch N, if time is left.
# BUDGET=SECONDS bounds the whole script: the dry run is stopped at it, and its metrics so far
# (metrics.jsonl, a line per iteration) are kept. Logs and tables go to OUT (default gpu-check/).
# Where the GPU machine lacks the other libraries, make them on Debian 12 first
# (scripts/deps-prefix.sh .deps.tar.xz) and pass the file or an unpacked prefix as DEPS; CXX
# picks the compiler as usual.
#   DEPS=.deps.tar.xz CXX=g++-13 BUDGET=560 scripts/gpu-check.sh
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
  for multiarch in "$DEPS_PREFIX"/lib/*-linux-gnu; do  # x86_64-linux-gnu, aarch64-linux-gnu
    if [[ -d $multiarch ]]; then
      export LD_LIBRARY_PATH=$multiarch${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    fi
  done
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  ${PYTHON:-python3} -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
} | tee "$out/gpu.txt"

budget=${BUDGET:-0}
left() { echo $((budget - SECONDS)); }  # seconds left of BUDGET
# Runs "$@" within what BUDGET leaves (less 15 s for what follows it) and at most CAP seconds
# (0: no cap); with nothing left, says so and returns 124 without starting it.
within() {
  local limit=$1
  shift
  if ((budget > 0)); then
    local rest=$(($(left) - 15))
    if ((rest <= 0)); then
      echo "no time left of BUDGET=$budget for: $*" >&2
      return 124
    fi
    if ((limit == 0 || rest < limit)); then limit=$rest; fi
  fi
  if ((limit > 0)); then timeout --signal=INT --kill-after=10 "$limit" "$@"; else "$@"; fi
}
step() { echo "== $1 ($(date +%T), ${SECONDS} s)"; }
step "build"
tests=OFF target=lightning
if [[ ${TESTS:-0} == 1 ]]; then tests=ON target="lightning lightning_tests"; fi
build() { TARGET=$target scripts/build-cuda.sh -DLIGHTNING_TESTS=$tests "$@"; }
if ! build -DLIGHTNING_WITH_NCCL=ON >"$out/build.log" 2>&1; then
  # NCCL's part failed: group.cpp did not compile, or the configure-time header check broke.
  if grep -qE "FAILED: .*src/dist/group\.cpp\.o|src/dist/group\.cpp:[0-9]+:[0-9]+: error|nccl_check/" \
    "$out/build.log"; then
    cp "$out/build.log" "$out/build-with-nccl.log"
    echo "the build with NCCL failed ($out/build-with-nccl.log); again without"
    build -DLIGHTNING_WITH_NCCL=OFF >"$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
  else
    tail -40 "$out/build.log"
    exit 1
  fi
fi
grep -E "libtorch with CUDA|NCCL" "$out/build.log" || true

if [[ $tests == ON ]]; then
  step "tests"
  LIGHTNING_TEST_TMP=/tmp/lightning-tests build-cuda/tests/lightning_tests \
    --gtest_filter="${TEST_FILTER:-*Cuda*:*CUDA*:Cli.DistillDevice*:SdxlLightningRecipe.*}" \
    2>&1 | tee "$out/tests.log" | grep -E "^\[  (PASSED|FAILED|SKIPPED) |tests ran" || true
fi

recipe=${RECIPE:-recipes/sdxl-lightning.toml}
if [[ ${SMOKE:-1} == 1 ]]; then
  step "tiny SDXL distillation on the GPU"
  within 180 build-cuda/lightning bench --distill tiny-sdxl --recipe "$recipe" --image 64 \
    --iterations 2 --device cuda --mixed-precision bf16 >"$out/tiny-distill.log" 2>&1 ||
    echo "tiny SDXL distillation failed (exit $?)"
  tail -25 "$out/tiny-distill.log"
fi

step "distillation dry run"
work=/tmp/lightning-distill-bench
rm -rf "$work"
nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv -l 2 \
  >"$out/nvidia-smi.csv" 2>/dev/null &
sampler=$!
status=0
within 0 build-cuda/lightning bench --distill sdxl --recipe "$recipe" --image "${IMAGE:-1024}" \
  --iterations "${ITERATIONS:-5}" --batch "${BATCH:-1}" --device cuda --mixed-precision bf16 \
  --work-dir "$work" >"$out/distill-bench.log" 2>&1 || status=$?
kill "$sampler" 2>/dev/null || true
tail -40 "$out/distill-bench.log"
cp "$work/run/metrics.jsonl" "$out/" 2>/dev/null || true

# 5. STAGE_BATCH=N: then one stage (STAGE, default 2: the first adversarial one) at batch N, 3
#    iterations per phase, if BUDGET leaves the time (3 minutes or more): how images/s and
#    memory grow with the batch.
if [[ -n ${STAGE_BATCH:-} ]] && { ((budget == 0)) || (($(left) >= 180)); }; then
  step "stage ${STAGE:-2} at batch $STAGE_BATCH"
  rm -rf "$work"
  within 0 build-cuda/lightning bench --distill sdxl --recipe "$recipe" --stages "${STAGE:-2}" \
    --image "${IMAGE:-1024}" --iterations 3 --batch "$STAGE_BATCH" --device cuda \
    --mixed-precision bf16 --work-dir "$work" >"$out/stage-batch.log" 2>&1 ||
    echo "stage ${STAGE:-2} at batch $STAGE_BATCH: exit $?"
  tail -8 "$out/stage-batch.log"
  cp "$work/run/metrics.jsonl" "$out/stage-batch-metrics.jsonl" 2>/dev/null || true
fi
step "done (dry run exit $status)"
