#!/usr/bin/env bash
# Runs sandoff's whole test suite. On a fresh Debian 12 machine as root it
# first installs what the tests need: Nix 2.8 (the oracle), busybox, sqlite3,
# Guile (the oracle for machines.scm), OpenSSL headers (for libssh2), sshd and
# iproute2 (test build hosts, some in network namespaces), openssl (a test
# certificate for the coordinator), gcc and libc6-dev
# (static probes compiled for the sandbox tests), chromium (headless, for the
# coordinator's web page), postgresql (the coordinator's datastore tests run
# against SQLite and a private PostgreSQL server started below).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(nix-bin busybox-static sqlite3 pkg-config libssl-dev openssl jq guile-3.0 openssh-server iproute2 gcc libc6-dev tmux curl bc chromium postgresql)
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    missing=()
    for p in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
else
    echo "not root or no apt-get: not installing ${packages[*]}; tests needing them print SKIP" >&2
fi

# A real guix-daemon 1.4.0 for the hook tests, built once from the kit in
# ../shared (with the Guile client modules it needs) and cached.
kit_script=../shared/guix-daemon/build.sh
export SANDOFF_GUIX_KIT=${SANDOFF_GUIX_KIT:-/var/tmp/guix-kit}
if [ "$(id -u)" = 0 ] && [ -f "$kit_script" ]; then
    bash "$kit_script" "$SANDOFF_GUIX_KIT" >/dev/null
else
    echo "no $kit_script or not root: not building guix-daemon; its tests print SKIP" >&2
fi

cargo build --locked --all-targets
# The fuzz targets (cargo-fuzz crate) must keep compiling against the library.
cargo check --quiet --manifest-path fuzz/Cargo.toml
# --all-targets: unit, integration and bin tests (there are no doc-tests), so
# the last result line is a real suite, not an empty doc-test run.
log=$(mktemp)
# shellcheck source=scripts/lib/postgres.sh
. scripts/lib/postgres.sh
cleanup() {
    pg_private_stop
    rm -f "$log"
}
trap cleanup EXIT
# The coordinator's datastore tests run against SQLite and PostgreSQL: a
# private server for this run, unless SANDOFF_TEST_POSTGRES names one.
if [ -z "${SANDOFF_TEST_POSTGRES:-}" ] && ! pg_private_start; then
    echo "not root or no PostgreSQL 15: not starting a server; the PostgreSQL datastore tests print SKIP" >&2
fi
status=0
cargo test --locked --no-fail-fast --all-targets 2>&1 | tee "$log" || status=$?
# One plain closing line over every test binary. Skipped: tests that printed
# `SKIP <test>: needs <x>` (never under CI=true); ignored: measurements,
# which are run on purpose (`-- --ignored`), not checks.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1); if ($i ~ /^ignored;?$/) g += $(i-1) } }
     /^SKIP / { s++ }
     END { printf "%d passed, %d failed, %d skipped, %d ignored (measurements)\n", p, f, s, g }' "$log"
exit "$status"
