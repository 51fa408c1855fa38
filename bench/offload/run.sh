#!/usr/bin/env bash
# Issue 5's benchmarks, in one run, as root, against test hosts on this
# machine (examples/testhosts.sh: real sshd on loopback addresses):
#  1. Copying one closure of 300 paths / ~500 MB (random data, each path
#     referring to the previous one) to a fresh host:
#       - sandoff: `sandoff copy --machines FILE --to MACHINE PATH...` to a
#         sandoff host (`sandoff serve`);
#       - Nix 2.8: `nix-copy-closure --to` a Nix host (`nix-store --serve
#         --write`) from a Nix store holding the same paths;
#       - raw ssh: `ssh host 'cat > /dev/null' < export` of the same bytes
#         (the `nix-store --export` stream of the closure).
#     Targets: sandoff >= 2x faster than nix-copy-closure, and >= 80% of raw
#     ssh's throughput.
#  2. 200 trivial derivations over 3 sandoff hosts x 2 slots with
#     `sandoff build --machines`, nothing built locally: the makespan against
#     the ideal bound, 200 x (one offloaded build's time) / 6. Target: within
#     1.3x of it.
# Usage: bench/offload/run.sh [copy|build|all (all)]
# Environment: BENCH_PATHS (300), BENCH_MB (500), BENCH_BUILDS (200),
#   BENCH_PORT (2222, on 127.0.0.31..35), SANDOFF (default: a release build
#   of this tree), BENCH_LOCAL_FLAGS (--max-jobs 0: how `sandoff build` is
#   told to build nothing locally), BENCH_KEEP=1 keeps the work directory.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
what=${1:-all}
[[ $what == copy || $what == build || $what == all ]] || { echo "usage: $0 [copy|build|all]" >&2; exit 2; }
npaths=${BENCH_PATHS:-300}
total_mb=${BENCH_MB:-500}
nbuilds=${BENCH_BUILDS:-200}
port=${BENCH_PORT:-2222}
read -ra local_flags <<<"${BENCH_LOCAL_FLAGS:---max-jobs 0}"
[[ $(id -u) == 0 ]] || { echo "needs root (sshd, sandbox)" >&2; exit 1; }
for p in nix-store nix-instantiate nix-copy-closure busybox jq bc sshd ssh; do
    command -v "$p" >/dev/null || {
        echo "needs $p (apt-get install nix-bin busybox-static jq bc openssh-server)" >&2
        exit 1
    }
done
. "$repo/bench/offload/lib.sh"
# Build users are system-wide: the local store and every host lock them in
# one directory (testhosts.sh passes this on to the hosts).
export SANDOFF_USER_POOL_DIR=${SANDOFF_USER_POOL_DIR:-/nix/var/sandoff/userpool}
work=$(mktemp -d /tmp/sandoff-bench-offload.XXXXXX)
hostdirs=()
cleanup() {
    local d
    for d in "${hostdirs[@]}"; do bash "$repo/examples/testhosts.sh" stop "$d" || true; done
    if [[ -n ${BENCH_KEEP:-} ]]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

# The local Nix: its own chroot store, offline.
export NIX_CONF_DIR=$work/nixconf
mkdir -p "$NIX_CONF_DIR" "$work/bb/bin"
cat >"$NIX_CONF_DIR/nix.conf" <<CONF
store = $work/nix
sandbox = true
substituters =
build-users-group =
experimental-features = nix-command
CONF
unset NIX_REMOTE
cp "$(command -v busybox)" "$work/bb/bin/busybox"
S=(--store-root "$work/s")
"$sandoff" "${S[@]}" setup --build-users-group sandoffbld >/dev/null
bbpath=$("$sandoff" "${S[@]}" store add "$work/bb")
"$sandoff" "${S[@]}" key show >"$work/client-key.pub"


# Starts N hosts of KIND numbered from FIRST in DIR with MAX_JOBS slots;
# sandoff hosts trust this store's key, this store trusts every host's key.
start_hosts() {
    local kind=$1 n=$2 first=$3 dir=$4 max_jobs=$5 h
    hostdirs+=("$dir")
    TESTHOSTS_KIND=$kind TESTHOSTS_FIRST=$first TESTHOSTS_PORT=$port TESTHOSTS_MAX_JOBS=$max_jobs \
        bash "$repo/examples/testhosts.sh" start "$n" "$dir" >/dev/null
    while read -r h _; do
        if [[ $kind == sandoff ]]; then
            "$sandoff" --store-root "$h/root" setup --build-users-group sandoffbld >/dev/null
            "$sandoff" --store-root "$h/root" key authorize "$work/client-key.pub" >>"$work/keys.log" 2>&1
        fi
        "$sandoff" "${S[@]}" key authorize "$h/signing-key.pub" >>"$work/keys.log" 2>&1
    done <"$dir/hosts"
}

# Instantiates derivations from FILE.nix with Nix and adds them to sandoff's
# store (the same .drv files); prints their paths.
add_drvs() {
    local nixfile=$1 d
    shift
    local drvs
    mapfile -t drvs < <(nix-instantiate "$nixfile" "$@" 2>/dev/null)
    nix show-derivation "${drvs[@]}" >"$work/drvs.json"
    for d in "${drvs[@]}"; do
        jq --arg d "$d" '.[$d]' "$work/drvs.json" | "$sandoff" "${S[@]}" derivation add >/dev/null
        echo "$d"
    done
}

salt=$(date +%s%N)

bench_copy() {
    local size=$((total_mb * 1024 * 1024 / npaths))
    echo "== making a closure of $npaths paths x $size bytes (random) in sandoff's store"
    cat >"$work/chain.nix" <<NIX
{ n, size }:
let
  bb = ./bb;
  link = i: prev: derivation {
    name = "chain-\${toString i}";
    system = builtins.currentSystem;
    builder = "\${bb}/bin/busybox";
    args = [ "sh" "-c" "\${bb}/bin/busybox mkdir \$out && \${bb}/bin/busybox head -c \${toString size} /dev/urandom > \$out/data && echo $salt \${prev} > \$out/prev" ];
  };
  go = i: prev: let d = link i prev; in if i + 1 == n then [ d ] else [ d ] ++ go (i + 1) d;
in go 0 ""
NIX
    local drvs outs
    mapfile -t drvs < <(add_drvs "$work/chain.nix" --arg n "$npaths" --arg size "$size")
    mapfile -t outs < <("$sandoff" "${S[@]}" build --local-only "${drvs[@]}" 2>"$work/chain-build.log")
    [[ ${#outs[@]} == "$npaths" ]] || { echo "built ${#outs[@]} of $npaths paths; see $work/chain-build.log" >&2; exit 1; }
    local paths=("$bbpath" "${outs[@]}")
    "$sandoff" "${S[@]}" store export "${paths[@]}" >"$work/closure.export"
    local bytes
    bytes=$(stat -c %s "$work/closure.export")
    echo "   ${#paths[@]} paths, $((bytes / 1024 / 1024)) MiB exported"
    nix-store --import <"$work/closure.export" >/dev/null

    echo "== starting a sandoff host and a Nix host"
    start_hosts sandoff 1 31 "$work/hosts-s" 2
    start_hosts nix 1 32 "$work/hosts-n" 2
    local sh saddr sport nh naddr nport
    read -r sh saddr sport <"$work/hosts-s/hosts"
    read -r nh naddr nport <"$work/hosts-n/hosts"
    local machine
    machine=$(awk '{print $1}' "$sh/machine")
    ssh_opts() {
        echo "-p $1 -i $work/hosts-$2/client_ed25519 -o UserKnownHostsFile=$work/hosts-$2/known_hosts -o StrictHostKeyChecking=yes -o BatchMode=yes -F /dev/null"
    }

    echo "== copying (one run each, fresh destination stores)"
    local t0 t1 raw nixcc sandoff_s=""
    local sopts
    read -ra sopts <<<"$(ssh_opts "$sport" s)"
    t0=$(now); ssh "${sopts[@]}" "root@$saddr" 'cat > /dev/null' <"$work/closure.export"; t1=$(now)
    raw=$(secs "$t0" "$t1")
    t0=$(now)
    NIX_SSHOPTS=$(ssh_opts "$nport" n) nix-copy-closure --to "root@$naddr" "${paths[@]}" 2>"$work/ncc.log"
    t1=$(now)
    nixcc=$(secs "$t0" "$t1")
    NIX_CONF_DIR=$nh/nixconf nix-store --check-validity "${paths[@]}" ||
        { echo "nix-copy-closure left paths invalid on the Nix host" >&2; exit 1; }
    t0=$(now)
    if "$sandoff" "${S[@]}" copy --machines "$work/hosts-s/machines" --to "$machine" "${paths[@]}" \
        >"$work/sandoff-copy.log" 2>&1; then
        t1=$(now)
        sandoff_s=$(secs "$t0" "$t1")
        "$sandoff" --store-root "$sh/root" store verify "${paths[@]}" >/dev/null 2>&1 ||
            echo "   warning: sandoff copy left paths missing or invalid on the host" >&2
    else
        echo "   sandoff copy failed ($(tail -1 "$work/sandoff-copy.log"))"
    fi
    local mib
    mib=$(echo "$bytes / 1048576" | bc -l)
    printf '%-44s %8.2f s  %7.1f MiB/s\n' "ssh cat > /dev/null (raw)" "$raw" "$(echo "$mib / $raw" | bc -l)"
    printf '%-44s %8.2f s  %7.1f MiB/s\n' "nix-copy-closure --to (Nix 2.8 host)" "$nixcc" "$(echo "$mib / $nixcc" | bc -l)"
    if [[ -n $sandoff_s ]]; then
        printf '%-44s %8.2f s  %7.1f MiB/s\n' "sandoff copy --to (sandoff host)" "$sandoff_s" "$(echo "$mib / $sandoff_s" | bc -l)"
        printf 'speed-up vs nix-copy-closure: %.2fx (target >= 2x); share of raw ssh throughput: %.0f%% (target >= 80%%)\n' \
            "$(echo "$nixcc / $sandoff_s" | bc -l)" "$(echo "100 * $raw / $sandoff_s" | bc -l)"
    else
        printf '%-44s %8s\n' "sandoff copy --to (sandoff host)" "n/a"
    fi
}

bench_build() {
    echo "== $nbuilds trivial derivations over 3 sandoff hosts x 2 slots"
    cat >"$work/many.nix" <<NIX
{ n, tag }:
builtins.genList (i: derivation {
  name = "trivial-\${tag}-\${toString i}";
  system = builtins.currentSystem;
  builder = "\${./bb}/bin/busybox";
  args = [ "sh" "-c" "echo $salt-\${tag}-\${toString i} > \$out" ];
}) n
NIX
    local warm probe many
    mapfile -t warm < <(add_drvs "$work/many.nix" --arg n 6 --argstr tag warm)
    mapfile -t probe < <(add_drvs "$work/many.nix" --arg n 1 --argstr tag probe)
    mapfile -t many < <(add_drvs "$work/many.nix" --arg n "$nbuilds" --argstr tag many)
    start_hosts sandoff 3 33 "$work/hosts-b" 2
    local M=(--machines "$work/hosts-b/machines")
    # Warm up: connections, and busybox on every host.
    "$sandoff" "${S[@]}" build "${M[@]}" "${local_flags[@]}" "${warm[@]}" >/dev/null 2>"$work/warm.log" ||
        { echo "   sandoff build --machines failed: $(tail -1 "$work/warm.log")"; return 0; }
    local t0 t1 one makespan ideal
    t0=$(now)
    "$sandoff" "${S[@]}" build "${M[@]}" "${local_flags[@]}" "${probe[@]}" >/dev/null 2>"$work/probe.log"
    t1=$(now)
    one=$(secs "$t0" "$t1")
    t0=$(now)
    "$sandoff" "${S[@]}" build "${M[@]}" "${local_flags[@]}" "${many[@]}" >/dev/null 2>"$work/many.log" ||
        { echo "   sandoff build failed: $(tail -1 "$work/many.log")"; return 0; }
    t1=$(now)
    makespan=$(secs "$t0" "$t1")
    ideal=$(echo "$one * $nbuilds / 6" | bc -l)
    printf '%-44s %8.3f s\n' "one offloaded build (sandoff build)" "$one"
    printf '%-44s %8.3f s\n' "ideal: $nbuilds x one / 6 slots" "$ideal"
    printf '%-44s %8.3f s\n' "makespan of $nbuilds builds" "$makespan"
    printf 'makespan / ideal: %.2fx (target <= 1.3x)\n' "$(echo "$makespan / $ideal" | bc -l)"
}

case $what in
copy) bench_copy ;;
build) bench_build ;;
all) bench_copy; bench_build ;;
esac
