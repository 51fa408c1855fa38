#!/usr/bin/env bash
# sandoff's example run, on a fresh Debian 12 machine as root:
#  - installs Nix 2.8 (used here as a reference), busybox-static, jq and
#    openssh-server (with OpenSSL headers to build sandoff's SSH client),
#  - builds sandoff,
#  - adds busybox to a fresh store and writes a derivation that uses it as
#    its builder, checking the .drv path against nix-instantiate's,
#  - signs the closure, exports it, imports it into a second store that
#    trusts the key, verifies it, and has Nix read what sandoff registered;
#  - then sets up build users and builds examples/graph in the sandbox;
#  - and builds it again on two sshd build hosts on this machine
#    (examples/testhosts.sh), with nothing built locally.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    need=()
    for p in nix-bin busybox-static jq pkg-config libssl-dev openssh-server; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || need+=("$p")
    done
    if [ ${#need[@]} -gt 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    fi
fi

cargo build --release --quiet --manifest-path "$here/Cargo.toml"
sandoff="$here/target/release/sandoff"
work=$(mktemp -d /tmp/sandoff-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
step() { printf '\n== %s\n' "$*"; }

# Store A shares its database location with Nix (state dir <root>/nix/var/nix),
# so Nix can read what sandoff writes there.
A=(--store-root "$work/a" --state-dir "$work/a/nix/var/nix")
B=(--store-root "$work/b")

step "add busybox to store A (as nix-store --add)"
mkdir -p "$work/bb/bin"
cp /bin/busybox "$work/bb/bin/busybox"
bb=$("$sandoff" "${A[@]}" store add "$work/bb")
echo "$bb"

step "write a derivation from JSON; output paths left empty are computed"
cat > "$work/hello.json" <<JSON
{
  "outputs": { "out": { "path": "" } },
  "inputSrcs": [ "$bb" ],
  "inputDrvs": {},
  "system": "x86_64-linux",
  "builder": "$bb/bin/busybox",
  "args": [ "sh", "-c", "echo hi > \$out" ],
  "env": { "builder": "$bb/bin/busybox", "name": "hello", "out": "", "system": "x86_64-linux" }
}
JSON
drv=$("$sandoff" "${A[@]}" derivation add < "$work/hello.json")
echo "$drv"
"$sandoff" "${A[@]}" derivation show "$drv"

if command -v nix-instantiate >/dev/null; then
    step "the same derivation through nix-instantiate (Nix 2.8)"
    export NIX_CONF_DIR="$work/nixconf"
    mkdir -p "$NIX_CONF_DIR"
    printf 'sandbox = false\nsubstituters =\nexperimental-features = nix-command\nbuild-users-group =\n' > "$NIX_CONF_DIR/nix.conf"
    cat > "$work/hello.nix" <<NIX
derivation { name = "hello"; system = "x86_64-linux"; builder = "\${./bb}/bin/busybox"; args = [ "sh" "-c" "echo hi > \$out" ]; }
NIX
    nixdrv=$(nix-instantiate --store "$work/nix" "$work/hello.nix" 2>/dev/null)
    echo "$nixdrv"
    [ "$nixdrv" = "$drv" ] && echo "same .drv path as Nix" || { echo "MISMATCH with Nix" >&2; exit 1; }
fi

step "generate a signing key, sign the closure, export it"
"$sandoff" key generate demo-key-1 "$work/sk" "$work/pk"
cat "$work/pk"; echo
"$sandoff" "${A[@]}" store sign --key-file "$work/sk" "$bb" "$drv"
"$sandoff" "${A[@]}" store export "$bb" "$drv" > "$work/closure.export"
ls -l "$work/closure.export"

step "import into store B: refused without the key, accepted when trusted"
if "$sandoff" "${B[@]}" store import < "$work/closure.export"; then
    echo "unexpected: an untrusted archive was imported" >&2; exit 1
fi
"$sandoff" "${B[@]}" store import --trusted-keys "$work/pk" < "$work/closure.export"
"$sandoff" "${B[@]}" store verify --sigs-needed 1 --trusted-keys "$work/pk" "$bb" "$drv"
"$sandoff" "${B[@]}" store info --json "$drv"

if command -v nix-store >/dev/null; then
    step "Nix 2.8 reads store A, which sandoff wrote"
    nix-store --store "$work/a" -q --references "$drv"
    nix-store --store "$work/a" --verify --check-contents 2>&1 | tail -n 2
    nix --extra-experimental-features nix-command --store "$work/a" path-info --sigs "$bb"
fi

step "sandoff setup: build users (sandoffbld1..10) and this machine's key"
G=(--store-root "$work/g")
"$sandoff" "${G[@]}" setup

step "build a graph of 4 derivations in the sandbox (examples/graph)"
top=$(SANDOFF="$sandoff" "$here/examples/graph/build.sh" "${G[@]}" -L)
echo "$top"
echo "--- $top/summary:"
cat "$work/g$top/summary"
"$sandoff" "${G[@]}" store info "$top"

if [ "$(id -u)" = 0 ] && [ -x /usr/sbin/sshd ]; then
    step "offload the same graph to two build hosts on this machine (examples/testhosts.sh)"
    # Real sshd hosts on 127.0.0.2-3, each with its own store and signing key.
    # Hosts and client lock the build users in the machine-wide default
    # directory (/run/sandoff/userpool), as every sandoff here must.
    SANDOFF="$sandoff" TESTHOSTS_PORT=2322 "$here/examples/testhosts.sh" start 2 "$work/hosts"
    trap '"$here/examples/testhosts.sh" stop "$work/hosts"; rm -rf "$work"' EXIT
    O=(--store-root "$work/o")
    "$sandoff" "${O[@]}" setup
    for h in "$work"/hosts/host*/; do
        "$sandoff" "${O[@]}" key authorize "$h/signing-key.pub"
    done
    "$sandoff" "${O[@]}" machines test --machines "$work/hosts/machines"
    # -j 0: nothing is built here; every derivation goes to a host.
    top=$(SANDOFF="$sandoff" "$here/examples/graph/build.sh" "${O[@]}" --machines "$work/hosts/machines" -j 0 -L)
    cat "$work/o$top/summary"
    "$sandoff" "${O[@]}" store info "$top"
fi

step "done"
