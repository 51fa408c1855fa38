#!/usr/bin/env bash
# Issue 3's benchmark, in one run, as root:
#  1. 100 independent trivial derivations built with -j 1 by sandoff and by
#     Nix 2.8 (`nix-store --realise` with sandbox = true, on a separate chroot
#     store). The derivations are the same: Nix instantiates them, sandoff
#     reads them from `nix show-derivation` (`sandoff derivation add`), so
#     both build identical .drv files. Target: sandoff <= 0.5x Nix's time.
#  2. The per-build sandbox setup against `bwrap --unshare-all` running the
#     same command (bench/sandbox/setup). Target: <= 2x bwrap.
# Each tool starts after a sync and BENCH_SETTLE seconds (65): on ext4
# without a journal (this VM's root) every new inode skips each inode freed
# in the last minute, so the second tool paid for the first one's
# deletions (its build directories and lock files).
# Usage: bench/sandbox/run.sh [N derivations (100)] [setup runs (200)]
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
n=${1:-100}
runs=${2:-200}
for p in nix-store nix-instantiate busybox jq; do
    command -v "$p" >/dev/null || { echo "needs $p (apt-get install nix-bin busybox-static jq)" >&2; exit 1; }
done
cargo build --release --quiet --manifest-path "$repo/Cargo.toml"
sandoff="$repo/target/release/sandoff"
work=$(mktemp -d /tmp/sandoff-bench-sandbox.XXXXXX)
trap 'rm -rf "$work"' EXIT
export NIX_CONF_DIR="$work/nixconf"
mkdir -p "$NIX_CONF_DIR" "$work/bb/bin"
printf 'sandbox = true\nsubstituters =\nexperimental-features = nix-command\nbuild-users-group =\n' > "$NIX_CONF_DIR/nix.conf"
cp "$(command -v busybox)" "$work/bb/bin/busybox"
salt=$(date +%s%N)
cat > "$work/many.nix" <<NIX
{ n }:
builtins.listToAttrs (builtins.genList (i: {
  name = "t\${toString i}";
  value = derivation {
    name = "trivial-\${toString i}";
    system = builtins.currentSystem;
    builder = "\${./bb}/bin/busybox";
    args = [ "sh" "-c" "echo $salt-\${toString i} > \$out" ];
  };
}) n)
NIX
now() { date +%s.%N; }
settle() {
    sync
    sleep "${BENCH_SETTLE:-65}"
}

echo "== instantiating $n derivations (Nix) and adding them to sandoff's store"
mapfile -t drvs < <(nix-instantiate --store "$work/nix" "$work/many.nix" --arg n "$n" 2>/dev/null)
S=(--store-root "$work/s")
"$sandoff" "${S[@]}" setup >/dev/null
"$sandoff" "${S[@]}" store add "$work/bb" >/dev/null
nix --store "$work/nix" show-derivation "${drvs[@]}" > "$work/drvs.json"
for d in "${drvs[@]}"; do
    jq ".\"$d\"" "$work/drvs.json" | "$sandoff" "${S[@]}" derivation add >/dev/null
done

echo "== building with -j 1"
settle
t0=$(now)
nix-store --store "$work/nix" --realise -j 1 "${drvs[@]}" >/dev/null 2>"$work/nix.log"
t1=$(now)
settle
t2=$(now)
"$sandoff" "${S[@]}" build --local-only -j 1 "${drvs[@]}" >/dev/null 2>"$work/sandoff.log"
t3=$(now)
nix_s=$(echo "$t1 - $t0" | bc -l)
sandoff_s=$(echo "$t3 - $t2" | bc -l)
printf '%-34s %8.3f s  (%.1f ms per build)\n' "nix-store --realise (sandbox)" "$nix_s" "$(echo "$nix_s * 1000 / $n" | bc -l)"
printf '%-34s %8.3f s  (%.1f ms per build)\n' "sandoff build --local-only" "$sandoff_s" "$(echo "$sandoff_s * 1000 / $n" | bc -l)"
printf 'ratio sandoff/nix: %.2fx (targets: issue 3 <= 0.5x, issue 14 <= 0.3x)\n' "$(echo "$sandoff_s / $nix_s" | bc -l)"

if [ "$runs" -eq 0 ]; then
    echo "== no sandbox setup comparison (0 runs asked)"
elif command -v bwrap >/dev/null; then
    echo "== sandbox setup against bwrap ($runs runs each)"
    bash "$repo/bench/sandbox/setup/run.sh" "$runs"
else
    echo "== skipping the setup comparison: needs bwrap (apt-get install bubblewrap)"
fi
