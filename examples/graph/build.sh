#!/usr/bin/env bash
# Adds busybox and a small graph of derivations to a store, then builds the
# top one:
#
#     hello.txt (fixed output, flat sha256)
#       /      \
#    left     right (outputs out, doc)
#       \      /
#         top
#
# Usage (as root, after `sandoff setup`):
#     examples/graph/build.sh --store-root DIR [sandoff build options...]
# SANDOFF names the binary (default: target/debug/sandoff of this checkout,
# else `sandoff` on PATH). Prints the output path of top; `cat <it>/summary`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
if [ "${1:-}" != --store-root ] || [ -z "${2:-}" ]; then
    echo "usage: $0 --store-root DIR [sandoff build options...]" >&2
    exit 2
fi
root=$2
shift 2
sandoff=${SANDOFF:-}
if [ -z "$sandoff" ]; then
    if [ -x "$repo/target/debug/sandoff" ]; then sandoff=$repo/target/debug/sandoff; else sandoff=sandoff; fi
fi
s() { "$sandoff" --store-root "$root" "$@"; }

# busybox, as a store path of its own (its directory must be named busybox).
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/busybox/bin"
cp "$(command -v busybox)" "$work/busybox/bin/busybox"
subst=(-e "s|@busybox@|$(s store add "$work/busybox")|g")

# Each derivation's JSON names its inputs by placeholder: @<name>.drv@ for
# the .drv path, @<name>@ for its output path.
for name in hello.txt left right top; do
    drv=$(sed "${subst[@]}" "$here/$name.json" | s derivation add)
    out=$(s derivation show "$drv" | jq -r '.[].outputs.out.path')
    subst+=(-e "s|@$name.drv@|$drv|g" -e "s|@$name@|$out|g")
    echo "added $drv" >&2
done
s build "$@" "$drv"
