#!/usr/bin/env bash
# Issue 16's soak run, as root: N trivial derivations (default 5,000) over
# A agents x 2 slots (default 6), with agents killed (-9) and restarted at
# random throughout and the coordinator killed (-9) and restarted once,
# halfway. Then checks: every build succeeded, each exactly once (one
# accepted success report per build across all agent logs, no build run
# again after its success), and every cached output verifies: Nix 2.8
# substitutes all of them from the cache with require-sigs (NAR hashes and
# the coordinator's signatures checked). Records queue throughput and the
# coordinator's peak memory (VmHWM) for bench/coordinator/README.md.
# Usage: bench/coordinator/soak.sh [N (5000)] [agents (6)]
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
n=${1:-5000}
agents=${2:-6}
for p in busybox curl jq bc nix-store; do
    command -v "$p" >/dev/null || { echo "needs $p (apt-get install busybox-static curl jq bc nix-bin)" >&2; exit 1; }
done
cargo build --release --quiet --manifest-path "$repo/Cargo.toml"
sandoff="$repo/target/release/sandoff"
work=$(mktemp -d /tmp/sandoff-bench-soak.XXXXXX)
declare -A apid
cpid=
cleanup() {
    for p in "${apid[@]}" $cpid; do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ -n "${KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT
now() { date +%s.%N; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

C=(--store-root "$work/client")
"$sandoff" "${C[@]}" setup >/dev/null
mkdir -p "$work/bb/bin"
cp "$(command -v busybox)" "$work/bb/bin/busybox"
bb=$("$sandoff" "${C[@]}" store add "$work/bb")
salt=$(date +%s%N)
echo "== adding $n derivations"
: > "$work/drvs"
for i in $(seq 1 "$n"); do
    printf '{"outputs":{"out":{"path":""}},"inputSrcs":["%s"],"inputDrvs":{},"system":"x86_64-linux","builder":"%s/bin/busybox","args":["sh","-c","echo %s-%s > $out"],"env":{"name":"soak%s","out":"","builder":"%s/bin/busybox","system":"x86_64-linux"}}' \
        "$bb" "$bb" "$salt" "$i" "$i" "$bb" | "$sandoff" "${C[@]}" derivation add >> "$work/drvs"
done

ap=$(free_port); cp=$(free_port)
db="sqlite://$work/coordinator.db"
"$sandoff" coordinator tokens new --role admin --datastore "$db" > "$work/admin" 2>/dev/null
url="http://127.0.0.1:$cp"
hwm=0
start_coordinator() {
    RUST_LOG=info "$sandoff" coordinator --datastore "$db" --agent-listen "127.0.0.1:$ap" --client-listen "127.0.0.1:$cp" \
        --cache-dir "$work/cache" --secret-key-file "$work/key" --lease-seconds 5 --retry-base-seconds 1 \
        > "$work/coordinator.out" 2>> "$work/coordinator.log" &
    cpid=$!
    until grep -q "cache key" "$work/coordinator.out" 2>/dev/null; do sleep 0.1; done
}
peak() { # the coordinator's peak RSS so far, in kB
    local h; h=$(awk '/VmHWM/ {print $2}' "/proc/$cpid/status" 2>/dev/null || echo 0)
    [ "${h:-0}" -gt "$hwm" ] && hwm=$h; true
}
start_agent() {
    RUST_LOG=info "$sandoff" --store-root "$work/agents/$1" agent --coordinator "http://127.0.0.1:$ap" \
        --token-file "$work/$1.token" --max-parallel-builds 2 --poll-seconds 0.2 \
        --system x86_64-linux 2>> "$work/$1.log" &
    apid[$1]=$!
}
start_coordinator
key=$(sed -n 's/^cache key: //p' "$work/coordinator.out")
for a in $(seq 1 "$agents"); do
    "$sandoff" coordinator agents new "a$a" --url "$url" --token-file "$work/admin" > "$work/a$a.token" 2>/dev/null
    start_agent "a$a"
done
"$sandoff" coordinator tokens new --role submit --url "$url" --token-file "$work/admin" > "$work/submit" 2>/dev/null

count() { # builds in the given states
    curl -sf -H "Authorization: Bearer $(cat "$work/admin")" "$url/client/v1/builds?state=$1&limit=100000" | jq '.builds | length'
}
echo "== submitting $n builds; killing agents at random, the coordinator once"
t0=$(now)
mapfile -t drvs < "$work/drvs"
"$sandoff" "${C[@]}" coordinator submit --url "$url" --token-file "$work/submit" "${drvs[@]}" > /dev/null 2>&1
t_submit=$(now)
kills=0; restarted=no
while :; do
    left=$(count queued,allocated || echo unknown)
    [ "$left" = 0 ] && break
    peak
    if [ "$restarted" = no ] && [ "$left" != unknown ] && [ "$left" -lt $((n / 2)) ]; then
        echo "   $left left: kill -9 the coordinator, restart it"
        kill -9 "$cpid"; wait "$cpid" 2>/dev/null || true
        sleep 1; start_coordinator; restarted=yes
    fi
    if [ $((RANDOM % 5)) = 0 ]; then
        victim="a$((RANDOM % agents + 1))"
        kill -9 "${apid[$victim]}" 2>/dev/null || true; wait "${apid[$victim]}" 2>/dev/null || true
        kills=$((kills + 1))
        sleep "0.$((RANDOM % 9 + 1))"
        start_agent "$victim"
    fi
    sleep 1
done
t1=$(now)
peak
succeeded=$(count succeeded); failed=$(count failed,canceled)
# One accepted success per build, across every agent's (restarted) logs.
reports=$(cat "$work"/a*.log | grep -c "reported success" || true)
refused=$(cat "$work"/a*.log | grep "reporting:" | grep -c "HTTP 409" || true)
expired=$(grep -c "leases expired" "$work/coordinator.log" || true)

echo "== Nix 2.8 substitutes every output from the cache (require-sigs)"
mapfile -t outs < <(sed -n 's/^StorePath: //p' "$work"/cache/*.narinfo | grep -v '\.drv$' | grep -v -- "-bb$")
printf 'machine 127.0.0.1 login nix password %s\n' "$(cat "$work/admin")" > "$work/netrc"
export NIX_CONF_DIR="$work/nixconf"; mkdir -p "$NIX_CONF_DIR"
printf 'sandbox = false\nbuild-users-group =\nexperimental-features = nix-command\n' > "$NIX_CONF_DIR/nix.conf"
t2=$(now)
printf '%s\n' "${outs[@]}" | xargs -n 500 nix-store --store "$work/nix" --option substituters "$url/cache" \
    --option trusted-public-keys "$key" --option netrc-file "$work/netrc" --option require-sigs true \
    --realise > /dev/null 2> "$work/nix.log" && verified=yes || verified=no
t3=$(now)

makespan=$(echo "$t1 - $t0" | bc -l)
printf '%-40s %s\n' "builds" "$n over $agents agents x 2 slots"
printf '%-40s %s succeeded, %s failed or canceled\n' "result" "$succeeded" "$failed"
printf '%-40s %.1f s (submit %.1f s), %.1f builds/s\n' "makespan" "$makespan" "$(echo "$t_submit - $t0" | bc -l)" "$(echo "$n / $makespan" | bc -l)"
printf '%-40s %s agent kills, 1 coordinator restart, %s lease-expiry sweeps\n' "faults" "$kills" "$expired"
printf '%-40s %s (refused after success: %s)\n' "accepted success reports" "$reports" "$refused"
printf '%-40s %s MiB\n' "coordinator peak memory (VmHWM)" "$((hwm / 1024))"
printf '%-40s %s (%s outputs, %.1f s)\n' "every cached output verifies (Nix 2.8)" "$verified" "${#outs[@]}" "$(echo "$t3 - $t2" | bc -l)"
[ "$succeeded" = "$n" ] && [ "$verified" = yes ]
