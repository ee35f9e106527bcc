#!/usr/bin/env bash
# ctest `kit_sim` (label kit): packs a quick GPU kit from this build tree (scripts/gpu-check --prepare with
# DTRAIN_KIT_NO_BUILD=1: the binaries as built, the headers and commands of their build) and runs
# scripts/gpu-kit-sim --preprocess-only on it: with the Debian -dev packages hidden, the kit's dtrain starts and
# trains a CPU job in two workers, the gpu tests skip with exit 77, gpu-check ends with its summary, and every
# compile command finds its headers in the kit. Skips (77) without nvcc, root or unshare.
#   tests/kit_sim_test.sh BUILD_DIR SOURCE_DIR
set -uo pipefail
build=$1 src=$2
command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ] || { echo "skipped: no nvcc"; exit 77; }
[ "$(id -u)" -eq 0 ] || { echo "skipped: unshare -m needs root"; exit 77; }
unshare -m true 2>/dev/null || { echo "skipped: unshare -m is not available here"; exit 77; }
[ -f "$build/build.ninja" ] || { echo "skipped: the kit is packed from a Ninja build"; exit 77; }
kit=$(mktemp -d /tmp/dtrain-kit-test-XXXXXX)
# gpu-check's logs go beside the kit, not to /tmp/gpu-check-*.log, so the test leaves nothing behind.
export DTRAIN_GPU_CHECK_LOGDIR=$kit.logs
trap 'rm -rf "$kit" "$kit.tar.gz" "$kit.logs"' EXIT  # --prepare writes the archive beside the folder
DTRAIN_KIT_NO_BUILD=1 DTRAIN_KIT_BUILD_DIR=$build "$src/scripts/gpu-check" --prepare "$kit" || exit 1
"$src/scripts/gpu-kit-sim" "$kit" --preprocess-only
