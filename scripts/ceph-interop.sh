#!/usr/bin/env bash
# Checks tern's rbd streams against a real Ceph 16.2, both directions, and
# writes what it found to bench/results/ceph-interop.txt (with the commit):
#   tern export --export-format 2  ->  rbd import --export-format 2
#   tern export-diff (v1)          ->  rbd import-diff
#   rbd export --export-format 2   ->  tern import --export-format 2 (piped)
#   rbd export-diff                ->  tern import-diff (piped)
# Every step compares the images' content (SHA-256 of a raw export of the
# head and of each snapshot) on both systems. Needs root (apt for Ceph).
set -euo pipefail
cd "$(dirname "$0")/.."
top=$PWD
out=${1:-$top/bench/results/ceph-interop.txt}
cargo build --bins --quiet
work=$(mktemp -d /tmp/ceph-interop.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  scripts/ceph-cluster.sh down "$work/ceph" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
scripts/ceph-cluster.sh up "$work/ceph" >/dev/null
rbd() { command rbd -c "$work/ceph/ceph.conf" "$@" 2>/dev/null; }
export TERN_CONF_DIR=$work/conf
"$top/target/debug/ternd" --data "$work/site" --cluster interop --listen 127.0.0.1:0 \
  --http-listen 127.0.0.1:0 >"$work/ternd.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -s "$work/site/ternd.addr" ] && break; sleep 0.1; done
tern() { "$top/target/debug/tern" --cluster interop "$@"; }
tern pool create rbd >/dev/null
log() { echo "$*" | tee -a "$work/report"; }
sum() { sha256sum "$1" | cut -c1-16; }
same() { # what, tern spec, ceph spec
  tern export "$2" "$work/t.raw" >/dev/null 2>&1
  rbd export "$3" "$work/c.raw"
  local a b; a=$(sum "$work/t.raw"); b=$(sum "$work/c.raw")
  rm -f "$work/t.raw" "$work/c.raw"
  if [ "$a" = "$b" ]; then log "  same  $1 ($a)"; else log "  DIFFERENT  $1: tern $a ceph $b"; fail=1; fi
}
fail=0

log "tern -> ceph"
head -c 4M /dev/urandom >"$work/r1"
tern import --object-size 64K "$work/r1" rbd/img >/dev/null 2>&1
tern snap create rbd/img@s1 >/dev/null 2>&1 && tern snap protect rbd/img@s1
cp "$work/r1" "$work/r2"
head -c 300K /dev/urandom | dd of="$work/r2" bs=4K seek=100 conv=notrunc status=none
truncate -s 6M "$work/r2"
head -c 8K /dev/urandom | dd of="$work/r2" bs=4K seek=1400 conv=notrunc status=none
tern import "$work/r2" rbd/tmp >/dev/null 2>&1 && tern snap create rbd/tmp@s2 >/dev/null
tern export-diff rbd/tmp@s2 "$work/full.diff" >/dev/null 2>&1
tern import-diff "$work/full.diff" rbd/img >/dev/null 2>&1
tern export --export-format 2 rbd/img "$work/img.export2" >/dev/null 2>&1
if rbd import --export-format 2 "$work/img.export2" rbd/img; then
  log "  rbd import --export-format 2 of tern's stream: ok"
else
  log "  rbd import --export-format 2 of tern's stream: FAILED"; fail=1
fi
for s in rbd/img@s1 rbd/img@s2 rbd/img; do same "$s" "$s" "$s"; done
log "  protected on ceph: $(rbd snap ls rbd/img --format json | python3 -c 'import json,sys; print([(s["name"], s["protected"]) for s in json.load(sys.stdin)])')"
head -c 64K /dev/urandom | dd of="$work/r2" bs=4K seek=10 conv=notrunc status=none
tern snap purge rbd/tmp >/dev/null 2>&1; tern rm rbd/tmp >/dev/null 2>&1
tern import "$work/r2" rbd/tmp >/dev/null 2>&1 && tern snap create rbd/tmp@s3 >/dev/null
tern export-diff rbd/tmp@s3 "$work/s3.diff" >/dev/null 2>&1
tern import-diff "$work/s3.diff" rbd/img >/dev/null 2>&1
tern export-diff --from-snap s2 rbd/img@s3 "$work/s2-s3.diff" >/dev/null 2>&1
if rbd import-diff "$work/s2-s3.diff" rbd/img; then log "  rbd import-diff of tern's export-diff: ok"; else log "  rbd import-diff of tern's export-diff: FAILED"; fail=1; fi
same "img@s3 after the diff" rbd/img@s3 rbd/img@s3

log "ceph -> tern"
rbd create --size 8M --object-size 16K rbd/c
rbd bench --io-type write --io-size 4K --io-total 64K --io-pattern rand rbd/c >/dev/null
rbd snap create rbd/c@a && rbd snap protect rbd/c@a
rbd bench --io-type write --io-size 16K --io-total 256K --io-pattern rand rbd/c >/dev/null
rbd snap create rbd/c@b
if rbd export --export-format 2 rbd/c - | tern import --export-format 2 - rbd/c >/dev/null 2>&1; then
  log "  rbd export --export-format 2 | tern import --export-format 2 -: ok"
else
  log "  rbd export --export-format 2 | tern import --export-format 2 -: FAILED"; fail=1
fi
for s in rbd/c@a rbd/c@b rbd/c; do same "$s" "$s" "$s"; done
rbd bench --io-type write --io-size 4K --io-total 32K --io-pattern rand rbd/c >/dev/null
rbd snap create rbd/c@d
if rbd export-diff --from-snap b rbd/c@d - | tern import-diff - rbd/c >/dev/null 2>&1; then
  log "  rbd export-diff | tern import-diff -: ok"
else
  log "  rbd export-diff | tern import-diff -: FAILED"; fail=1
fi
same "c@d after the diff" rbd/c@d rbd/c@d

{
  echo "# scripts/ceph-interop.sh, $(date -u +%F), tern $(git rev-parse --short HEAD), $(command rbd --version | cut -d' ' -f1-3)"
  cat "$work/report"
  [ $fail = 0 ] && echo "result: all equal" || echo "result: FAILED"
} >"$out"
cat "$out"
exit $fail
