#!/usr/bin/env bash
# Installs every Debian package vhostkit's build, tests and benchmarks need.
# Idempotent: does nothing (and needs no network) when everything is installed.
# Usage: scripts/setup.sh   (as root on Debian 12)
set -euo pipefail

packages=(
  # toolchain
  cmake ninja-build g++ pkg-config python3 git
  clang-14 libclang-rt-14-dev llvm-14
  # libraries
  libexpected-dev libfmt-dev libcli11-dev liburing-dev
  # tests and benchmarks; gcovr: the coverage report of scripts/test.sh
  libgtest-dev libgmock-dev librapidcheck-dev libbenchmark-dev gcovr
  # packaging and its tests (tests/package): cpack's dpkg-shlibdeps, the example's
  # Makefile, systemd-socket-activate and systemd-analyze, man page rendering
  dpkg-dev file make systemd groff-base
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if ((${#missing[@]} == 0)); then
  echo "setup: all ${#packages[@]} packages already installed"
  exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
  echo "setup: missing packages: ${missing[*]}" >&2
  echo "setup: run as root (or with sudo) to install them" >&2
  exit 1
fi

echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "setup: done"
