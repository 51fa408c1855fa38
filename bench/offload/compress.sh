#!/usr/bin/env bash
# Issue 14's compression measurement: which zstd level between sandoff
# peers keeps up with a fast link. One closure made of real files (the
# programs and libraries of /usr/bin and /usr/lib, not random bytes) is
# pushed with `sandoff copy --to` through the whole path, sandoff client ->
# libssh2 -> sshd -> `sandoff serve`, into a fresh test host (real sshd on
# 127.0.0.(1+BENCH_INDEX)) for each level, and the NAR throughput and the
# wire/plain ratio of each run are printed (from `sandoff copy --json`).
# The level is set with a Guix machines.scm entry (`compression-level`;
# `compression "none"` for off). BENCH_RATE=1gbit (any tc rate) puts the
# host in a network namespace behind a veth pair shaped to that rate both
# ways (tc tbf), so the link and not the loopback's free bandwidth limits.
# Usage: bench/offload/compress.sh [LEVEL|off ...]   (default: off 1 3 6 9)
# Environment: BENCH_MB (300: MiB of files), BENCH_RUNS (2 per level),
#   BENCH_RATE (unset: loopback, no limit), BENCH_PIN=1 (the host's sshd
#   and sessions on CPU 1, the client on CPU 0: two one-core machines),
#   BENCH_INDEX (78), SANDOFF (default: a release build of this tree),
#   BENCH_KEEP=1 keeps the work directory. Needs root, sshd, jq and bc.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
levels=("$@")
((${#levels[@]})) || levels=(off 1 3 6 9)
mb=${BENCH_MB:-300}
runs=${BENCH_RUNS:-2}
index=${BENCH_INDEX:-78}
rate=${BENCH_RATE:-}
host_cpu=() client_cpu=()
if [[ -n ${BENCH_PIN:-} ]]; then
    # Two machines of one core each: sshd and its sessions on CPU 1, the
    # client on CPU 0 (neither steals the other's core).
    host_cpu=(taskset -c 1) client_cpu=(taskset -c 0)
fi
[[ $(id -u) == 0 ]] || { echo "needs root (sshd)" >&2; exit 1; }
for p in jq bc sshd ssh; do
    command -v "$p" >/dev/null || { echo "needs $p (apt-get install jq bc openssh-server)" >&2; exit 1; }
done
. "$repo/bench/offload/lib.sh"
work=$(mktemp -d /tmp/sandoff-bench-compress.XXXXXX)
hostdir=
cleanup() {
    [[ -z $hostdir ]] || bash "$repo/examples/testhosts.sh" stop "$hostdir" >/dev/null || true
    if [[ -n ${BENCH_KEEP:-} ]]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

# The closure: files of /usr/bin and /usr/lib in name order up to BENCH_MB,
# in store paths of about 20 MiB each (like the outputs of a real closure).
S=(--store-root "$work/client")
budget=$((mb << 20)) chunk=0 chunk_bytes=0 total=0
mkdir -p "$work/src/p0"
while IFS= read -r -d '' f; do
    size=$(stat -c %s "$f")
    ((total + size <= budget)) || break
    if ((chunk_bytes > 20 << 20)); then
        chunk=$((chunk + 1)) chunk_bytes=0
        mkdir -p "$work/src/p$chunk"
    fi
    cp "$f" "$work/src/p$chunk/$(basename "$f").$total"
    total=$((total + size)) chunk_bytes=$((chunk_bytes + size))
done < <(find /usr/bin /usr/lib -xdev -type f -size +0 -print0 | sort -z)
paths=()
for d in "$work"/src/p*; do paths+=("$("$sandoff" "${S[@]}" store add "$d")"); done
echo "closure: ${#paths[@]} paths, $((total >> 20)) MiB of /usr/bin and /usr/lib files"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null || echo 2278)
printf '%-6s %-4s %9s %10s %8s %8s\n' level run seconds "NAR MiB/s" "wire MiB" ratio
for level in "${levels[@]}"; do
    for ((run = 1; run <= runs; run++)); do
        # A fresh host each time: nothing of the closure is there yet.
        hostdir=$work/hosts-$level-$run
        TESTHOSTS_FIRST=$index TESTHOSTS_PORT=$port TESTHOSTS_NETNS=${rate:+1} \
            "${host_cpu[@]}" bash "$repo/examples/testhosts.sh" start 1 "$hostdir" >/dev/null
        read -r _ addr p <"$hostdir/hosts"
        if [[ -n $rate ]]; then
            # Both directions of the veth pair limited to BENCH_RATE.
            tc qdisc replace dev "sth${index}h" root tbf rate "$rate" burst 1mb latency 50ms
            ip netns exec "sandoff-th$index" \
                tc qdisc replace dev "sth${index}n" root tbf rate "$rate" burst 1mb latency 50ms
        fi
        if [[ $level == off ]]; then
            compression='(compression "none")'
        else
            compression="(compression-level $level)"
        fi
        cat >"$work/machines.scm" <<SCM
(list (build-machine
        (name "$addr") (port $p) (systems (list "x86_64-linux")) (user "root")
        (private-key "$hostdir/client_ed25519")
        (host-key "$(cat "$hostdir/host$index/ssh_host_ed25519_key.pub")")
        $compression))
SCM
        json=$("${client_cpu[@]}" "$sandoff" "${S[@]}" copy --json --machines "$work/machines.scm" --to "$addr" "${paths[@]}" 2>/dev/null)
        secs=$(jq -r .seconds <<<"$json")
        nar=$(jq -r .narBytes <<<"$json")
        plain=$(jq -r .sent.plain <<<"$json")
        wire=$(jq -r .sent.wire <<<"$json")
        printf '%-6s %-4s %9.2f %10.1f %8.1f %8.3f\n' "$level" "$run" "$secs" \
            "$(echo "$nar / 1048576 / $secs" | bc -l)" "$(echo "$wire / 1048576" | bc -l)" \
            "$(echo "$wire / $plain" | bc -l)"
        bash "$repo/examples/testhosts.sh" stop "$hostdir" >/dev/null
        rm -rf "$hostdir"
        hostdir=
    done
done

# The codec alone, one thread, on the same files (zstd's own benchmark): how
# fast each level compresses per core, with no SSH or store work around it.
if command -v zstd >/dev/null; then
    tar -C "$work/src" -cf "$work/closure.tar" .
    echo "zstd -b (one thread) on the same $((total >> 20)) MiB:"
    for level in "${levels[@]}"; do
        [[ $level == off ]] || zstd -q -T1 -b"$level" "$work/closure.tar" 2>&1 | tr '\r' '\n' | tail -n 1
    done
fi
