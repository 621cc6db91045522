#!/usr/bin/env bash
# fio (nbd engine) against tern's NBD export and against qemu-nbd serving a
# raw file on the same disk, in one run; prints tern/qemu-nbd ratios.
#   bench/nbd-bench.sh [results-file]        RT=seconds per job (default 8)
# Cases: 4 KiB random write and read at QD1 and QD32, 1 MiB sequential
# write and read at QD8. Both servers get the same fio jobs on a 2 GiB export
# whose first 1 GiB is written first, so reads hit data.
set -euo pipefail
cd "$(dirname "$0")/.."
top=$PWD
out=${1:-$top/bench/results/nbd-bench.txt}
# The results file names the code that made it.
echo "# commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- crates bench Cargo.lock 2>/dev/null || echo '+uncommitted'), $(date -u +%Y-%m-%d), $(basename "$0")" >"$out"
RT=${RT:-8}
command -v fio >/dev/null && command -v qemu-nbd >/dev/null && command -v nbdcopy >/dev/null || bash scripts/deps.sh
cargo build --release --bins --quiet
work=$(mktemp -d "$top/target/nbd-bench.XXXXXX")
export TERN_CONF_DIR=$work/conf
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

head -c 1G /dev/urandom >"$work/src1g.raw"

# tern
"$top/target/release/ternd" --data "$work/site" --cluster bench --listen 127.0.0.1:0 \
  --nbd-listen 127.0.0.1:0 --http-listen 127.0.0.1:0 >"$work/ternd.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -s "$work/site/ternd.addr" ] && break; sleep 0.1; done
tern() { "$top/target/release/tern" --cluster bench "$@"; }
tern pool create rbd >/dev/null 2>&1
tern create rbd/bench --size 2G
tern_uri="nbd://$(cat "$work/site/nbd.addr")/rbd/bench"

# qemu-nbd on a raw file in the same directory
truncate -s 2G "$work/export.raw"
qemu-nbd -f raw -b 127.0.0.1 -p 10899 -t -e 8 --cache=writeback --aio=threads --discard=unmap \
  "$work/export.raw" >"$work/qemu-nbd.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do nbdinfo --size nbd://127.0.0.1:10899/ >/dev/null 2>&1 && break; sleep 0.1; done
qemu_uri="nbd://127.0.0.1:10899/"

nbdcopy "$work/src1g.raw" "$tern_uri"
nbdcopy "$work/src1g.raw" "$qemu_uri"

job() { # uri name rw bs qd -> prints "iops bw_bytes"
  fio --name="$2" --ioengine=nbd --uri="$1" --rw="$3" --bs="$4" --iodepth="$5" --size=1g \
    --time_based --runtime="$RT" --ramp_time=1 --output-format=json 2>/dev/null | sed -n '/^{/,$p' |
    jq -r '.jobs[0] | (if .write.io_bytes > 0 then .write else .read end) | "\(.iops) \(.bw_bytes) \(.clat_ns.percentile."99.000000" // 0)"'
}

printf '%-22s %12s %12s %7s   %s\n' case tern qemu-nbd ratio "p99 clat tern/qemu (us)" | tee -a "$out"
run() { # name rw bs qd unit
  read -r ti tb tp <<<"$(job "$tern_uri" "$1" "$2" "$3" "$4")"
  read -r qi qb qp <<<"$(job "$qemu_uri" "$1" "$2" "$3" "$4")"
  if [ "$5" = IOPS ]; then a=$ti; b=$qi; else a=$(awk -v x="$tb" 'BEGIN{print x/1048576}'); b=$(awk -v x="$qb" 'BEGIN{print x/1048576}'); fi
  awk -v n="$1" -v a="$a" -v b="$b" -v u="$5" -v tp="$tp" -v qp="$qp" \
    'BEGIN { printf "%-22s %9.0f %-4s %7.0f %-4s %5.2f   %6.0f / %-6.0f\n", n, a, u, b, u, (b > 0 ? a / b : 0), tp/1000, qp/1000 }' | tee -a "$out"
}
run "4k randwrite QD1" randwrite 4k 1 IOPS
run "4k randread QD1" randread 4k 1 IOPS
run "4k randwrite QD32" randwrite 4k 32 IOPS
run "4k randread QD32" randread 4k 32 IOPS
run "1M seq write QD8" write 1m 8 MiB/s
run "1M seq read QD8" read 1m 8 MiB/s
echo "(fio nbd engine, one connection, ${RT}s per job; same disk, same run)" | tee -a "$out"
