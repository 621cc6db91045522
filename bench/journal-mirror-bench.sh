#!/usr/bin/env bash
# Journal-mode replication lag between two real sites, end to end: a paced
# QD1 NBD writer on the primary marks a probe write every 50 ms, a reader on
# the secondary polls for it; p50/p99 of (seen there - acknowledged here) at
# 25/50/90 % of the primary's maximum journaled write rate, on loopback and
# through a proxy adding 10 ms each way (20 ms round trip). Also the
# primary's write rate with the peer replaying vs without.
#   bench/journal-mirror-bench.sh [results-file]     RT=seconds per load level (default 10)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results/journal-mirror-bench.txt}
# The results file names the code that made it.
echo "# commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- crates bench Cargo.lock 2>/dev/null || echo '+uncommitted'), $(date -u +%Y-%m-%d), $(basename "$0")" >"$out"
command -v fio >/dev/null || bash scripts/deps.sh
cargo build --release --bins --quiet
cargo build --release --quiet -p tern-testkit --example journal_lag
target/release/examples/journal_lag | tee -a "$out"
