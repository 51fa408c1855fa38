#!/bin/sh
# Per-build sandbox setup: sandoff vs bwrap --unshare-all, one run, as root.
# Needs /bin/busybox (busybox-static) and bwrap (apt-get install -y bubblewrap).
# Usage: bench/sandbox/setup/run.sh [runs]   (default 200)
set -eu
for p in bwrap busybox; do
    command -v "$p" >/dev/null || { echo "needs $p (apt-get install -y bubblewrap busybox-static)" >&2; exit 1; }
done
cd "$(dirname "$0")/../../.."
cargo build --release --example sandbox-setup
exec target/release/examples/sandbox-setup "${1:-200}"
