#!/usr/bin/env bash
# Sets everything up and runs every vhostkit test:
#   1. the release build (RelWithDebInfo, warnings as errors) and its tests, among them
#      the packaging tests (ctest label "package", tests/package): install to a temporary
#      prefix, the example device built out of tree with CMake and pkg-config, the Debian
#      packages built and installed into a clean root, the systemd units, the libvirt
#      examples, and the example device under QEMU (rng.qemu_*),
#   2. the ASan+UBSan build and the same tests (but the packaging ones) under the sanitizers,
#   3. the clang-14 libFuzzer build, each fuzz target for $VHOSTKIT_FUZZ_SECONDS (60),
# and prints ctest's summary of the release run last. Exits non-zero if anything failed.
# Usage: scripts/test.sh   (as root on a fresh Debian 12 machine)
set -uo pipefail
cd "$(dirname "$0")/.."

fuzz_seconds=${VHOSTKIT_FUZZ_SECONDS:-60}
status=0
log_dir=build/test-logs
step() { echo; echo "==== $* ===="; }

step "setup"
scripts/setup.sh || exit 1
mkdir -p "$log_dir"

build() {  # build <preset> [cmake args...]
  local preset=$1; shift
  cmake --preset "$preset" -DVHOSTKIT_WERROR=ON "$@" >"$log_dir/configure-$preset.log" 2>&1 &&
    cmake --build --preset "$preset" >"$log_dir/build-$preset.log" 2>&1
  local rc=$?
  if ((rc != 0)); then
    echo "build of preset $preset FAILED; last lines of the log:"
    tail -n 40 "$log_dir/configure-$preset.log" "$log_dir/build-$preset.log"
  fi
  return $rc
}

step "sanitizers: ASan + UBSan build and tests"
if build asan; then
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    ctest --preset asan -j2 >"$log_dir/ctest-asan.log" 2>&1
  if [[ $? -ne 0 ]]; then status=1; tail -n 200 "$log_dir/ctest-asan.log"; fi
  grep -E "tests passed|tests failed" "$log_dir/ctest-asan.log" | tail -n 1
else
  status=1
fi

step "fuzz: clang-14 libFuzzer targets, ${fuzz_seconds}s each"
if build fuzz -DVHOSTKIT_FUZZ_SECONDS="$fuzz_seconds"; then
  ctest --preset fuzz >"$log_dir/ctest-fuzz.log" 2>&1
  if [[ $? -ne 0 ]]; then status=1; tail -n 200 "$log_dir/ctest-fuzz.log"; fi
  grep -E "Passed|Failed|tests passed|tests failed" "$log_dir/ctest-fuzz.log" | tail -n 20
else
  status=1
fi

step "release build and tests"
if build release; then
  ctest --preset release -j2
  [[ $? -eq 0 ]] || status=1
else
  status=1
fi

if ((status != 0)); then
  echo "scripts/test.sh: FAILURES above (the release summary is the last block)" >&2
fi
exit $status
