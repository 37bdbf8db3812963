#!/usr/bin/env bash
# tools/gpu_kit.sh — packs lancet for a GPU machine that has CUDA but none of our other
# dependencies and no package access (the `device` machine of this workplace: an H200 with
# nvcc, cmake, ninja and a Python whose `nvidia` packages hold cuDNN, cuBLAS and NCCL, but no
# OpenCV, HDF5, BLAS, Open MPI or GoogleTest).
#
#   tools/gpu_kit.sh          build (BUILD_DIR, default build-gpu) and pack .gpukit/kit.tar.xz
#
# The build is Release, CUDA for CUDA_ARCH (default 90: H100/H200), without MPI (KIT_MPI=ON to
# keep it: a machine without mpirun cannot use it, and Open MPI's libraries cost kit space;
# NCCL still runs single-process there), with -march=x86-64-v3
# instead of -march=native (the GPU machine's CPU is not this one). Built: bin/lancet, every
# tests/test_gpu_*.cpp binary (the CPU suite is CI's) and the kernel lab's lab_* binaries
# (kernels/lab/*.cu, target kernel_lab). Packed: those
# binaries and the closure of the shared libraries they load (`ldd`), except glibc (the GPU
# machine's own, which must be at least as new as the one here) and the CUDA libraries the GPU
# machine provides itself (driver, cuDNN, cuBLAS/cuBLASLt, NCCL, NVRTC: from its pip `nvidia`
# packages). tools/gpu_session.sh, run there from the repository root with .gpukit carried,
# unpacks it and runs the GPU tests, compute-sanitizer and the benchmarks.
#
# The test binaries have this checkout's absolute paths compiled in (LANCET_SOURCE_DIR,
# LANCET_BINARY_DIR); .gpukit/paths records them and gpu_session.sh makes them resolve there.
# .gpukit/ and build-gpu/ are ignored by git; carry .gpukit (it must stay under the carry limit,
# 64 MiB with the working tree; this script fails above KIT_MAX_MB, default 56).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD_DIR=${BUILD_DIR:-build-gpu}
KIT=${KIT_DIR:-.gpukit}
CUDA_ARCH=${CUDA_ARCH:-90}
JOBS=${JOBS:-$(nproc)}
KIT_MAX_MB=${KIT_MAX_MB:-56}

command -v nvcc >/dev/null || export PATH=/usr/local/cuda/bin:$PATH
cmake -S "$ROOT" -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLANCET_NATIVE=OFF \
  -DCMAKE_CXX_FLAGS="-march=x86-64-v3" -DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCH" -DLANCET_TESTS=ON \
  -DLANCET_MPI="${KIT_MPI:-OFF}" >/dev/null
grep -q "LANCET_WITH_CUDA" "$BUILD_DIR/build.ninja" ||
  { echo "gpu_kit: CUDA was not found (nvcc on PATH?): a kit without CUDA is useless" >&2; exit 1; }

targets=(lancet)
for f in tests/test_gpu_*.cpp; do targets+=("$(basename "$f" .cpp)"); done
for f in kernels/lab/*.cu; do targets+=("lab_$(basename "$f" .cu)"); done
cmake --build "$BUILD_DIR" -j "$JOBS" --target "${targets[@]}"

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/bin" "$stage/kitlib"
for t in "${targets[@]}"; do cp "$BUILD_DIR/bin/$t" "$stage/bin/"; done

# Shared-library closure. Left out: glibc's own libraries and the dynamic loader, the CUDA
# driver, and the CUDA libraries the GPU machine's Python packages provide.
skip='^(linux-vdso|ld-linux|libc\.so|libm\.so|libmvec|libpthread|libdl\.so|librt\.so|libutil\.so|libresolv|libcuda\.so|libcudnn|libcublas|libcublasLt|libnccl|libnvrtc|libnvJitLink)'
declare -A seen=()
for b in "$stage"/bin/*; do
  while read -r name _ path _; do
    [[ "$path" == /* ]] || continue
    [[ "$name" =~ $skip ]] && continue
    [[ -n "${seen[$name]:-}" ]] && continue
    seen[$name]=1
    cp -L "$path" "$stage/kitlib/$name"
  done < <(ldd "$b")
done
# Debian's liblapack.so.3 (openblas-pthread) is a second copy of OpenBLAS's LAPACK; the
# libopenblas.so.0 beside it exports the same symbols, so a link to it saves ~2 MiB in the kit.
if [[ -f "$stage/kitlib/liblapack.so.3" && -f "$stage/kitlib/libopenblas.so.0" ]] &&
   nm -D --defined-only "$stage/kitlib/libopenblas.so.0" 2>/dev/null | grep -q " dgesv_$"; then
  ln -sf libopenblas.so.0 "$stage/kitlib/liblapack.so.3"
fi
missing=$(for b in "$stage"/bin/*; do ldd "$b" | grep "not found" || true; done | sort -u)
[[ -z "$missing" ]] || { echo "gpu_kit: unresolved libraries here: $missing" >&2; exit 1; }

mkdir -p "$KIT"
rm -f "$KIT"/kit.tar.xz
{
  echo "source_dir=$ROOT"
  echo "build_dir=$ROOT/$BUILD_DIR"
  echo "commit=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . 2>/dev/null || echo '+uncommitted')"
  echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ) on $(. /etc/os-release && echo "$PRETTY_NAME"), glibc $(ldd --version | head -1 | awk '{print $NF}')"
  echo "cuda_arch=$CUDA_ARCH"
  echo "nvcc=$(nvcc --version | tail -1)"
} >"$KIT/paths"
tar -C "$stage" -cf - bin kitlib | xz -T"$JOBS" -9e >"$KIT/kit.tar.xz"
mb=$(( $(stat -c %s "$KIT/kit.tar.xz") / 1048576 ))
echo "gpu_kit: $KIT/kit.tar.xz: ${#targets[@]} binaries, ${#seen[@]} libraries, $mb MiB"
cat "$KIT/paths"
(( mb <= KIT_MAX_MB )) || { echo "gpu_kit: the kit is $mb MiB, over KIT_MAX_MB=$KIT_MAX_MB" >&2; exit 1; }
# What travels to the device machine: the working tree (tracked files and untracked ones git
# does not ignore) plus the carried kit, 64 MiB at most.
tree=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 -r stat -c %s 2>/dev/null |
        awk '{s += $1} END {print int(s / 1048576)}')
echo "gpu_kit: working tree $tree MiB + kit $mb MiB = $((tree + mb)) MiB of the 64 MiB a device call may carry"
(( tree + mb < 64 )) || { echo "gpu_kit: over the 64 MiB a device call carries: shrink the kit or the tree" >&2; exit 1; }
