#!/bin/bash
# ceph-up.sh — bring up a throw-away single-node Ceph cluster without systemd:
# 1 mon + 1 mgr + 1 bluestore OSD (on a sparse file), cephx on, bound to
# 127.0.0.1 only, all state under one directory. Idempotent: re-running it
# starts whatever is not running and creates whatever is missing.
#
# Debian 12 (ceph 16.2 "pacific" from bookworm). Must run as root.
#
# Environment (all optional):
#   TPL_CEPH_DIR        state directory             (/var/lib/tpl-ceph)
#   TPL_CEPH_MON_IP     mon address                 (127.0.0.1)
#   TPL_CEPH_MON_PORT   mon msgr-v1 port            (6789)
#   TPL_CEPH_MON_PORT2  mon msgr-v2 port            (3300)
#   TPL_CEPH_OBJECTSTORE  bluestore (sparse file) or memstore (RAM) (bluestore)
#                       memstore is faster but ephemeral: once its OSD has
#                       stopped, the next ceph-up.sh rebuilds an empty cluster.
#                       bluestore needs O_DIRECT: TPL_CEPH_DIR not on tmpfs.
#                       Objectstore, ports and sizes apply when TPL_CEPH_DIR is
#                       first populated (they are then read from ceph.conf).
#   TPL_CEPH_OSD_SIZE   OSD size, bytes (sparse file / RAM cap) (21474836480 = 20 GiB)
#   TPL_CEPH_OSD_MEM    osd_memory_target, bytes    (1073741824)
#   TPL_CEPH_POOL       rbd pool to create ("" = none)  (tpl)
#   TPL_CEPH_PG         pg_num of that pool         (32)
#   TPL_CEPH_TIMEOUT    seconds to wait for HEALTH_OK (120)
#   TPL_CEPH_INSTALL    1 = apt-get install missing packages (1)
#   TPL_CEPH_LIBVIRT_URI  if set (e.g. qemu:///system): define/refresh a
#                       libvirt ceph secret holding client.admin's key; its
#                       uuid is written to $TPL_CEPH_DIR/libvirt-secret.uuid
#
# Afterwards:  export CEPH_CONF=$TPL_CEPH_DIR/ceph.conf ; ceph -s ; rbd ls tpl
#              (that ceph.conf names client.admin's keyring in its [client]
#              section, so librados/librbd clients need only CEPH_CONF)
# qemu-img:    rbd:tpl/IMAGE:conf=$TPL_CEPH_DIR/ceph.conf:id=admin
# libvirt:     <source protocol='rbd' name='tpl/IMAGE'><host name='127.0.0.1'
#              port='6789'/></source><auth username='admin'><secret type='ceph'
#              uuid='(contents of $TPL_CEPH_DIR/libvirt-secret.uuid)'/></auth>
# Stop:        ceph-down.sh   (same environment)
#
# "Ready" means: mon answers, osd.0's own admin socket says it is active (so a
# restarted OSD really booted, not a stale "up" left in the osdmap by a killed
# one), HEALTH_OK with every PG active+clean, and `rbd ls POOL` answers.
set -euo pipefail

D=${TPL_CEPH_DIR:-/var/lib/tpl-ceph}
MON_IP=${TPL_CEPH_MON_IP:-127.0.0.1}
MON_PORT=${TPL_CEPH_MON_PORT:-6789}
MON_PORT2=${TPL_CEPH_MON_PORT2:-3300}
OBJECTSTORE=${TPL_CEPH_OBJECTSTORE:-bluestore}
OSD_SIZE=${TPL_CEPH_OSD_SIZE:-21474836480}
OSD_MEM=${TPL_CEPH_OSD_MEM:-1073741824}
POOL=${TPL_CEPH_POOL-tpl}
PG=${TPL_CEPH_PG:-32}
TIMEOUT=${TPL_CEPH_TIMEOUT:-120}
INSTALL=${TPL_CEPH_INSTALL:-1}
LIBVIRT_URI=${TPL_CEPH_LIBVIRT_URI:-}

CONF=$D/ceph.conf
ADMIN_KEYRING=$D/ceph.client.admin.keyring
T0=${EPOCHREALTIME/./}

die() { echo "ceph-up: ERROR: $*" >&2; exit 1; }
log() { local us=$(( ${EPOCHREALTIME/./} - T0 )); printf 'ceph-up: [%3d.%01ds] %s\n' $((us / 1000000)) $((us / 100000 % 10)) "$*"; }

[ "$(id -u)" = 0 ] || die "must run as root"
case "$OBJECTSTORE" in bluestore|memstore) ;; *) die "TPL_CEPH_OBJECTSTORE must be bluestore or memstore" ;; esac

# ---------------------------------------------------------------- packages
mkdir -p "$D/log"
PKGS="ceph-mon ceph-mgr ceph-osd ceph-common qemu-block-extra libvirt-daemon-driver-storage-rbd uuid-runtime iproute2"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
done
if [ -n "$missing" ]; then
  [ "$INSTALL" = 1 ] || die "missing packages:$missing (TPL_CEPH_INSTALL=0)"
  # qemu-block-extra carries block-rbd.so; it only loads into the qemu build
  # of exactly the same version, so pin it to the installed qemu (system
  # emulator first, else qemu-utils for qemu-img).
  pins=""
  for p in $missing; do
    if [ "$p" = qemu-block-extra ]; then
      qv=""
      for q in qemu-system-x86 qemu-utils; do
        dpkg-query -W -f='${Status}' "$q" 2>/dev/null | grep -q 'install ok installed' || continue
        qv=$(dpkg-query -W -f='${Version}' "$q"); break
      done
      [ -n "$qv" ] && p="qemu-block-extra=$qv"
    fi
    pins="$pins $p"
  done
  echo "ceph-up: installing:$pins (log: $D/log/apt.log)"
  apt_install() {
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y -q \
      --no-install-recommends $pins >>"$D/log/apt.log" 2>&1
  }
  apt_update() { apt-get -o DPkg::Lock::Timeout=900 update -q >>"$D/log/apt.log" 2>&1; }
  if ! apt-cache policy ceph-mon 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    apt_update || die "apt-get update failed: $(tail -3 "$D/log/apt.log")"
  fi
  # stale package lists (404 on a superseded version) are fixed by one update
  apt_install || { apt_update && apt_install; } \
    || die "apt-get install$pins failed: $(tail -5 "$D/log/apt.log")"
  log "packages installed"
  if pgrep -x libvirtd >/dev/null && \
     ! virsh -c qemu:///system pool-capabilities 2>/dev/null | grep -q "type='rbd' supported='yes'"; then
    echo "ceph-up: NOTE: the running libvirtd predates libvirt-daemon-driver-storage-rbd;" \
         "restart libvirtd for <pool type='rbd'> (rbd network disks of domains go through qemu, not this module)" >&2
  fi
fi
# qemu must be able to load block-rbd.so (module of the same qemu build)
for q in qemu-img qemu-system-x86_64; do
  command -v $q >/dev/null || continue
  if [ $q = qemu-img ]; then fmts=$(qemu-img --help 2>/dev/null); else fmts=$($q -drive format=help 2>/dev/null); fi
  echo "$fmts" | tr ' ' '\n' | grep -qx rbd || \
    echo "ceph-up: WARNING: $q does not list the rbd block driver (qemu-block-extra $(dpkg-query -W -f='${Version}' qemu-block-extra 2>/dev/null) vs $(dpkg -S "$(command -v $q)" 2>/dev/null | cut -d: -f1) $(dpkg-query -W -f='${Version}' "$(dpkg -S "$(command -v $q)" 2>/dev/null | cut -d: -f1)" 2>/dev/null)); versions must match" >&2
done

# ---------------------------------------------------------------- helpers
ceph_() { timeout 30 ceph -c "$CONF" --connect-timeout 10 "$@"; }
pid_alive() {  # pidfile daemon-binary
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1")
  [ -d "/proc/$pid" ] && [ "$(readlink "/proc/$pid/exe" 2>/dev/null | sed 's/ (deleted)$//')" = "/usr/bin/$2" ] \
    && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -qF -- "$CONF"
}
port_owner() { ss -Hltnp "sport = :$1" 2>/dev/null | head -1; }

mkdir -p "$D"/{run,log,crash,mon,mgr,osd}

# ---------------------------------------------------------------- config
if [ ! -s "$CONF" ]; then
  FSID=$(uuidgen)
  cat > "$CONF.tmp" <<EOF
# generated by ceph-up.sh
[global]
fsid = $FSID
mon_initial_members = a
mon_host = [v2:$MON_IP:$MON_PORT2,v1:$MON_IP:$MON_PORT]
public_addr = $MON_IP
cluster_addr = $MON_IP
ms_bind_ipv4 = true
ms_bind_ipv6 = false
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
auth_allow_insecure_global_id_reclaim = false
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_crush_chooseleaf_type = 0
mon_allow_pool_size_one = true
mon_allow_pool_delete = true
mon_warn_on_pool_no_redundancy = false
mon_data_avail_warn = 2
mon_data_avail_crit = 1
run_dir = $D/run
crash_dir = $D/crash
mon_data = $D/mon/\$cluster-\$id
mgr_data = $D/mgr/\$cluster-\$id
osd_data = $D/osd/\$cluster-\$id

[mon]
pid_file = $D/run/\$cluster-\$name.pid
admin_socket = $D/run/\$cluster-\$name.asok
log_file = $D/log/\$cluster-\$name.log
mon_cluster_log_file = $D/log/\$cluster.log

[mgr]
pid_file = $D/run/\$cluster-\$name.pid
admin_socket = $D/run/\$cluster-\$name.asok
log_file = $D/log/\$cluster-\$name.log

[osd]
pid_file = $D/run/\$cluster-\$name.pid
admin_socket = $D/run/\$cluster-\$name.asok
log_file = $D/log/\$cluster-\$name.log
osd_objectstore = $OBJECTSTORE
memstore_device_bytes = $OSD_SIZE
bluestore_block_path = $D/osd/\$cluster-\$id.block
bluestore_block_size = $OSD_SIZE
bluestore_block_create = true
bluestore_block_db_create = false
bluestore_block_wal_create = false
bluestore_fsck_on_mkfs = false
osd_memory_target = $OSD_MEM

[client]
keyring = $D/\$cluster.\$name.keyring
EOF
  mv "$CONF.tmp" "$CONF"
  log "wrote $CONF (fsid $FSID)"
fi
FSID=$(awk '$1=="fsid"{print $3}' "$CONF")

# a memstore OSD loses its objects when it stops (fast shutdown skips the
# save): if ours is not running, the whole cluster is rebuilt from scratch.
if grep -q '^osd_objectstore = memstore' "$CONF" && [ -e "$D/osd/ceph-0/done" ] \
   && ! pid_alive "$D/run/ceph-osd.0.pid" ceph-osd; then
  log "memstore OSD was stopped, its data is gone: rebuilding the cluster"
  for n in mgr.a mon.a; do
    pid_alive "$D/run/ceph-$n.pid" "ceph-${n%%.*}" && kill "$(cat "$D/run/ceph-$n.pid")"
  done
  for n in mgr.a mon.a; do
    for _ in $(seq 100); do pid_alive "$D/run/ceph-$n.pid" "ceph-${n%%.*}" || break; sleep 0.1; done
  done
  rm -rf "$D/mon/ceph-a" "$D/mgr/ceph-a" "$D/osd/ceph-0" "$ADMIN_KEYRING"
fi

# ---------------------------------------------------------------- keys
if [ ! -s "$ADMIN_KEYRING" ]; then
  ceph-authtool --create-keyring "$ADMIN_KEYRING.tmp" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *' >/dev/null
  chmod 600 "$ADMIN_KEYRING.tmp"; mv "$ADMIN_KEYRING.tmp" "$ADMIN_KEYRING"
fi

# ---------------------------------------------------------------- mon
MON_DATA=$D/mon/ceph-a
if [ ! -e "$MON_DATA/done" ]; then
  # a new mon store means a new cluster: whatever mgr/osd state exists is stale
  rm -rf "$MON_DATA" "$D/mon.keyring" "$D/monmap" "$D/mgr/ceph-a" "$D/osd/ceph-0" "$D/osd/ceph-0.block"
  ceph-authtool --create-keyring "$D/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool "$D/mon.keyring" --import-keyring "$ADMIN_KEYRING" >/dev/null
  monmaptool --create --fsid "$FSID" --addv a "[v2:$MON_IP:$MON_PORT2,v1:$MON_IP:$MON_PORT]" "$D/monmap" >/dev/null
  mkdir -p "$MON_DATA"
  ceph-mon -c "$CONF" --mkfs -i a --monmap "$D/monmap" --keyring "$D/mon.keyring" \
    || die "ceph-mon --mkfs failed (see $D/log/ceph-mon.a.log)"
  touch "$MON_DATA/done"; rm -f "$D/mon.keyring" "$D/monmap"
  log "mon store created"
fi
if ! pid_alive "$D/run/ceph-mon.a.pid" ceph-mon; then
  for p in "$MON_PORT" "$MON_PORT2"; do
    o=$(port_owner "$p"); [ -z "$o" ] || die "port $p already in use: $o (set TPL_CEPH_MON_PORT/TPL_CEPH_MON_PORT2 on a fresh TPL_CEPH_DIR)"
  done
  ceph-mon -c "$CONF" -i a >>"$D/log/ceph-mon.a.out" 2>&1 \
    || die "ceph-mon failed to start: $(tail -3 "$D/log/ceph-mon.a.out") (see $D/log/ceph-mon.a.log)"
  log "ceph-mon started (pid $(cat "$D/run/ceph-mon.a.pid" 2>/dev/null || echo ?))"
fi
for _ in $(seq 60); do ceph_ mon stat >/dev/null 2>&1 && break; sleep 0.5; done
ceph_ mon stat >/dev/null 2>&1 || die "mon does not answer (see $D/log/ceph-mon.a.log)"
log "mon answers"

# ---------------------------------------------------------------- mgr
MGR_DATA=$D/mgr/ceph-a
if [ ! -s "$MGR_DATA/keyring" ]; then
  mkdir -p "$MGR_DATA"
  ceph_ auth get-or-create mgr.a mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
    > "$MGR_DATA/keyring.tmp" || die "cannot create mgr.a key"
  mv "$MGR_DATA/keyring.tmp" "$MGR_DATA/keyring"
fi
if ! pid_alive "$D/run/ceph-mgr.a.pid" ceph-mgr; then
  ceph-mgr -c "$CONF" -i a >>"$D/log/ceph-mgr.a.out" 2>&1 \
    || die "ceph-mgr failed to start: $(tail -3 "$D/log/ceph-mgr.a.out") (see $D/log/ceph-mgr.a.log)"
  log "ceph-mgr started (pid $(cat "$D/run/ceph-mgr.a.pid" 2>/dev/null || echo ?))"
fi

# ---------------------------------------------------------------- osd
OSD_DATA=$D/osd/ceph-0
if [ ! -e "$OSD_DATA/done" ]; then
  # a half-made OSD from an interrupted run: drop it and start over
  if ceph_ osd ls 2>/dev/null | grep -qx 0; then
    ceph_ osd purge 0 --yes-i-really-mean-it >/dev/null 2>&1 || true
  fi
  ceph_ auth del osd.0 >/dev/null 2>&1 || true
  rm -rf "$OSD_DATA" "$D/osd/ceph-0.block"; mkdir -p "$OSD_DATA"
  OSD_UUID=$(uuidgen)
  OSD_KEY=$(ceph-authtool --gen-print-key)
  printf '{"cephx_secret": "%s"}\n' "$OSD_KEY" > "$D/osd-secret.json"
  id=$(ceph_ osd new "$OSD_UUID" -i "$D/osd-secret.json") || die "ceph osd new failed"
  rm -f "$D/osd-secret.json"
  [ "$id" = 0 ] || die "expected osd id 0, got '$id' (stale cluster state in $D? run ceph-down.sh --purge)"
  ceph-authtool --create-keyring "$OSD_DATA/keyring" --name osd.0 --add-key "$OSD_KEY" >/dev/null
  ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$OSD_UUID" >"$D/log/osd-mkfs.log" 2>&1 \
    || die "ceph-osd --mkfs failed: $(tail -5 "$D/log/osd-mkfs.log")"
  touch "$OSD_DATA/done"
  log "osd.0 created ($OBJECTSTORE, $OSD_SIZE bytes$([ "$OBJECTSTORE" = bluestore ] && echo ", sparse file $D/osd/ceph-0.block"))"
fi
if ! pid_alive "$D/run/ceph-osd.0.pid" ceph-osd; then
  ceph-osd -c "$CONF" -i 0 >>"$D/log/ceph-osd.0.out" 2>&1 \
    || die "ceph-osd failed to start: $(tail -3 "$D/log/ceph-osd.0.out") (see $D/log/ceph-osd.0.log)"
  log "ceph-osd started (pid $(cat "$D/run/ceph-osd.0.pid" 2>/dev/null || echo ?))"
fi
# The osdmap alone can lie: an OSD killed with SIGKILL stays "up" in it (a
# single OSD has no peer to report it), so a restarted one counts as up
# before it has booted. Its own admin socket says whether *this* process is
# active (booted and marked up by the mon).
osd_active() {
  timeout 10 ceph --admin-daemon "$D/run/ceph-osd.0.asok" status 2>/dev/null | grep -Eq '"state": *"active"' \
    && ceph_ osd stat -f json 2>/dev/null | grep -q '"num_up_osds":1'
}
for _ in $(seq $((TIMEOUT * 2))); do
  osd_active && break
  sleep 0.5
done
osd_active || die "osd.0 not active after ${TIMEOUT}s (see $D/log/ceph-osd.0.log)"
log "osd.0 up"

# ---------------------------------------------------------------- pool
if [ -n "$POOL" ]; then
  if ! ceph_ osd pool ls | grep -qx "$POOL"; then
    ceph_ osd pool create "$POOL" "$PG" >/dev/null 2>&1 || die "pool create $POOL failed"
    log "pool $POOL created"
  fi
  # also when an earlier run was interrupted between create and init
  if ! ceph_ osd pool application get "$POOL" 2>/dev/null | grep -q '"rbd"'; then
    timeout 60 rbd -c "$CONF" pool init "$POOL" || die "rbd pool init $POOL failed"
    log "pool $POOL initialised for rbd"
  fi
fi

# ---------------------------------------------------------------- health
# HEALTH_OK alone is not enough: right after a restart the mgr has no PG
# stats yet and the mon says HEALTH_OK while no PG is active.
h="" pg=""
for _ in $(seq $((TIMEOUT * 2))); do
  h=$(ceph_ health 2>/dev/null || true)
  pg=$(ceph_ pg stat 2>/dev/null || true)
  if [ "$h" = HEALTH_OK ]; then
    if [[ $pg =~ ^([0-9]+)\ pgs:\ ([0-9]+)\ active\+clean\; ]] && [ "${BASH_REMATCH[1]}" = "${BASH_REMATCH[2]}" ]; then
      break
    fi
    [ -z "$POOL" ] && [[ $pg =~ ^0\ pgs: ]] && break
  fi
  h="$h (pgs: ${pg%%;*})"
  sleep 0.5
done
if [ "$h" != HEALTH_OK ]; then
  ceph_ health detail >&2 || true
  die "cluster not HEALTH_OK with all PGs active+clean after ${TIMEOUT}s: $h"
fi
log "HEALTH_OK, ${pg%%;*}"

# ---------------------------------------------------------------- end to end
# a real client round trip through the pool (PGs served by this OSD process)
if [ -n "$POOL" ]; then
  timeout 60 rbd -c "$CONF" ls "$POOL" >/dev/null || die "rbd ls $POOL does not answer"
fi

# ---------------------------------------------------------------- libvirt secret
if [ -n "$LIBVIRT_URI" ]; then
  USAGE="tpl-ceph client.admin $FSID"
  # a secret with our usage may exist under another uuid (uuid file lost):
  # libvirt refuses a second one with the same usage, so adopt it
  existing=$(virsh -q -c "$LIBVIRT_URI" secret-list 2>/dev/null | awk -v u="ceph $USAGE" '{ uuid = $1; $1 = ""; sub(/^ +/, ""); if ($0 == u) print uuid }' | head -1)
  if [ -n "$existing" ]; then
    echo "$existing" > "$D/libvirt-secret.uuid"
  elif [ ! -s "$D/libvirt-secret.uuid" ]; then
    uuidgen > "$D/libvirt-secret.uuid"
  fi
  SU=$(cat "$D/libvirt-secret.uuid")
  cat > "$D/libvirt-secret.xml" <<EOF
<secret ephemeral='no' private='no'>
  <uuid>$SU</uuid>
  <usage type='ceph'><name>$USAGE</name></usage>
</secret>
EOF
  virsh -q -c "$LIBVIRT_URI" secret-define "$D/libvirt-secret.xml" >/dev/null || die "virsh secret-define failed"
  # --file without --plain: the file holds the base64 key exactly as ceph
  # prints it (--plain would store the base64 text itself as the key)
  (umask 077; ceph_ auth get-key client.admin > "$D/client.admin.key") || die "ceph auth get-key client.admin failed"
  if ! virsh -q -c "$LIBVIRT_URI" secret-set-value "$SU" --file "$D/client.admin.key" >/dev/null; then
    rm -f "$D/client.admin.key"; die "virsh secret-set-value failed"
  fi
  rm -f "$D/client.admin.key"
  log "libvirt secret $SU holds client.admin's key ($LIBVIRT_URI)"
fi

echo "ceph-up: ready: CEPH_CONF=$CONF  mon $MON_IP:$MON_PORT (v1) / :$MON_PORT2 (v2)  fsid $FSID"
