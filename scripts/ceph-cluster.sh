#!/usr/bin/env bash
# A throwaway single-node Ceph cluster on loopback, for checking tern's rbd
# streams against what Ceph itself writes and reads (not part of the suite:
# Ceph's packages are large).
#   scripts/ceph-cluster.sh up DIR     start mon + one memstore OSD, pool "rbd"
#   scripts/ceph-cluster.sh down DIR   stop it and remove DIR
# Then: rbd -c DIR/ceph.conf ...
set -euo pipefail
cmd=${1:?up|down} dir=${2:?directory}
case $cmd in
down)
  for p in "$dir"/run/*.pid; do [ -f "$p" ] && kill "$(cat "$p")" 2>/dev/null || true; done
  sleep 1; rm -rf "$dir"; exit 0 ;;
up) ;;
*) echo "usage: $0 up|down DIR" >&2; exit 22 ;;
esac
command -v ceph-mon >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q ceph-mon ceph-osd ceph-common >/dev/null
mkdir -p "$dir"/{run,log,mon,osd}
dir=$(cd "$dir" && pwd)
port=${CEPH_MON_PORT:-16789}
fsid=$(cat /proc/sys/kernel/random/uuid)
conf=$dir/ceph.conf
cat >"$conf" <<CONF
[global]
fsid = $fsid
mon host = v1:127.0.0.1:$port
ms bind msgr2 = false
auth cluster required = none
auth service required = none
auth client required = none
osd pool default size = 1
osd pool default min size = 1
osd crush chooseleaf type = 0
mon allow pool delete = true
mon warn on pool no redundancy = false
run dir = $dir/run
pid file = $dir/run/\$name.pid
admin socket = $dir/run/\$name.asok
log file = $dir/log/\$name.log
mon data = $dir/mon/\$id
osd data = $dir/osd/\$id
osd objectstore = memstore
memstore device bytes = 2147483648
[client]
admin socket =
CONF
ceph-authtool --create-keyring "$dir/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
monmaptool --create --addv a "[v1:127.0.0.1:$port]" --fsid "$fsid" "$dir/monmap" >/dev/null
ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/mon.keyring"
ceph-mon -c "$conf" -i a
uuid=$(cat /proc/sys/kernel/random/uuid)
id=$(ceph --connect-timeout 30 -c "$conf" osd new "$uuid")
mkdir -p "$dir/osd/$id"
ceph-osd -c "$conf" -i "$id" --mkfs --osd-uuid "$uuid" 2>/dev/null
ceph-osd -c "$conf" -i "$id"
ceph -c "$conf" osd pool create rbd 8 >/dev/null
# No mgr (pg stats need one): rbd's first operations wait for the PGs.
timeout 120 rbd -c "$conf" pool init rbd
echo "ceph up: rbd -c $conf"
