#!/usr/bin/env bash
# The main job: sets everything up, builds, and runs it.
# Until the live-migration demo exists (issue: migration), the main job is the
# benchmark run, which prints BENCH lines (see docs/benchmarks.md).
# Usage: scripts/main.sh [bench filter]   (as root on a fresh Debian 12 machine)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec bench/run.sh "$@"
