#!/usr/bin/env bash
# Sets up a Debian 12 machine for lightning.cpp and builds it: installs the Debian packages it
# needs (only the missing ones; silent when everything is there), configures and builds
# build/lightning and the tests.
#   scripts/setup.sh            # install + build (Release)
#   BUILD_DIR=build-debug BUILD_TYPE=Debug scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  build-essential cmake ccache pkg-config
  libtorch-dev          # libtorch 1.13 (CPU)
  libgloo-dev           # the headers of libtorch's Gloo process group (data-parallel distill)
  libopenblas0-pthread  # fast BLAS behind libtorch's f32 matmul (the reference BLAS is ~50x slower)
  nlohmann-json3-dev libcli11-dev libfmt-dev libspdlog-dev
  libicu-dev zlib1g-dev # CLIP tokenizer: Unicode case mapping and regex; the .gz vocabulary
  dataset-fashion-mnist # the built-in training data (IDX files)
  libpng-dev            # PNG images with text metadata
  libjpeg-dev libwebp-dev libarchive-dev  # training data: JPEG/WebP images in WebDataset tar shards
  libtomlplusplus-dev   # training recipes (TOML)
  libstb-dev            # stb_easy_font: labels of loss-curve plots
  libgtest-dev libgmock-dev
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""
  if [[ $(id -u) -ne 0 ]]; then sudo="sudo"; fi
  echo "setup: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

build_dir=${BUILD_DIR:-build}
if [[ ! -f "$build_dir/CMakeCache.txt" ]]; then
  cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE="${BUILD_TYPE:-Release}" >/dev/null
fi
cmake --build "$build_dir" -j"$(nproc)"
