#!/usr/bin/env bash
# tools/dev.sh — the quick start. On a fresh Debian 12 machine:
#   tools/dev.sh train   installs what is missing, builds, runs the default training job
#   tools/dev.sh test    installs what is missing, builds, runs the whole test suite
#                        (Release build with CUDA when nvcc is present, then an
#                        ASan+UBSan build of the CPU tests)
#   tools/dev.sh deps    only installs the Debian packages
#   tools/dev.sh build   installs and builds (build/bin/lancet)
# Environment: BUILD_DIR (default build), JOBS (default nproc), LANCET_CMAKE_ARGS (extra
# cmake arguments, e.g. -DLANCET_CUDA=OFF), SKIP_DEPS=1 to skip apt-get, SKIP_SANITIZE=1,
# ASAN_MPI=1 (the sanitizer pass with MPI and the mpirun tests; about 3 minutes more).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD_DIR=${BUILD_DIR:-build}
JOBS=${JOBS:-$(nproc)}

PACKAGES=(build-essential cmake ninja-build pkg-config git
          libopenblas-dev libopencv-core-dev libopencv-imgproc-dev libopencv-imgcodecs-dev
          libhdf5-dev libyaml-cpp-dev nlohmann-json3-dev libcli11-dev libgtest-dev libdcmtk-dev zlib1g-dev
          openmpi-bin libopenmpi-dev python3 python3-pip)

deps() {
  [[ "${SKIP_DEPS:-0}" == 1 ]] && return
  local missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    echo "dev.sh: installing ${missing[*]}"
    local sudo=""
    [[ $(id -u) != 0 ]] && sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

test_deps() {
  [[ "${SKIP_DEPS:-0}" == 1 ]] && return
  # Test-only Python tools: h5py (the interchange tests check files with an independent HDF5
  # reader) and tensorboard (the event files are read back with TensorBoard's own reader).
  # Tests that need them skip with a message when they are missing.
  local py=()
  python3 -c "import h5py" 2>/dev/null || py+=(h5py numpy)
  python3 -c "import tensorboard" 2>/dev/null || py+=(tensorboard)
  if ((${#py[@]})); then
    python3 -m pip install -q "${py[@]}" 2>/dev/null ||
      python3 -m pip install -q --break-system-packages "${py[@]}" 2>/dev/null ||
      echo "dev.sh: could not pip install ${py[*]}; the tests that use them will be skipped"
  fi
}

configure_build() {  # dir, extra cmake args...
  local dir=$1; shift
  cmake -S "$ROOT" -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release ${LANCET_CMAKE_ARGS:-} "$@" >/dev/null
  cmake --build "$dir" -j "$JOBS"
}

case "${1:-}" in
  deps) deps ;;
  build) deps; configure_build "$BUILD_DIR" ;;
  train)
    deps
    configure_build "$BUILD_DIR" -DLANCET_TESTS=OFF
    shift
    exec "$BUILD_DIR/bin/lancet" train "$@"
    ;;
  test)
    deps
    test_deps
    configure_build "$BUILD_DIR"
    # The kernel lab is not in `all`; compiled here (CUDA builds; ~10 s of nvcc) so it cannot
    # rot. It runs only on a GPU (tools/gpu_session.sh lab).
    cmake --build "$BUILD_DIR" -j "$JOBS" --target kernel_lab
    (cd "$BUILD_DIR" && ctest --output-on-failure -j "$JOBS")
    if [[ "${SKIP_SANITIZE:-0}" != 1 ]]; then
      echo "dev.sh: AddressSanitizer + UndefinedBehaviorSanitizer build of the CPU tests"
      # -O1 -g1 (line tables), as the sanitizer docs advise: a third of -O2 -g's compile time
      # (the test bodies at -O0: tests/CMakeLists.txt).
      # Without MPI by default (CI time); ASAN_MPI=1 adds comm/mpi and the mpirun tests:
      # LeakSanitizer then skips Open MPI's init-time allocations (tests/lsan.supp), Open MPI
      # must not dlclose its components (or the reports lose their stacks), and the MPI tests
      # unwind slowly (full stacks, so the suppressions match frames inside Open MPI).
      local_mpi='\.mpi\.|^Ddp\.|Mpirun|OneAndTwoRanks|BenchComm|^GradSync\.'
      supp="$ROOT/tests/lsan.supp"
      if [[ "${ASAN_MPI:-0}" == 1 ]]; then mpi=ON; else mpi=OFF; fi
      configure_build "$BUILD_DIR-asan" -DLANCET_SANITIZE=ON -DLANCET_CUDA=OFF -DLANCET_MPI=$mpi \
        -DCMAKE_BUILD_TYPE=RelWithDebInfo "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -g1"
      (cd "$BUILD_DIR-asan" && export OMPI_MCA_mca_base_component_disable_dlclose=1 UBSAN_OPTIONS=print_stacktrace=1 &&
        if [[ $mpi == ON ]]; then
          ASAN_OPTIONS=detect_leaks=1:fast_unwind_on_malloc=0 \
            LSAN_OPTIONS="suppressions=$supp:print_suppressions=0:fast_unwind_on_malloc=0" \
            ctest --output-on-failure -j "$JOBS" -L cpu -LE slow -R "$local_mpi"
        fi &&
        ASAN_OPTIONS=detect_leaks=1 LSAN_OPTIONS="suppressions=$supp:print_suppressions=0" \
          ctest --output-on-failure -j "$JOBS" -L cpu -LE slow -E "$local_mpi")
    fi
    ;;
  *)
    sed -n '2,12p' "$0"
    exit 2
    ;;
esac
