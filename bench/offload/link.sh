#!/usr/bin/env bash
# Issue 14's transfer benchmark, on a real link: the build hosts live in
# network namespaces joined to this one by a link with a bandwidth and a
# round-trip time (examples/testhosts.sh TESTHOSTS_LINK: a TUN delay line,
# examples/delayline.py, as netem would shape it; this kernel has no netem),
# so that what is measured is what a user with a remote builder lives with,
# not the CPU cost of loopback.
#
# Data: real files, compressible as store paths are: a closure of
# $BENCH_PATHS (300) paths made of the files of /usr/lib and /usr/bin
# (~$BENCH_MB, 500 MiB), and $BENCH_SMALL (2,000) small paths (one file of
# 1-8 KiB from /usr/share each). Both are added to sandoff's store and
# imported into a Nix 2.8 chroot store, so every tool sends the same paths.
#
# For each link (1 Gbit/s with 10 ms round trip; 100 Mbit/s with 40 ms) and
# each data set, into fresh destination stores, once each:
#   - raw `ssh host 'cat > /dev/null' < export` of the same bytes (the export
#     stream of the paths, uncompressed: the single-stream floor);
#   - two floors that also write the files on the host, one stream each:
#     `ssh host 'tar -x'` of a tar of the same files, and `ssh host
#     'nix-store --import'` of the export stream into a Nix 2.8 host's store
#     (what Nix itself does with the same paths when it gets them at once);
#   - `nix-copy-closure --to` a Nix 2.8 host, plain and `--gzip`;
#   - `nix copy --to ssh://` the same Nix host;
#   - `sandoff copy --to` a sandoff host.
# It prints the time, the effective throughput (NAR bytes, uncompressed, per
# second) and the ratios. Targets: sandoff >= 2x nix-copy-closure on both
# links; on 100 Mbit/s an effective throughput above the link's rate; the
# 2,000 small paths within 1.2x of raw ssh's time for the same bytes.
#
# Each timed run starts with nothing left to write back (a `sync`). Before
# each case and before the Nix import floor it waits BENCH_SETTLE
# seconds (370) after a sync: on ext4 without a journal (this VM's root)
# every new inode skips each inode freed in the last minute, or in the last
# six minutes once its inode table block is dirty again (which creating
# files next to it does), so a tool run after another's deletions (lock
# files, the data's preparation, the last case's hosts) pays for them. 4,000
# files took 1.85 s to create 65 s after 4,000 were deleted, 0.39 s after
# 400 s. The wait lets them age out, so that no tool pays for another.
#
# Usage: bench/offload/link.sh [--quick]   (--quick: 60 paths / 100 MiB,
#   400 small paths, no settling; a smoke test)
# Environment: BENCH_LINKS ("1gbit:10ms 100mbit:40ms"), BENCH_SETS ("big
#   small"), BENCH_PATHS, BENCH_MB, BENCH_SMALL, BENCH_FS (tmp, the
#   default; ext4: the stores on a journaled ext4 image of BENCH_FS_GB (12)
#   GiB on a loop device), BENCH_SETTLE (370 s, waited twice per case:
#   about 50 minutes of a full run's time; 0 skips it, at the cost of
#   figures that depend on what ran before),
#   SANDOFF (default: a release build of this tree), BENCH_KEEP=1 keeps the
#   work directory.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
npaths=${BENCH_PATHS:-300}
total_mb=${BENCH_MB:-500}
nsmall=${BENCH_SMALL:-2000}
settle_s=${BENCH_SETTLE:-370}
if [[ ${1:-} == --quick ]]; then npaths=60; total_mb=100; nsmall=400; settle_s=0; fi
read -ra links <<<"${BENCH_LINKS:-1gbit:10ms 100mbit:40ms}"
[[ $(id -u) == 0 ]] || { echo "needs root (network namespaces, sshd)" >&2; exit 1; }
for p in nix-store nix-copy-closure nix ip sshd ssh python3 bc; do
    command -v "$p" >/dev/null || {
        echo "needs $p (apt-get install nix-bin iproute2 openssh-server python3 bc)" >&2
        exit 1
    }
done
. "$repo/bench/offload/lib.sh"
export SANDOFF_USER_POOL_DIR=${SANDOFF_USER_POOL_DIR:-/nix/var/sandoff/userpool}
work=$(mktemp -d /tmp/sandoff-bench-link.XXXXXX)
hostdirs=()
img=
cleanup() {
    local d
    for d in "${hostdirs[@]}"; do bash "$repo/examples/testhosts.sh" stop "$d" >/dev/null 2>&1 || true; done
    if [[ -n ${BENCH_KEEP:-} ]]; then echo "kept $work${img:+ (mounted from $img)}"; return; fi
    if [[ -n $img ]]; then
        # The hosts' last processes may take a moment to let go of it.
        local try
        for try in 1 2 3 4 5 6 7 8 9 10; do umount "$work" 2>/dev/null && break; sleep 0.5; done
        mountpoint -q "$work" && umount -l "$work"
        rm -f "$img"
    fi
    rm -rf "$work"
}
trap cleanup EXIT
# BENCH_FS=ext4 puts every store (the client's and each host's) on a
# journaled ext4 image on a loop device instead of /tmp. This VM's root is
# ext4 without a journal, where each new inode skips every inode deleted in
# the last minute (6,000 inodes in 2.7 s after a deletion, 0.16 s on a
# journaled ext4), so a tool run after another pays for its deletions; but
# on the loop device every flush goes through to the image file, which
# costs sandoff (it flushes each path before registering it; Nix 2.8 does
# not) more than the inodes (see bench/offload/README.md). Default: /tmp.
if [[ ${BENCH_FS:-tmp} == ext4 ]]; then
    img=$(mktemp /var/tmp/sandoff-bench-link.XXXXXX.img)
    truncate -s "${BENCH_FS_GB:-12}G" "$img"
    mkfs.ext4 -q -F "$img"
    mount -o loop "$img" "$work"
fi

export NIX_CONF_DIR=$work/nixconf
mkdir -p "$NIX_CONF_DIR"
cat >"$NIX_CONF_DIR/nix.conf" <<CONF
store = $work/nix
substituters =
build-users-group =
experimental-features = nix-command
CONF
unset NIX_REMOTE
S=(--store-root "$work/s")
"$sandoff" "${S[@]}" setup --build-users-group sandoffbld >/dev/null
"$sandoff" "${S[@]}" key show >"$work/client-key.pub"


echo "== making the data: $npaths paths of /usr/lib and /usr/bin files (~$total_mb MiB), $nsmall small paths"
python3 - "$work/data" "$npaths" "$total_mb" "$nsmall" <<'PY'
import os, shutil, sys
root, npaths, total_mb, nsmall = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
files = []
for top in ("/usr/lib", "/usr/bin"):
    for d, _, names in os.walk(top):
        for n in sorted(names):
            p = os.path.join(d, n)
            if os.path.isfile(p) and not os.path.islink(p):
                s = os.path.getsize(p)
                if 0 < s < 64 << 20:
                    files.append((p, s))
files.sort()
budget, per = total_mb << 20, (total_mb << 20) // npaths
i, used = 0, 0
for k in range(npaths):
    dst = os.path.join(root, "big", f"p{k:03}")
    os.makedirs(dst)
    got = 0
    while got < per and i < len(files) and used < budget:
        src, size = files[i]; i += 1
        shutil.copyfile(src, os.path.join(dst, f"{i:05}-{os.path.basename(src)}"))
        got += size; used += size
    if got == 0:
        open(os.path.join(dst, "empty"), "w").close()
share = []
for d, _, names in os.walk("/usr/share"):
    for n in sorted(names):
        p = os.path.join(d, n)
        if os.path.isfile(p) and not os.path.islink(p) and os.path.getsize(p) >= 1024:
            share.append(p)
share.sort()
for k in range(nsmall):
    src = share[k % len(share)]
    dst = os.path.join(root, "small", f"s{k:04}")
    os.makedirs(dst)
    with open(src, "rb") as f:
        data = f.read(1024 + (k * 7919) % 7168)
    with open(os.path.join(dst, "f"), "wb") as f:
        f.write(data + str(k).encode())
PY

# Adds every directory under DIR to sandoff's store; prints the paths.
add_all() {
    local d
    for d in "$1"/*; do "$sandoff" "${S[@]}" store add "$d"; done
}
mapfile -t big < <(add_all "$work/data/big")
mapfile -t small < <(add_all "$work/data/small")
for set in big small; do
    declare -n paths=$set
    "$sandoff" "${S[@]}" store export "${paths[@]}" >"$work/$set.export"
    tar -cf "$work/$set.tar" -C "$work/data" "$set"
    nix-store --import <"$work/$set.export" >/dev/null
    # NAR bytes: what every tool moves, uncompressed.
    "$sandoff" "${S[@]}" store info --json "${paths[@]}" 2>/dev/null |
        python3 -c 'import json,sys; print(sum(i["narSize"] for i in json.load(sys.stdin)))' >"$work/$set.bytes" ||
        stat -c %s "$work/$set.export" >"$work/$set.bytes"
    echo "   $set: ${#paths[@]} paths, $(($(cat "$work/$set.bytes") / 1048576)) MiB of NAR"
done

next_host=100
# Starts one host of KIND in its own network namespace behind a link shaped
# as LINK (RATE:RTT); sets dir, h (its home) and addr.
fresh_host() {
    local kind=$1 link=$2 i=$next_host
    dir=$work/hosts-$next_host
    next_host=$((next_host + 1))
    hostdirs+=("$dir")
    TESTHOSTS_KIND=$kind TESTHOSTS_FIRST=$i TESTHOSTS_LINK=$link TESTHOSTS_PORT=22 \
        bash "$repo/examples/testhosts.sh" start 1 "$dir" >/dev/null
    read -r h addr _ <"$dir/hosts"
    if [[ $kind == sandoff ]]; then
        "$sandoff" --store-root "$h/root" key authorize "$work/client-key.pub" >/dev/null 2>&1
    fi
    "$sandoff" "${S[@]}" key authorize "$h/signing-key.pub" >/dev/null 2>&1
}

ssh_opts() { # DIR
    echo "-i $1/client_ed25519 -o UserKnownHostsFile=$1/known_hosts -o StrictHostKeyChecking=yes -o BatchMode=yes -F /dev/null"
}

# Lets the inodes freed so far age out of ext4's "recently deleted" window.
settle() {
    ((settle_s > 0)) || return 0
    sync
    sleep "$settle_s"
}

declare -A T
run_case() { # LINK SET
    local link=$1 set=$2
    declare -n paths=$set
    local dir h addr t0 t1 opts
    echo "== $set over $link"
    fresh_host sandoff "$link"
    read -ra opts <<<"$(ssh_opts "$dir")"
    settle
    t0=$(now); ssh "${opts[@]}" "root@$addr" 'cat > /dev/null' <"$work/$set.export"; t1=$(now)
    T[$link,$set,raw]=$(secs "$t0" "$t1")
    sync; t0=$(now); ssh "${opts[@]}" "root@$addr" "mkdir $h/tarx && tar -x -C $h/tarx" <"$work/$set.tar"; t1=$(now)
    T[$link,$set,tarx]=$(secs "$t0" "$t1")
    # Nothing of tar's left to write back: sandoff flushes the file system
    # before registering, and would otherwise write tar's files too.
    sync; t0=$(now)
    "$sandoff" "${S[@]}" copy --machines "$dir/machines" --to "$(awk '{print $1}' "$h/machine")" "${paths[@]}" \
        >"$work/sandoff-copy.log" 2>&1 || { echo "sandoff copy failed: $(tail -1 "$work/sandoff-copy.log")" >&2; exit 1; }
    t1=$(now)
    T[$link,$set,sandoff]=$(secs "$t0" "$t1")
    "$sandoff" --store-root "$h/root" store verify "${paths[@]}" >/dev/null 2>&1 ||
        { echo "sandoff copy left paths invalid on the host" >&2; exit 1; }
    local tool
    for tool in nix-import ncc ncc-gzip nixcopy; do
        fresh_host nix "$link"
        local sshopts
        sshopts=$(ssh_opts "$dir")
        # After sandoff's import, which freed its lock files.
        [[ $tool != nix-import ]] || settle
        sync; t0=$(now)
        case $tool in
        nix-import) read -ra opts <<<"$sshopts"; ssh "${opts[@]}" "root@$addr" "$h/serve --import >/dev/null" <"$work/$set.export" 2>"$work/$tool.log" ;;
        ncc) NIX_SSHOPTS=$sshopts nix-copy-closure --to "root@$addr" "${paths[@]}" 2>"$work/$tool.log" ;;
        ncc-gzip) NIX_SSHOPTS=$sshopts nix-copy-closure --gzip --to "root@$addr" "${paths[@]}" 2>"$work/$tool.log" ;;
        nixcopy) NIX_SSHOPTS=$sshopts nix copy --to "ssh://root@$addr" "${paths[@]}" 2>"$work/$tool.log" ;;
        esac
        t1=$(now)
        T[$link,$set,$tool]=$(secs "$t0" "$t1")
        NIX_CONF_DIR=$h/nixconf nix-store --check-validity "${paths[@]}" ||
            { echo "$tool left paths invalid on the Nix host" >&2; exit 1; }
    done
}

read -ra sets <<<"${BENCH_SETS:-big small}"
for link in "${links[@]}"; do
    for set in "${sets[@]}"; do run_case "$link" "$set"; done
done

mibps() { echo "$(cat "$work/$2.bytes") / 1048576 / $1" | bc -l; }
echo
for link in "${links[@]}"; do
    rate=${link%%:*}
    case $rate in *gbit) link_mibps=$(echo "${rate%gbit} * 1000000000 / 8 / 1048576" | bc -l) ;;
        *mbit) link_mibps=$(echo "${rate%mbit} * 1000000 / 8 / 1048576" | bc -l) ;; *) link_mibps=0 ;; esac
    for set in "${sets[@]}"; do
        printf '%s, %s (%s paths, %d MiB of NAR; the link carries %.1f MiB/s)\n' "$link" "$set" \
            "$([[ $set == big ]] && echo "${#big[@]}" || echo "${#small[@]}")" "$(($(cat "$work/$set.bytes") / 1048576))" "$link_mibps"
        for tool in raw tarx nix-import ncc ncc-gzip nixcopy sandoff; do
            case $tool in
            raw) label="ssh cat > /dev/null (export stream)" ;;
            tarx) label="ssh tar -x (the files, one stream)" ;;
            nix-import) label="ssh nix-store --import (one stream)" ;;
            ncc) label="nix-copy-closure --to" ;;
            ncc-gzip) label="nix-copy-closure --gzip --to" ;;
            nixcopy) label="nix copy --to ssh://" ;;
            sandoff) label="sandoff copy --to" ;;
            esac
            t=${T[$link,$set,$tool]}
            printf '  %-38s %8.2f s %8.1f MiB/s\n' "$label" "$t" "$(mibps "$t" "$set")"
        done
        s=${T[$link,$set,sandoff]}
        printf '  sandoff vs nix-copy-closure: %.2fx, vs --gzip: %.2fx, vs nix copy: %.2fx (target >= 2x)\n' \
            "$(echo "${T[$link,$set,ncc]} / $s" | bc -l)" "$(echo "${T[$link,$set,ncc-gzip]} / $s" | bc -l)" \
            "$(echo "${T[$link,$set,nixcopy]} / $s" | bc -l)"
        printf '  sandoff effective / link rate: %.2f; sandoff / raw ssh time: %.2f\n' \
            "$(echo "$(mibps "$s" "$set") / $link_mibps" | bc -l)" "$(echo "$s / ${T[$link,$set,raw]}" | bc -l)"
        printf '  sandoff / ssh tar -x: %.2f; sandoff / ssh nix-store --import: %.2f\n' \
            "$(echo "$s / ${T[$link,$set,tarx]}" | bc -l)" "$(echo "$s / ${T[$link,$set,nix-import]}" | bc -l)"
    done
done
