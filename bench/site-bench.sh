#!/usr/bin/env bash
# tern bench against one site vs fio on a raw file on the same disk, in one
# run, so the ratios mean something on a noisy machine.
#   bench/site-bench.sh [results-file]
# Cases (like `rbd bench`): 4 KiB random write and read at 16 threads,
# 1 MiB sequential write and read (4 threads). fio uses the same block size,
# thread count and buffered psync I/O on a preallocated raw file.
set -euo pipefail
cd "$(dirname "$0")/.."
top=$PWD
out=${1:-$top/bench/results/site-bench.txt}
# The results file names the code that made it.
echo "# commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- crates bench Cargo.lock 2>/dev/null || echo '+uncommitted'), $(date -u +%Y-%m-%d), $(basename "$0")" >"$out"
command -v fio >/dev/null || bash scripts/deps.sh
cargo build --release --bins --quiet
work=$(mktemp -d "$top/target/bench.XXXXXX")
export TERN_CONF_DIR=$work/conf
cleanup() { [ -n "${pid:-}" ] && kill -9 "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

"$top/target/release/ternd" --data "$work/site" --cluster bench --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 >"$work/ternd.log" 2>&1 &
pid=$!
for _ in $(seq 100); do [ -s "$work/site/ternd.addr" ] && break; sleep 0.1; done
tern() { "$top/target/release/tern" --cluster bench "$@"; }
tern pool create rbd >/dev/null 2>&1
tern create rbd/bench --size 2G

size=2G
fio_raw="$work/raw.img"
fallocate -l $size "$fio_raw" 2>/dev/null || truncate -s $size "$fio_raw"

run_tern() { # type pattern bs threads total
  tern bench rbd/bench --io-type "$1" --io-pattern "$2" --io-size "$3" --io-threads "$4" --io-total "$5" --format json
}
run_fio() { # rw bs threads
  fio --name=b --filename="$fio_raw" --rw="$1" --bs="$2" --numjobs="$3" --thread --group_reporting \
    --ioengine=psync --size=$size --time_based --runtime=8 --output-format=json 2>/dev/null
}

printf '%-28s %14s %14s %8s\n' case tern fio ratio | tee -a "$out"
line() { # name tern_value fio_value unit
  ratio=$(awk -v a="$2" -v b="$3" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')
  printf '%-28s %12.0f%s %12.0f%s %8s\n' "$1" "$2" "$4" "$3" "$4" "$ratio" | tee -a "$out"
}

# Writes first so the reads find data.
t=$(run_tern write rand 4K 16 1G); f=$(run_fio randwrite 4k 16)
line "4K randwrite 16 threads" "$(jq .ops_per_sec <<<"$t")" "$(jq '.jobs[0].write.iops' <<<"$f")" " IOPS"
t=$(run_tern read rand 4K 16 512M); f=$(run_fio randread 4k 16)
line "4K randread 16 threads" "$(jq .ops_per_sec <<<"$t")" "$(jq '.jobs[0].read.iops' <<<"$f")" " IOPS"
t=$(run_tern write seq 1M 4 4G); f=$(run_fio write 1M 4)
line "1M seq write 4 threads" "$(jq '.bytes_per_sec / 1048576' <<<"$t")" "$(jq '.jobs[0].write.bw_bytes / 1048576' <<<"$f")" " MiB/s"
t=$(run_tern read seq 1M 4 4G); f=$(run_fio read 1M 4)
line "1M seq read 4 threads" "$(jq '.bytes_per_sec / 1048576' <<<"$t")" "$(jq '.jobs[0].read.bw_bytes / 1048576' <<<"$f")" " MiB/s"
echo "(tern: gRPC over TLS on loopback, one connection; fio: psync on a raw file, same disk)" | tee -a "$out"
