#!/bin/sh
# Per-build sandbox setup: sandoff vs bwrap --unshare-all, one run, as root.
# Needs /bin/busybox (busybox-static) and bwrap (apt-get install -y bubblewrap).
# Usage: bench/sandbox/setup/run.sh [runs]   (default 200)
set -eu
cd "$(dirname "$0")/../../.."
cargo build --release --example sandbox-setup
exec target/release/examples/sandbox-setup "${1:-200}"
