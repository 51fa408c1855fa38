#!/usr/bin/env bash
# One hand copy of 2,000 small paths to a fresh sandoff host behind a shaped
# link, with the host's import timeline: raw `ssh cat` of the same export
# stream, then `sandoff copy --to`, both timed; the host logs at debug level
# and the script prints when its batches became valid.
#
#   bench/offload/hand.sh [RATE:RTT]       # default 1gbit:10ms
#   bench/offload/hand.sh --clean          # stops nothing, removes $HAND_WORK
#
# As root. The data and the client store are made once in $HAND_WORK
# (default /var/tmp/sandoff-hand) and kept for the next run; each run starts
# a new host under $HAND_WORK/hosts-N and stops it at the end, keeping its
# store. Nothing is deleted between runs on purpose: on this VM's ext4
# without a journal, files created within minutes of a deletion are slower
# (see README.md, "Second pass" and "Fifth pass"), and every import frees its
# lock files once it has answered, so back-to-back runs slow down. Wait six
# minutes between runs, or use `link.sh`, which settles.
# SANDOFF: the binary (default: a release build of this tree).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
work=${HAND_WORK:-/var/tmp/sandoff-hand}
if [[ ${1:-} == --clean ]]; then rm -rf "$work"; exit 0; fi
link=${1:-1gbit:10ms}
. "$repo/bench/offload/lib.sh"
export SANDOFF_USER_POOL_DIR=${SANDOFF_USER_POOL_DIR:-/nix/var/sandoff/userpool}
S=(--store-root "$work/s")

if [[ ! -f $work/paths ]]; then
    echo "== making 2,000 small paths in $work (once)"
    mkdir -p "$work"
    python3 - "$work/data" <<'PY'
import os, sys
root = sys.argv[1]
share = []
for d, _, names in os.walk("/usr/share"):
    for n in sorted(names):
        p = os.path.join(d, n)
        if os.path.isfile(p) and not os.path.islink(p) and os.path.getsize(p) >= 1024:
            share.append(p)
share.sort()
for k in range(2000):
    dst = os.path.join(root, f"s{k:04}")
    os.makedirs(dst)
    with open(share[k % len(share)], "rb") as f:
        data = f.read(1024 + (k * 7919) % 7168)
    with open(os.path.join(dst, "f"), "wb") as f:
        f.write(data + str(k).encode())
PY
    "$sandoff" "${S[@]}" setup --build-users-group sandoffbld >/dev/null
    for d in "$work"/data/*; do "$sandoff" "${S[@]}" store add "$d"; done >"$work/paths.new"
    mapfile -t paths <"$work/paths.new"
    "$sandoff" "${S[@]}" store sign --key-file "$work/s/nix/var/sandoff/keys/signing-key.sec" "${paths[@]}" >/dev/null
    "$sandoff" "${S[@]}" store export "${paths[@]}" >"$work/small.export"
    mv "$work/paths.new" "$work/paths"
fi
mapfile -t paths <"$work/paths"

n=$(($(cat "$work/runs" 2>/dev/null || echo 0) + 1))
echo "$n" >"$work/runs"
dir=$work/hosts-$n
cleanup() { bash "$repo/examples/testhosts.sh" stop "$dir" >/dev/null 2>&1 || true; }
trap cleanup EXIT
# Host numbers 150-249 (addresses and namespace names), one per run.
TESTHOSTS_KIND=sandoff TESTHOSTS_FIRST=$((150 + n % 100)) TESTHOSTS_LINK=$link TESTHOSTS_PORT=22 \
    bash "$repo/examples/testhosts.sh" start 1 "$dir" >/dev/null
read -r h addr _ <"$dir/hosts"
"$sandoff" --store-root "$h/root" key authorize "$work/s/nix/var/sandoff/keys/signing-key.pub" >/dev/null 2>&1
# The host's `sandoff` (first on its sessions' PATH) logs at debug level.
printf '#!/bin/sh\nRUST_LOG=debug exec %q "$@" 2>>%q\n' "$sandoff" "$h/serve.log" >"$h/bin/sandoff"
chmod 755 "$h/bin/sandoff"
opts=(-i "$dir/client_ed25519" -o "UserKnownHostsFile=$dir/known_hosts" -o StrictHostKeyChecking=yes
    -o BatchMode=yes -F /dev/null)

t0=$(now); ssh "${opts[@]}" "root@$addr" 'cat > /dev/null' <"$work/small.export"; t1=$(now)
raw=$(secs "$t0" "$t1")
t0=$(now)
RUST_LOG=debug "$sandoff" "${S[@]}" copy --machines "$dir/machines" --to "$(awk '{print $1}' "$h/machine")" \
    "${paths[@]}" 2>"$dir/client.log"
t1=$(now)
ours=$(secs "$t0" "$t1")
printf '%s, 2,000 small paths (run %d, host store %s)\n' "$link" "$n" "$h/root"
printf '  raw ssh cat     %.3f s\n  sandoff copy    %.3f s   (%.2fx raw)\n' "$raw" "$ours" "$(echo "$ours / $raw" | bc -l)"
# Seconds since the copy started, from the logs' RFC 3339 timestamps.
since() { python3 -c 'import sys, datetime as d
t0 = float(sys.argv[1])
for line in sys.stdin:
    ts = line.split()[0].rstrip("Z")[:26]
    t = d.datetime.fromisoformat(ts).replace(tzinfo=d.timezone.utc).timestamp()
    print(f"  +{t - t0:.3f} s  {sys.argv[2]}")' "$t0" "$1"; }
# Log lines without colours: the first matching $2, or (with $3) the
# matching lines numbered 256, 1,024 and 2,000 (a batch each). One awk
# reading the file: an early exit inside a pipe would fail the script.
lines() { awk -v pat="$2" -v all="${3:-}" '{ gsub(/\x1b\[[0-9;]*m/, "") }
    $0 ~ pat { n++; if (!all) { print; exit } if (n == 256 || n == 1024 || n == 2000) print }' "$1"; }
lines "$dir/client.log" 'SSH session established' | since "client: SSH session"
lines "$dir/client.log" 'serve session opened' | since "client: serve session"
lines "$h/serve.log" 'command=4' | since "host: ImportPaths begins"
lines "$h/serve.log" ' imported ' all | since "host: a batch valid (256, then 1,024, then 2,000 paths)"
