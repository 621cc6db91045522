#!/usr/bin/env bash
# A local tern site on loopback, under ./lab, in one command.
#   scripts/lab.sh up      build, start ternd as site-a, print what to try
#   scripts/lab.sh down    stop it
#   scripts/lab.sh status
# (The two-site mirroring lab replaces this once mirroring lands.)
set -euo pipefail
cd "$(dirname "$0")/.."
top=$PWD
lab=$top/lab
export TERN_CONF_DIR=$lab/conf
cmd=${1:-up}
pidfile=$lab/site-a/ternd.pid

running() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

case "$cmd" in
up)
  cargo build --bins --quiet
  mkdir -p "$lab/site-a" "$TERN_CONF_DIR"
  if running; then
    echo "site-a is already running (pid $(cat "$pidfile"))"
  else
    port=${TERN_LAB_PORT:-6789}
    nohup "$top/target/debug/ternd" --data "$lab/site-a" --cluster site-a \
      --listen "127.0.0.1:$port" >"$lab/site-a/ternd.log" 2>&1 &
    echo $! >"$pidfile"
    for _ in $(seq 100); do [ -s "$lab/site-a/ternd.addr" ] && break; sleep 0.1; done
    [ -s "$lab/site-a/ternd.addr" ] || { cat "$lab/site-a/ternd.log"; exit 1; }
  fi
  tern="$top/target/debug/tern --cluster site-a"
  $tern pool create rbd >/dev/null 2>&1 || true
  $tern pool init rbd
  cat <<MSG
site-a is up at $(cat "$lab/site-a/ternd.addr") (TLS, pinned; log: lab/site-a/ternd.log)

Try:
  export TERN_CONF_DIR=$TERN_CONF_DIR PATH=$top/target/debug:\$PATH
  tern --cluster site-a status
  tern --cluster site-a create rbd/vol1 --size 10G
  tern --cluster site-a bench rbd/vol1 --io-type write --io-size 4K --io-threads 16 --io-total 256M --io-pattern rand
  tern --cluster site-a export rbd/vol1 /tmp/vol1.raw
  tern --cluster site-a ls -l rbd
  qemu-img info nbd://127.0.0.1:10809/rbd/vol1     # the image over NBD

Stop it with: scripts/lab.sh down
MSG
  ;;
down)
  if running; then
    kill -TERM "$(cat "$pidfile")"
    for _ in $(seq 100); do running || break; sleep 0.1; done
    echo "site-a stopped"
  else
    echo "site-a is not running"
  fi
  rm -f "$pidfile"
  ;;
status)
  if running; then "$top/target/debug/tern" --cluster site-a status; else echo "site-a is not running"; exit 1; fi
  ;;
*)
  echo "usage: $0 up|down|status" >&2
  exit 22
  ;;
esac
