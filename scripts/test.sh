#!/usr/bin/env bash
# Sets everything up and runs every vhostkit test:
#   1. the ASan+UBSan build and the fast tests under the sanitizers,
#   2. the ThreadSanitizer build and the fast tests under it: every multi-threaded test
#      (queue workers, the back-end channel, migration, the daemons, reconnects) with
#      halt_on_error, so that one report fails the step (suppressions: tests/tsan.supp),
#   3. the coverage build (g++ --coverage), the fast tests, and gcovr's line and branch
#      coverage of src/; fails below the gate (VHOSTKIT_COVERAGE_GATE, in percent of lines),
#   4. the clang-14 libFuzzer build, each fuzz target for $VHOSTKIT_FUZZ_SECONDS (30; 60 before the
#      tsan and coverage steps came, cut to keep CI well under 45 minutes),
#   5. the release build (RelWithDebInfo, warnings as errors) and all its tests, among them
#      the packaging tests (ctest label "package", tests/package): install to a temporary
#      prefix, the example device built out of tree with CMake and pkg-config, the Debian
#      packages built and installed into a clean root, the systemd units, the libvirt
#      examples, and the example device under QEMU (rng.qemu_*),
# and prints ctest's summary of the release run last. "Fast tests": all but the ctest
# labels qemu (QEMU guests), interop (DPDK, QEMU peers) and package, which only the
# release build runs. Prints each step's wall time. Exits non-zero if anything failed.
# Usage: scripts/test.sh   (as root on a fresh Debian 12 machine)
set -uo pipefail
cd "$(dirname "$0")/.."

fuzz_seconds=${VHOSTKIT_FUZZ_SECONDS:-30}
# The gate: the line coverage measured when it was set (92.2%), rounded down. Never lower.
coverage_gate=${VHOSTKIT_COVERAGE_GATE:-92}
fast_only=(-LE 'qemu|interop|package')
status=0
log_dir=build/test-logs
step_name=""
step_start=0
step_end() {  # prints the wall time of the step that is ending
  if [[ -n $step_name ]]; then
    echo "---- $step_name: $((SECONDS - step_start)) s"
  fi
}
step() {
  step_end
  step_name=$*
  step_start=$SECONDS
  echo
  echo "==== $* ===="
}

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

step "sanitizers: ASan + UBSan build and the fast tests"
if build asan; then
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    ctest --preset asan -j2 "${fast_only[@]}" >"$log_dir/ctest-asan.log" 2>&1
  if [[ $? -ne 0 ]]; then status=1; tail -n 200 "$log_dir/ctest-asan.log"; fi
  grep -E "tests passed|tests failed" "$log_dir/ctest-asan.log" | tail -n 1
else
  status=1
fi

step "threads: ThreadSanitizer build and the fast tests"
if build tsan; then
  # exitcode 66: a test that only reports a race still fails. second_deadlock_stack: both
  # stacks of a lock-order report.
  # Left out, too: the inflight crash tests that fork their back-ends (InflightProperty,
  # Points/InflightCrash). Their front-end has threads when it forks, and TSan does not
  # support a child that starts threads after a multi-threaded fork: by default it kills
  # the child (exit 66), and with die_after_fork=0 the child can deadlock on a lock TSan
  # held at the fork (seen: one run in three hung). Under TSan, the inflight records with
  # a live worker, reset and disconnect run in Inflight.*, recovery in InflightQueue.*; a
  # back-end taking over from a dead one across processes does not (a gap; a TSan run of
  # the forked tests found the one race there, fixed in QueueRunner::start). The crash
  # tests run under ASan and in the release build.
  # Left out: four single-threaded model tests (rapidcheck, 300 cases each) that TSan has
  # nothing to check in and that take 9 of its 19 CPU minutes; the ASan and release runs
  # have them.
  TSAN_OPTIONS="halt_on_error=1 exitcode=66 second_deadlock_stack=1 suppressions=$PWD/tests/tsan.supp" \
    ctest --preset tsan -j2 "${fast_only[@]}" \
    -E '^(AddressSpaceModel\.|TranslateModel\.|IotlbLimit\.MillionEntries$|InflightProperty\.|Points/InflightCrash\.)' \
    >"$log_dir/ctest-tsan.log" 2>&1
  if [[ $? -ne 0 ]]; then status=1; tail -n 200 "$log_dir/ctest-tsan.log"; fi
  grep -E "tests passed|tests failed" "$log_dir/ctest-tsan.log" | tail -n 1
  reports=$(grep -c "WARNING: ThreadSanitizer" "$log_dir/ctest-tsan.log")
  echo "ThreadSanitizer reports: $reports"
  ((reports == 0)) || status=1
else
  status=1
fi

step "coverage: gcov build, the fast tests, line and branch coverage of src/"
if build coverage; then
  find build/coverage -name '*.gcda' -delete
  ctest --preset coverage -j2 "${fast_only[@]}" >"$log_dir/ctest-coverage.log" 2>&1
  if [[ $? -ne 0 ]]; then status=1; tail -n 200 "$log_dir/ctest-coverage.log"; fi
  grep -E "tests passed|tests failed" "$log_dir/ctest-coverage.log" | tail -n 1
  # Throw branches (exceptions from the standard library) and branches the compiler made
  # unreachable are not ours to cover.
  if ! gcovr --root . --filter 'src/' --exclude-throw-branches --exclude-unreachable-branches \
      --print-summary --txt "$log_dir/coverage.txt" --fail-under-line "$coverage_gate" \
      build/coverage 2>&1 | tee "$log_dir/gcovr.log" | grep -E "^(lines|branches):"; then
    status=1
  fi
  if grep -q "failed minimum line coverage" "$log_dir/gcovr.log" ||
    ! grep -q "^lines:" "$log_dir/gcovr.log"; then
    echo "coverage: below the gate of ${coverage_gate}% lines (per file: $log_dir/coverage.txt)"
    status=1
  fi
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
  # The build's time here; ctest's summary (last) gives the tests' own.
  echo "---- release build: $((SECONDS - step_start)) s"
  ctest --preset release -j2
  [[ $? -eq 0 ]] || status=1
else
  status=1
fi

if ((status != 0)); then
  echo "scripts/test.sh: FAILURES above (the release summary is the last block)" >&2
fi
exit $status
