#!/usr/bin/env bash
# Unpacks Debian 12's builds of the libraries lightning.cpp needs besides libtorch (and of their
# libraries that Ubuntu 24.04 lacks) into a prefix, installing nothing: for building against a
# PyTorch wheel on a machine where they cannot be installed (no root, or no network: make the
# prefix on a Debian 12 machine, copy it over). Needs apt-get, not root.
#   scripts/deps-prefix.sh .deps
#   DEPS_PREFIX=$PWD/.deps/usr scripts/build-cuda.sh -DLIGHTNING_TESTS=ON
# A name ending in .tar.xz gets the prefix packed (54 MB unpacked, 13 MB packed), for copying;
# scripts/gpu-check.sh unpacks it (DEPS=FILE).
set -euo pipefail
target=${1:?usage: scripts/deps-prefix.sh DIR|FILE.tar.xz}
dir=$target
if [[ $target == *.tar.xz ]]; then dir=$(mktemp -d); fi
packages=(
  libfmt-dev libfmt9 libspdlog-dev libspdlog1.10 libtomlplusplus-dev libtomlplusplus3
  nlohmann-json3-dev libcli11-dev libstb-dev libstb0
  libicu-dev libicu72 zlib1g-dev libpng-dev libpng16-16
  libjpeg62-turbo-dev libjpeg62-turbo libwebp-dev libwebp7 libwebpmux3 libwebpdemux2
  libarchive-dev libarchive13 libxml2 libnettle8
  libgtest-dev libgmock-dev  # the tests (-DLIGHTNING_TESTS=ON)
)
debs=$(mktemp -d)
trap 'rm -rf "$debs"; [[ $dir == "$target" ]] || rm -rf "$dir"' EXIT
(cd "$debs" && apt-get download -qq "${packages[@]}" 2>&1 | grep -v "unsandboxed" || true)
for p in "${packages[@]}"; do
  ls "$debs/${p}_"*.deb >/dev/null 2>&1 || { echo "deps-prefix.sh: could not download $p" >&2; exit 1; }
done
mkdir -p "$dir"
for deb in "$debs"/*.deb; do dpkg-deb -x "$deb" "$dir"; done
rm -rf "$dir/usr/share/doc" "$dir/usr/share/man" "$dir/usr/share/lintian"
# Shared libraries only (GoogleTest ships static ones alone): the prefix stays under 64 MiB.
find "$dir" -name '*.a' ! -name 'libgtest*' ! -name 'libgmock*' -delete
if [[ $dir != "$target" ]]; then
  tar -C "$dir" -cJf "$target.tmp" . && mv "$target.tmp" "$target"
  echo "$(du -sh "$target" | cut -f1) in $target: DEPS=$target scripts/gpu-check.sh"
else
  echo "$(du -sh "$dir" | cut -f1) in $dir: DEPS_PREFIX=$(cd "$dir" && pwd)/usr"
fi
