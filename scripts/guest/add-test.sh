#!/usr/bin/env bash
# Makes a guest initramfs that runs a test script: the base initramfs with a second cpio
# archive appended that holds the script as /test.sh.
# Usage: scripts/guest/add-test.sh <base initramfs.cpio> <test script> <output.cpio>
set -euo pipefail
base=$1 script=$2 outp=$3
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
install -m 755 "$script" "$tmp/test.sh"
cat "$base" > "$outp"
(cd "$tmp" && echo test.sh | cpio -o -H newc --quiet) >> "$outp"
