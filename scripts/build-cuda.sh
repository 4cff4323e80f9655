#!/usr/bin/env bash
# Builds build-cuda/lightning against the libtorch inside a CUDA-enabled PyTorch install (the
# pip wheel: torch.utils.cmake_prefix_path), for `--device cuda`. The other libraries come from
# the system (scripts/setup.sh installs them on Debian) or from DEPS_PREFIX.
#   scripts/build-cuda.sh                          # then: build-cuda/lightning generate --device cuda
#   PYTHON=/opt/venv/bin/python3 DEPS_PREFIX=/opt/deps/usr scripts/build-cuda.sh -DLIGHTNING_TESTS=ON
#   LD_LIBRARY_PATH=/opt/deps/usr/lib/x86_64-linux-gnu build-cuda/lightning ...  # with DEPS_PREFIX (x86-64)
# Extra arguments go to cmake's configure step; TARGET (default lightning) picks what to build
# (several: "lightning lightning_tests").
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
torch_prefix=$("$python" -c 'import torch; print(torch.utils.cmake_prefix_path)')
"$python" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)' ||
  echo "warning: $python's torch has no CUDA; build-cuda/lightning will run on the CPU only" >&2
# NCCL's headers for several ranks on GPUs: the nvidia-nccl package beside the wheel, if any
# (else CMake looks in the system's paths, where libnccl-dev puts them).
nccl_root=$("$python" - <<'EOF' 2>/dev/null || true
import importlib.util, pathlib
spec = importlib.util.find_spec("nvidia")
for top in (spec.submodule_search_locations if spec else []):
    for header in sorted(pathlib.Path(top).glob("**/include/nccl.h")):
        print(header.parent.parent)
        raise SystemExit
EOF
)
nccl_version=$("$python" -c 'import torch; print(".".join(map(str, torch.cuda.nccl.version())))' \
  2>/dev/null || true)
if [[ -n ${DEPS_PREFIX:-} ]]; then
  # Debian keeps some headers in a multiarch folder (libjpeg's jconfig.h, which sets its
  # version): take those from the prefix too, not the machine's own (with Ubuntu's, the
  # program stopped at "Wrong JPEG library version: library is 62, caller expects 80").
  for multiarch in "$DEPS_PREFIX"/include/*-linux-gnu; do
    if [[ -d $multiarch ]]; then export CPATH=$multiarch${CPATH:+:$CPATH}; fi
  done
fi
generator=()
if command -v ninja >/dev/null; then generator=(-G Ninja); fi
cmake -S . -B build-cuda "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="${torch_prefix}${DEPS_PREFIX:+;$DEPS_PREFIX}" \
  ${nccl_root:+-DNCCL_ROOT="$nccl_root"} ${nccl_version:+-DNCCL_EXPECTED_VERSION="$nccl_version"} \
  -DLIGHTNING_TESTS=OFF "$@"
read -ra targets <<<"${TARGET:-lightning}"  # one or more, space-separated
cmake --build build-cuda -j"$(nproc)" --target "${targets[@]}"
