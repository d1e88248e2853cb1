#!/bin/bash
# hvnet-smoke.sh — check the rig of issue 20 end to end, by hand or in a script:
# start hvnet (scripts/hvnet-up.sh), build or reuse the Debian 12 guest
# (tests/guest/build-debian.sh), boot a throwaway overlay of it (bigger than the
# image, so cloud-init must grow the root file system) on hvnet's network tplnet
# with a NoCloud seed made here (a user and an SSH key generated for the run), wait
# for its DHCP lease, log in with ssh FROM INSIDE hvnet's network namespace
# (scripts/hvnet-exec.sh), run hostname and df -h /, then remove everything it made.
# hvnet is left running if it was running before, and stopped otherwise (KEEP_HVNET=1
# keeps it). Prints the times it measured; exit 0 only if the login worked.
#
# Environment: TPL_HVNET_DIR (hvnet-lib.sh), TPL_DEBIAN_CACHE (build-debian.sh),
# SMOKE_DISK_SIZE (overlay's virtual size, default 3G), SMOKE_TIMEOUT (seconds to
# wait for the lease and for ssh, default 300), KEEP_HVNET, KEEP_WORK=1 (keep the
# work directory with the console log), SMOKE_IMAGE=DISK.qcow2 (boot an overlay of this
# image instead, e.g. a template tpl-generalize made from the Debian guest; its kernel
# and initrd are DISK-without-.qcow2.vmlinuz and .initrd, as build-debian.sh writes them).
# Must run as root.
set -euo pipefail
PROG=hvnet-smoke
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
# shellcheck source=hvnet-lib.sh
. "$HERE/hvnet-lib.sh"
[ $# = 0 ] || { echo "usage: $0   (no arguments)" >&2; exit 2; }
[ "$(id -u)" = 0 ] || die "must run as root"
for b in ssh ssh-keygen qemu-img virsh xorriso; do
  command -v "$b" >/dev/null || die "$b not found (make deps)"
done
DISK_SIZE=${SMOKE_DISK_SIZE:-3G}
TIMEOUT=${SMOKE_TIMEOUT:-300}
NAME=tpl-smoke-$$
now() { echo "${EPOCHREALTIME/./}"; }
secs() { local us=$(( $2 - $1 )); printf '%d.%01d' $((us / 1000000)) $((us / 100000 % 10)); }

was_up=0
[ -n "$(hvnet_daemon libvirtd)" ] && was_up=1
W=$(mktemp -d /var/tmp/tpl-smoke.XXXXXX)
chmod 755 "$W"
cleanup() {
  local rc=$?
  virsh -q -c "$URI" destroy "$NAME" >/dev/null 2>&1 || true
  virsh -q -c "$URI" undefine "$NAME" >/dev/null 2>&1 || true
  if [ "$rc" != 0 ] && [ -s "$W/console.log" ]; then
    echo "$PROG: last lines of the guest's console ($W/console.log):" >&2
    tail -25 "$W/console.log" | sed "s/^/$PROG:   | /" >&2
  fi
  if [ "${KEEP_WORK:-0}" = 1 ] || [ "$rc" != 0 ]; then
    echo "$PROG: work directory kept: $W" >&2
  else
    rm -rf "$W"
  fi
  if [ "$was_up" = 0 ] && [ "${KEEP_HVNET:-0}" != 1 ]; then
    "$HERE/hvnet-down.sh" >/dev/null || echo "$PROG: hvnet-down.sh failed" >&2
  fi
}
trap cleanup EXIT

t=$(now)
"$HERE/hvnet-up.sh" >/dev/null
t_up=$(secs "$t" "$(now)")
log "hvnet is up (${t_up}s)"

t=$(now)
if [ -n "${SMOKE_IMAGE:-}" ]; then
  IMG=$(readlink -f "$SMOKE_IMAGE")
  [ -f "$IMG" ] || die "SMOKE_IMAGE $SMOKE_IMAGE is not a file"
  KERNEL=${IMG%.qcow2}.vmlinuz INITRD=${IMG%.qcow2}.initrd
  if [ ! -f "$KERNEL" ] || [ ! -f "$INITRD" ]; then die "no $KERNEL and $INITRD beside SMOKE_IMAGE"; fi
  cached=given
else
  "$ROOT/tests/guest/build-debian.sh" "$W/debian.qcow2" 2>"$W/build.log" || { cat "$W/build.log" >&2; die "build-debian.sh failed"; }
  IMG=$W/debian.qcow2 KERNEL=$W/debian.vmlinuz INITRD=$W/debian.initrd
  cached=built; grep -q '] cached: ' "$W/build.log" && cached=cached
fi
t_build=$(secs "$t" "$(now)")
log "Debian image ready (${t_build}s, $cached): $IMG, $(qemu-img info --output=json "$IMG" | python3 -c 'import json,sys; i=json.load(sys.stdin); print("virtual %.1f GiB, file %.0f MiB" % (i["virtual-size"]/2**30, i["actual-size"]/2**20))')"

qemu-img create -q -f qcow2 -F qcow2 -b "$IMG" "$W/overlay.qcow2" "$DISK_SIZE"
ssh-keygen -q -t ed25519 -N '' -C "tpl-smoke" -f "$W/id"
mkdir "$W/seed"
cat > "$W/seed/user-data" <<EOF
#cloud-config
users:
  - name: tplsmoke
    shell: /bin/bash
    sudo: ALL=(ALL) NOPASSWD:ALL
    ssh_authorized_keys:
      - $(cat "$W/id.pub")
EOF
printf 'instance-id: %s\nlocal-hostname: %s\n' "iid-$NAME" "$NAME" > "$W/seed/meta-data"
xorriso -as mkisofs -quiet -V cidata -J -R -o "$W/seed.iso" "$W/seed/user-data" "$W/seed/meta-data" 2>/dev/null ||
  die "xorriso could not make the seed ISO"

seed="<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='$W/seed.iso'/><target dev='vdb' bus='virtio'/><readonly/></disk>"
sed -e "s|@NAME@|$NAME|" -e "s|@KERNEL@|$KERNEL|" -e "s|@INITRD@|$INITRD|" \
    -e "s|@DISK@|$W/overlay.qcow2|" -e "s|@CONSOLE@|$W/console.log|" -e "s|@EXTRA@|$seed|" \
    "$ROOT/tests/guest/debian-domain.xml" > "$W/domain.xml"
virsh -q -c "$URI" define "$W/domain.xml" >/dev/null
mac=$(virsh -q -c "$URI" domiflist "$NAME" | awk '{print $5; exit}')
t0=$(now)
virsh -q -c "$URI" start "$NAME" >/dev/null
log "started $NAME (MAC $mac) on $NET, waiting for its lease"

ip=""
deadline=$(( $(date +%s) + TIMEOUT ))
while [ -z "$ip" ]; do
  ip=$(virsh -q -c "$URI" net-dhcp-leases "$NET" --mac "$mac" 2>/dev/null | awk '$4 == "ipv4" { sub(/\/.*/, "", $5); print $5; exit }')
  [ -n "$ip" ] && break
  [ "$(date +%s)" -lt "$deadline" ] || die "no DHCP lease for $mac within ${TIMEOUT}s"
  [ "$(virsh -q -c "$URI" domstate "$NAME" 2>/dev/null)" = running ] || die "$NAME is not running any more"
  sleep 0.5
done
t_lease=$(secs "$t0" "$(now)")
log "lease: $ip after ${t_lease}s"

# ssh runs inside hvnet's network namespace: from the host's, $ip does not exist
sshopts=(-i "$W/id" -o BatchMode=yes -o StrictHostKeyChecking=accept-new -o UserKnownHostsFile="$W/known_hosts"
         -o ConnectTimeout=5 -o LogLevel=ERROR -o HashKnownHosts=no)
n=0
until "$HERE/hvnet-exec.sh" ssh "${sshopts[@]}" "tplsmoke@$ip" true 2>"$W/ssh.err"; do
  n=$((n + 1))
  [ "$(date +%s)" -lt "$deadline" ] || die "no ssh login to tplsmoke@$ip within ${TIMEOUT}s: $(tail -1 "$W/ssh.err")"
  sleep 1
done
t_ssh=$(secs "$t0" "$(now)")
log "ssh login as tplsmoke@$ip after ${t_ssh}s ($n failed tries before)"
# shellcheck disable=SC2016  # expanded by the guest's shell
"$HERE/hvnet-exec.sh" ssh "${sshopts[@]}" "tplsmoke@$ip" 'echo "hostname: $(hostname)"; df -h /; echo "cloud-init: $(cloud-init status 2>/dev/null)"' |
  sed "s/^/$PROG:   | /"
got=$("$HERE/hvnet-exec.sh" ssh "${sshopts[@]}" "tplsmoke@$ip" hostname)
[ "$got" = "$NAME" ] || die "the guest says its hostname is '$got', not $NAME"
ssh-keygen -l -f "$W/known_hosts" | sed "s/^/$PROG: host key /"
# the guest agent answers (tpl may read addresses through it)
agent=""
for _ in $(seq 60); do
  agent=$(virsh -q -c "$URI" domifaddr "$NAME" --source agent 2>/dev/null | awk '$1 != "lo" && $3 == "ipv4" { print $1 " " $4 }') || true
  [ -n "$agent" ] && break
  sleep 0.5
done
[ -n "$agent" ] || die "the guest agent does not answer (virsh domifaddr $NAME --source agent)"
log "guest agent: $agent"
cat <<EOF
$PROG: TIMES hvnet-up ${t_up}s, image ${t_build}s ($cached), start-to-lease ${t_lease}s, start-to-ssh ${t_ssh}s
EOF
log "ok"
