# Sourced by the offload benchmarks after they set $repo: the sandoff to run
# ($SANDOFF, or else a release build of this tree, built now) as $sandoff and
# exported as SANDOFF, and the timing helpers.
if [[ -z ${SANDOFF:-} ]]; then
    cargo build --release --quiet --manifest-path "$repo/Cargo.toml"
    SANDOFF=$repo/target/release/sandoff
fi
sandoff=$SANDOFF
export SANDOFF
now() { date +%s.%N; }
secs() { echo "$2 - $1" | bc -l; }
