#!/bin/bash
# libvirt-rbd-check.sh — end-to-end check that libvirt/qemu reach the test
# cluster the way tpl's domains will: a 16 MiB raw disk imported into RBD
# with qemu-img, then three throw-away domains on that image:
#   1. writable disk (head)                       -> virsh start must succeed
#   2. <snapshot name=.../> in <source>, writable -> must FAIL ("Block node is read-only")
#   3. same snapshot with <readonly/>             -> must succeed
#   4. writable disk on an `rbd clone` of the (protected) snapshot, i.e. a
#      linked clone of a template                 -> must succeed
# While 1 runs, `rbd status` must show qemu's watcher and `rbd rm` must be
# refused. Everything it creates (domains, image, snapshot, files) is
# removed at the end, also on failure. The guest does not boot (no OS on
# the disk): "started" means qemu opened the disk.
#
# Needs: ceph-up.sh run with TPL_CEPH_LIBVIRT_URI set (the libvirt secret),
# libvirtd running, qemu-block-extra of the same version as qemu.
# Environment: TPL_CEPH_DIR (/var/lib/tpl-ceph), TPL_CEPH_POOL (tpl),
#              TPL_CEPH_LIBVIRT_URI (qemu:///system), TPL_CEPH_MON_PORT (6789)
set -euo pipefail

D=${TPL_CEPH_DIR:-/var/lib/tpl-ceph}
POOL=${TPL_CEPH_POOL:-tpl}
URI=${TPL_CEPH_LIBVIRT_URI:-qemu:///system}
PORT=${TPL_CEPH_MON_PORT:-6789}
CONF=$D/ceph.conf
IMG=tplcheck-$$
KID=tplcheck-$$-clone
SNAP=tpl
W=$(mktemp -d /tmp/libvirt-rbd-check.XXXXXX)
DOMS=()

die() { echo "libvirt-rbd-check: FAIL: $*" >&2; exit 1; }
[ -s "$CONF" ] || die "no $CONF: run ceph-up.sh first"
[ -s "$D/libvirt-secret.uuid" ] || die "no libvirt secret: run TPL_CEPH_LIBVIRT_URI=$URI ceph-up.sh"
SU=$(cat "$D/libvirt-secret.uuid")
virsh -q -c "$URI" secret-get-value "$SU" >/dev/null 2>&1 || die "libvirt secret $SU missing: run TPL_CEPH_LIBVIRT_URI=$URI ceph-up.sh"

cleanup() {
  set +e
  for d in "${DOMS[@]}"; do
    virsh -q -c "$URI" destroy "$d" >/dev/null 2>&1
    virsh -q -c "$URI" undefine "$d" >/dev/null 2>&1
  done
  # qemu's watch outlives `virsh destroy` by a few seconds (measured ~2 s;
  # up to osd_client_watch_timeout = 30 s when qemu was SIGKILLed): wait
  # for it to go before removing an image
  for i in "$KID" "$IMG"; do
    rbd -c "$CONF" info "$POOL/$i" >/dev/null 2>&1 || continue
    for _ in $(seq 120); do
      rbd -c "$CONF" status "$POOL/$i" 2>/dev/null | grep -q 'watcher=' || break
      sleep 0.5
    done
    rbd -c "$CONF" snap unprotect "$POOL/$i@$SNAP" >/dev/null 2>&1
    rbd -c "$CONF" snap purge --no-progress "$POOL/$i" >/dev/null 2>&1
    rbd -c "$CONF" rm --no-progress "$POOL/$i" >/dev/null 2>&1 \
      || echo "libvirt-rbd-check: WARNING: could not remove $POOL/$i" >&2
  done
  rm -rf "$W"
}
trap cleanup EXIT

# ---- the disk: raw, 16 MiB, a recognisable first sector, imported with qemu-img
qemu-img create -q -f raw "$W/disk.raw" 16M
printf 'tpl-ceph libvirt check\n' | dd of="$W/disk.raw" conv=notrunc status=none
qemu-img convert -f raw -O raw "$W/disk.raw" "rbd:$POOL/$IMG:conf=$CONF:id=admin"
echo "imported $POOL/$IMG (16 MiB) with qemu-img"

disk_xml() {  # image extra-source-xml extra-disk-xml
  cat <<EOF
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <source protocol='rbd' name='$POOL/$1'>
        <host name='127.0.0.1' port='$PORT'/>$2
      </source>
      <auth username='admin'>
        <secret type='ceph' uuid='$SU'/>
      </auth>
      <target dev='vda' bus='virtio'/>$3
    </disk>
EOF
}

domain() {  # name image extra-source-xml extra-disk-xml
  cat > "$W/$1.xml" <<EOF
<domain type='qemu'>
  <name>$1</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
$(disk_xml "$2" "$3" "$4")
  </devices>
</domain>
EOF
  virsh -q -c "$URI" define "$W/$1.xml" >/dev/null
  DOMS+=("$1")
}

show_disk() { echo "--- disk XML:"; sed -n '/<disk/,/<\/disk>/p' "$W/$1.xml"; }

indent() { sed '/^$/d; s/^/    /'; }

OUT=""
start() {  # name -> prints virsh's output (also left in $OUT), returns its status
  local rc=0
  OUT=$(virsh -c "$URI" start "$1" 2>&1) || rc=$?
  echo "--- virsh start $1 (exit $rc):"
  indent <<<"$OUT"
  return $rc
}

# ---- 1. writable disk at the image head
N1=tplcheck-rw-$$
domain "$N1" "$IMG" "" ""
show_disk "$N1"
start "$N1" || die "writable rbd disk did not start"
[ "$(virsh -q -c "$URI" domstate "$N1")" = running ] || die "$N1 not running"
st=$(rbd -c "$CONF" status "$POOL/$IMG")
echo "--- rbd status $POOL/$IMG while $N1 runs:"; indent <<<"$st"
grep -q 'watcher=' <<<"$st" || die "qemu holds no watch on $POOL/$IMG"
if out=$(rbd -c "$CONF" rm --no-progress "$POOL/$IMG" 2>&1); then die "rbd rm of an image in use succeeded"; fi
echo "--- rbd rm while in use (refused, as expected):"; indent <<<"$out"
grep -q 'watchers' <<<"$out" || die "rbd rm refused for another reason than watchers"
virsh -q -c "$URI" destroy "$N1" >/dev/null
rbd -c "$CONF" snap create --no-progress "$POOL/$IMG@$SNAP" >/dev/null
echo "snapshot $POOL/$IMG@$SNAP created"

# ---- 2. snapshot, writable: qemu must refuse
N2=tplcheck-snap-rw-$$
domain "$N2" "$IMG" "
        <snapshot name='$SNAP'/>" ""
show_disk "$N2"
if start "$N2"; then die "a writable disk at an rbd snapshot started"; fi
grep -q 'Block node is read-only' <<<"$OUT" || die "expected 'Block node is read-only'"

# ---- 3. snapshot with <readonly/>: starts
N3=tplcheck-snap-ro-$$
domain "$N3" "$IMG" "
        <snapshot name='$SNAP'/>" "
      <readonly/>"
show_disk "$N3"
start "$N3" || die "read-only disk at an rbd snapshot did not start"
[ "$(virsh -q -c "$URI" domstate "$N3")" = running ] || die "$N3 not running"
virsh -q -c "$URI" destroy "$N3" >/dev/null

# ---- 4. a linked clone of the snapshot: writable, starts
rbd -c "$CONF" snap protect "$POOL/$IMG@$SNAP"
rbd -c "$CONF" clone "$POOL/$IMG@$SNAP" "$POOL/$KID"
echo "cloned $POOL/$IMG@$SNAP -> $POOL/$KID"
N4=tplcheck-clone-$$
domain "$N4" "$KID" "" ""
show_disk "$N4"
start "$N4" || die "a linked clone did not start"
[ "$(virsh -q -c "$URI" domstate "$N4")" = running ] || die "$N4 not running"
virsh -q -c "$URI" destroy "$N4" >/dev/null

echo "libvirt-rbd-check: OK (writable head starts, writable snapshot is refused, read-only snapshot starts, linked clone starts)"
