#!/usr/bin/env bash
# Issue 4's benchmark: one decide() against 10,000 machines (criterion,
# benches/decide.rs). Target: under 1 ms.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo bench --bench decide -- "$@"
