#!/usr/bin/env bash
# Snapshot-mirroring throughput between two sites on loopback (release build):
#  - initial sync of a 2 GiB image with 1 GiB written, as a ratio to nbdcopy
#    moving the same snapshot between the same two sites over NBD, same run;
#  - incremental bytes sent / bytes changed for a contiguous 16 MiB change
#    and for 16 MiB of random 4 KiB writes.
#   bench/mirror-sync-bench.sh [results-file]
set -euo pipefail
cd "$(dirname "$0")/.."
top=$PWD
out=${1:-$top/bench/results/mirror-sync-bench.txt}
# The results file names the code that made it.
echo "# commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- crates bench Cargo.lock 2>/dev/null || echo '+uncommitted'), $(date -u +%Y-%m-%d), $(basename "$0")" >"$out"
command -v fio >/dev/null && command -v nbdcopy >/dev/null || bash scripts/deps.sh
cargo build --release --bins --quiet
bin=$top/target/release
work=$(mktemp -d "$top/target/mirror-bench.XXXXXX")
export TERN_CONF_DIR=$work/conf
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
t() { "$bin/tern" --cluster "$@"; }
for s in site-a site-b; do
  "$bin/ternd" --data "$work/$s" --cluster $s --listen 127.0.0.1:0 --nbd-listen 127.0.0.1:0 --http-listen 127.0.0.1:0 >"$work/$s.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do [ -s "$work/$s/ternd.addr" ] && break; sleep 0.1; done
  t $s pool create rbd >/dev/null 2>&1; t $s pool init rbd
  t $s mirror pool enable rbd image --site-name $s
  t $s auth get-or-create client.rbd-mirror mon 'profile rbd-mirror' osd 'profile rbd' -o "$TERN_CONF_DIR/$s.client.rbd-mirror.keyring"
done
t site-a mirror pool peer bootstrap create rbd >"$work/token"
t site-b mirror pool peer bootstrap import --site-name site-b rbd "$work/token"
for s in site-a site-b; do "$bin/tern-mirror" --cluster $s --metrics-listen 127.0.0.1:0 >"$work/$s.mirror.log" 2>&1 & pids+=($!); done
A=nbd://$(cat "$work/site-a/nbd.addr"); B=nbd://$(cat "$work/site-b/nbd.addr")

newest_primary() { t site-a snap ls --all rbd/img --format json | jq '[.[] | select(.namespace.state=="primary") | .id] | max'; }
wait_copy() { # primary snap id
  for _ in $(seq 6000); do
    got=$(t site-b snap ls --all rbd/img --format json 2>/dev/null | jq "[.[] | select(.namespace.complete==true and .namespace.primary_snap_id==$1)] | length" 2>/dev/null || echo 0)
    [ "$got" = 1 ] && return 0; sleep 0.05
  done; echo "sync did not finish" >&2; exit 1
}
last_bytes() { t site-b mirror image status rbd/img --format json | jq -r '.description' | sed 's/^replaying, //' | jq '.last_snapshot_bytes'; }

t site-a create rbd/img --size 2G --image-feature exclusive-lock
t site-a mirror image enable rbd/img snapshot
wait_copy "$(newest_primary)"
head -c 1G /dev/urandom >"$work/src.raw"
nbdcopy "$work/src.raw" "$A/rbd/img"
s0=$(date +%s.%N); t site-a mirror image snapshot rbd/img >/dev/null; wait_copy "$(newest_primary)"; s1=$(date +%s.%N)
sync=$(echo "$s1 - $s0" | bc)
snap=$(t site-a snap ls --all rbd/img --format json | jq -r '[.[] | select(.namespace.state=="primary")] | max_by(.id) | .name')
t site-b create rbd/baseline --size 2G
c0=$(date +%s.%N); nbdcopy "$A/rbd/img@$snap" "$B/rbd/baseline"; c1=$(date +%s.%N)
copy=$(echo "$c1 - $c0" | bc)
{
  printf 'initial sync, 2 GiB image with 1 GiB written: tern %.2f s (%.0f MiB/s), nbdcopy site-a->site-b %.2f s (%.0f MiB/s), ratio %.2f\n' \
    "$sync" "$(echo "1024 / $sync" | bc -l)" "$copy" "$(echo "1024 / $copy" | bc -l)" "$(echo "$copy / $sync" | bc -l)"
} | tee -a "$out"

# Incremental: contiguous 16 MiB.
head -c 16M /dev/urandom >"$work/16m.raw"
qemu-io -f raw -c "write -P 0x5a 512M 16M" "$A/rbd/img" >/dev/null
t site-a mirror image snapshot rbd/img >/dev/null; wait_copy "$(newest_primary)"; sleep 1.2
b1=$(last_bytes)
printf 'incremental, 16 MiB contiguous change: sent %d bytes, ratio sent/changed %.2f\n' "$b1" "$(echo "$b1 / 16777216" | bc -l)" | tee -a "$out"
# Incremental: 16 MiB of random 4 KiB writes (4096 writes, some overlapping).
fio --name=r --ioengine=nbd --uri="$A/rbd/img" --rw=randwrite --bs=4k --io_size=16m --size=2g --randrepeat=0 >/dev/null 2>&1
t site-a mirror image snapshot rbd/img >/dev/null; wait_copy "$(newest_primary)"; sleep 1.2
b2=$(last_bytes)
printf 'incremental, 4096 random 4 KiB writes (16 MiB): sent %d bytes, ratio sent/written %.2f\n' "$b2" "$(echo "$b2 / 16777216" | bc -l)" | tee -a "$out"
echo "(release build, loopback, TLS; the copy's granularity is 8 KiB for 4 MiB objects)" | tee -a "$out"
