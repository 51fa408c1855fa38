#!/usr/bin/env bash
# Issue 15's allocation benchmark: one agent request (allocate) against a
# datastore of 100,000 queued builds, in release mode, on a file database
# in WAL mode with synchronous=FULL (as the coordinator runs it).
# Target: under 50 ms.
#
# Two cases (ignored tests in src/coordinator/datastore/sqlite/tests.rs):
# - allocate_from_100k_queued_builds: 100,000 ready builds, 4 free slots,
#   three requests in a row, then an agent of a system nobody needs;
# - allocate_past_100k_builds_the_agent_cannot_take: the best 100,000 are
#   builds the agent cannot take (a feature it lacks, or deferred).
# They print the times and assert only which builds were handed out.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec cargo test --release --lib coordinator::datastore::sqlite::tests::allocate_ \
    -- --ignored --nocapture --test-threads 1 "$@"
