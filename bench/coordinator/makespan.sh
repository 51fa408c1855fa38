#!/usr/bin/env bash
# Issue 15's makespan benchmark, in one run, as root: N derivations
# (default 500), each a build of D seconds (default 1: `sleep D`, so the
# ideal is known), submitted at once to a coordinator on loopback with 3
# agents x 2 slots (separate store roots, the shared sandoffbld users).
#   ideal    = ceil(N / 6) x D           (perfect packing, zero overhead)
#   makespan = from `coordinator submit` to the last success
# Target: makespan <= 1.3x ideal. The same derivations built here by
# `sandoff build -j 6` (no coordinator) are shown as a reference.
# Usage: bench/coordinator/makespan.sh [N (500)] [D seconds (1)]
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
n=${1:-500}
d=${2:-1}
for p in busybox curl jq bc; do
    command -v "$p" >/dev/null || { echo "needs $p (apt-get install busybox-static curl jq bc)" >&2; exit 1; }
done
cargo build --release --quiet --manifest-path "$repo/Cargo.toml"
sandoff="$repo/target/release/sandoff"
work=$(mktemp -d /tmp/sandoff-bench-coordinator.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
now() { date +%s.%N; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

C=(--store-root "$work/client")
"$sandoff" "${C[@]}" setup >/dev/null
mkdir -p "$work/bb/bin"
cp "$(command -v busybox)" "$work/bb/bin/busybox"
bb=$("$sandoff" "${C[@]}" store add "$work/bb")
salt=$(date +%s%N)
echo "== adding $n derivations of ${d}s each"
drvs=()
for i in $(seq 1 "$n"); do
    drvs+=("$(printf '{"outputs":{"out":{"path":""}},"inputSrcs":["%s"],"inputDrvs":{},"system":"x86_64-linux","builder":"%s/bin/busybox","args":["sh","-c","%s/bin/busybox sleep %s; echo %s-%s > $out"],"env":{"name":"m%s","out":"","builder":"%s/bin/busybox","system":"x86_64-linux"}}' \
        "$bb" "$bb" "$bb" "$d" "$salt" "$i" "$i" "$bb" | "$sandoff" "${C[@]}" derivation add)")
done

agent_port=$(free_port); client_port=$(free_port)
db="sqlite://$work/coordinator.db"
"$sandoff" coordinator tokens new --role admin --datastore "$db" > "$work/admin" 2>/dev/null
"$sandoff" coordinator tokens new --role submit --datastore "$db" > "$work/submit" 2>/dev/null
"$sandoff" coordinator --datastore "$db" --agent-listen "127.0.0.1:$agent_port" \
    --client-listen "127.0.0.1:$client_port" --cache-dir "$work/cache" \
    --secret-key-file "$work/key" > "$work/coordinator.out" 2> "$work/coordinator.log" &
pids+=($!)
url="http://127.0.0.1:$client_port"
until grep -q "cache key" "$work/coordinator.out"; do sleep 0.1; done
for a in a1 a2 a3; do
    "$sandoff" coordinator agents new "$a" --url "$url" --token-file "$work/admin" > "$work/$a.token" 2>/dev/null
    "$sandoff" --store-root "$work/$a" agent --coordinator "http://127.0.0.1:$agent_port" \
        --token-file "$work/$a.token" --max-parallel-builds 2 --poll-seconds 0.2 \
        --system x86_64-linux 2> "$work/$a.log" &
    pids+=($!)
done
sleep 1

echo "== submitting and waiting"
t0=$(now)
"$sandoff" "${C[@]}" coordinator submit --url "$url" --token-file "$work/submit" "${drvs[@]}" > /dev/null 2>&1
t_submit=$(now)
while :; do
    left=$(curl -sf -H "Authorization: Bearer $(cat "$work/submit")" "$url/client/v1/builds?state=queued,allocated&limit=100000" | jq '.builds | length')
    [ "$left" = 0 ] && break
    sleep 0.2
done
t1=$(now)
failed=$(curl -sf -H "Authorization: Bearer $(cat "$work/submit")" "$url/client/v1/builds?state=failed&limit=100000" | jq '.builds | length')
makespan=$(echo "$t1 - $t0" | bc -l)
submit_s=$(echo "$t_submit - $t0" | bc -l)
ideal=$(echo "(($n + 5) / 6) * $d" | bc)

echo "== the same builds with sandoff build -j 6 in the client store (no coordinator)"
t2=$(now)
"$sandoff" "${C[@]}" build --local-only -j 6 "${drvs[@]}" > /dev/null 2>&1
t3=$(now)
local_s=$(echo "$t3 - $t2" | bc -l)

printf '%-44s %8.1f s\n' "ideal (ceil($n/6) x ${d}s)" "$ideal"
printf '%-44s %8.1f s  (%.2fx ideal; submit %.1f s; %s failed)\n' "coordinator, 3 agents x 2 slots" "$makespan" "$(echo "$makespan / $ideal" | bc -l)" "$submit_s" "$failed"
printf '%-44s %8.1f s  (%.2fx ideal)\n' "sandoff build -j 6 (one machine, reference)" "$local_s" "$(echo "$local_s / $ideal" | bc -l)"
