#!/usr/bin/env bash
# What journaling costs on the write path: fio (nbd engine) against two
# images of one ternd, one plain and one with the journaling feature, in one
# run; prints journaled/plain ratios (issue target: >= 0.8 at QD32).
#   bench/journal-bench.sh [results-file]    RT=seconds per job (default 6)
# Every job ends with a flush whose time counts (end_fsync), so both images'
# figures are rates of durable writes. TERN_JOURNAL_DURABILITY sets
# rbd_journal_durability for the run (default: the site's default).
set -euo pipefail
cd "$(dirname "$0")/.."
top=$PWD
out=${1:-$top/bench/results/journal-bench.txt}
# The results file names the code that made it.
echo "# commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- crates bench Cargo.lock 2>/dev/null || echo '+uncommitted'), $(date -u +%Y-%m-%d), $(basename "$0")" >"$out"
RT=${RT:-6}
command -v fio >/dev/null && command -v nbdcopy >/dev/null || bash scripts/deps.sh
cargo build --release --bins --quiet
work=$(mktemp -d "$top/target/journal-bench.XXXXXX")
export TERN_CONF_DIR=$work/conf
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

"$top/target/release/ternd" --data "$work/site" --cluster bench --listen 127.0.0.1:0 \
  --nbd-listen 127.0.0.1:0 --http-listen 127.0.0.1:0 >"$work/ternd.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -s "$work/site/ternd.addr" ] && break; sleep 0.1; done
tern() { "$top/target/release/tern" --cluster bench "$@"; }
tern pool create rbd >/dev/null 2>&1
if [ -n "${TERN_JOURNAL_DURABILITY:-}" ]; then
  tern config set global rbd_journal_durability "$TERN_JOURNAL_DURABILITY"
fi
tern create rbd/plain --size 2G --image-feature layering,exclusive-lock
tern create rbd/journaled --size 2G --image-feature layering,exclusive-lock,journaling
nbd="nbd://$(cat "$work/site/nbd.addr")"
# Both images fully allocated first, so neither pays for allocation.
head -c 1G /dev/urandom >"$work/src.raw"
nbdcopy "$work/src.raw" "$nbd/rbd/plain"
nbdcopy "$work/src.raw" "$nbd/rbd/journaled"
rm -f "$work/src.raw"

job() { # uri name rw bs qd -> prints "iops bw_bytes p99"
  # Every job starts with nothing dirty, so the kernel's writeback of an
  # earlier job's data does not land in this one's measurement.
  sync
  fio --name="$2" --ioengine=nbd --uri="$1" --rw="$3" --bs="$4" --iodepth="$5" --size=1g \
    --time_based --runtime="$RT" --ramp_time=1 --end_fsync=1 --output-format=json 2>/dev/null |
    sed -n '/^{/,$p' |
    jq -r '.jobs[0].write | "\(.iops) \(.bw_bytes) \(.clat_ns.percentile."99.000000" // 0)"'
}

printf '%-22s %14s %14s %7s   %s\n' case journaled plain ratio "p99 clat journaled/plain (us)" | tee -a "$out"
run() { # name rw bs qd unit
  # Journaled, plain, plain, journaled: drift over the run (writeback,
  # other tenants) falls on both sides alike. Rates are the means of two.
  read -r ji jb jp <<<"$(job "$nbd/rbd/journaled" "$1" "$2" "$3" "$4")"
  read -r pi pb pp <<<"$(job "$nbd/rbd/plain" "$1" "$2" "$3" "$4")"
  read -r pi2 pb2 pp2 <<<"$(job "$nbd/rbd/plain" "$1" "$2" "$3" "$4")"
  read -r ji2 jb2 jp2 <<<"$(job "$nbd/rbd/journaled" "$1" "$2" "$3" "$4")"
  mean() { awk -v x="$1" -v y="$2" 'BEGIN{print (x+y)/2}'; }
  ji=$(mean "$ji" "$ji2"); jb=$(mean "$jb" "$jb2"); jp=$(mean "$jp" "$jp2")
  pi=$(mean "$pi" "$pi2"); pb=$(mean "$pb" "$pb2"); pp=$(mean "$pp" "$pp2")
  if [ "$5" = IOPS ]; then a=$ji; b=$pi; else a=$(awk -v x="$jb" 'BEGIN{print x/1048576}'); b=$(awk -v x="$pb" 'BEGIN{print x/1048576}'); fi
  awk -v n="$1" -v a="$a" -v b="$b" -v u="$5" -v jp="$jp" -v pp="$pp" \
    'BEGIN { printf "%-22s %9.0f %-4s %9.0f %-4s %5.2f   %6.0f / %-6.0f\n", n, a, u, b, u, (b > 0 ? a / b : 0), jp/1000, pp/1000 }' | tee -a "$out"
}
run "4k randwrite QD1" randwrite 4k 1 IOPS
run "4k randwrite QD32" randwrite 4k 32 IOPS
run "64k seq write QD1" write 64k 1 MiB/s
run "64k seq write QD8" write 64k 8 MiB/s
tern journal info rbd/journaled | tee -a "$out" || true
echo "(fio nbd engine, one connection, ${RT}s per job, each case run journaled-plain-plain-journaled and averaged, end_fsync; one ternd, same run; durability=${TERN_JOURNAL_DURABILITY:-strict})" | tee -a "$out"
