#!/bin/bash
# hvnet-up.sh — start "hvnet", the hypervisor of the network tests (issue 20): a
# privileged libvirtd + its own virtlogd in a network namespace AND a mount
# namespace of their own. Its guests' network, the libvirt NAT network "tplnet"
# (bridge virbr-tpl, dnsmasq for DHCP, 192.168.123.0/24 by default), exists only in
# that network namespace: the host's namespace has no route, no bridge and no
# address of it, so no test can send a packet to a guest from the host's namespace
# by mistake. It has no TCP listener; it is reached through its unix socket only:
#
#     virsh -c 'qemu+unix:///system?socket=/var/lib/tpl-hvnet/run/libvirt/libvirt-sock' list --all
#
# and whatever must talk to a guest (ssh, a tool waiting for a guest's SSH server)
# runs inside the namespace:
#
#     scripts/hvnet-exec.sh ssh -i KEY user@192.168.123.N      (= nsenter --net=/var/lib/tpl-hvnet/netns ...)
#
# Its /var/lib/libvirt/images is $TPL_HVNET_DIR/lib/images on the host; every other
# path (/boot, /tmp, /var/tmp, ...) is shared with the host, as for hv2.
# Idempotent: a running hvnet is left alone (its network is defined, autostarted and
# started if it is not); a half-dead one (daemons killed, orphaned qemu or dnsmasq,
# namespace unbound) is stopped and started afresh. Stop it with hvnet-down.sh.
# Must run as root. Environment: see hvnet-lib.sh (TPL_HVNET_DIR, TPL_HVNET_PREFIX,
# TPL_HVNET_WAIT).
set -euo pipefail
PROG=hvnet-up
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=hvnet-lib.sh
. "$HERE/hvnet-lib.sh"

[ $# = 0 ] || { echo "usage: $0   (no arguments; environment: TPL_HVNET_DIR TPL_HVNET_PREFIX TPL_HVNET_WAIT)" >&2; exit 2; }
check_env
for b in libvirtd virtlogd virsh unshare nsenter flock ip dnsmasq iptables; do
  command -v "$b" >/dev/null || die "$b not found (make deps: libvirt-daemon-system libvirt-clients util-linux iproute2 dnsmasq-base iptables)"
done
take_lock

answers() { timeout 15 virsh -q -c "$URI" uri >/dev/null 2>&1; }
v() { timeout 30 virsh -q -c "$URI" "$@"; }

summary() {
  cat <<EOF
$PROG: URI        $URI
$PROG: in netns   $HERE/hvnet-exec.sh CMD ARGS...   (= nsenter --net=$NETNS CMD ARGS...)
$PROG: network    $NET: bridge $BRIDGE, $PREFIX.1/24, NAT (to nowhere), DHCP $PREFIX.100-$PREFIX.199
$PROG:            (free for fixed addresses: $PREFIX.2-$PREFIX.99); only inside the namespace
$PROG: state dir  $S   (TPL_HVNET_DIR)
$PROG: hvnet sees /var/lib/libvirt/images = $S/lib/images on this host
$PROG:            /etc/libvirt = $S/etc, /var/lib/libvirt = $S/lib, /run = $S/run,
$PROG:            /var/cache/libvirt = $S/cache, /var/log/libvirt = $S/log (daemon logs: libvirtd.log, virtlogd.log)
$PROG:            every other path is shared with this host (/boot, /var/tmp, /tmp, ...)
$PROG: daemons    libvirtd $(hvnet_daemon libvirtd) virtlogd $(hvnet_daemon virtlogd)
EOF
}

# tplnet: defined (if missing), autostarted, started (if inactive)
ensure_network() {
  local xml info
  if ! v net-info "$NET" >/dev/null 2>&1; then
    xml=$S/$NET.xml
    cat > "$xml" <<EOF
<network>
  <name>$NET</name>
  <forward mode='nat'/>
  <bridge name='$BRIDGE' stp='on' delay='0'/>
  <ip address='$PREFIX.1' netmask='255.255.255.0'>
    <dhcp>
      <range start='$PREFIX.100' end='$PREFIX.199'/>
    </dhcp>
  </ip>
</network>
EOF
    v net-define "$xml" >/dev/null || die "cannot define network $NET from $xml"
    log "defined network $NET ($PREFIX.0/24)"
  fi
  # (the output in a variable first: grep -q in a pipe would end virsh with SIGPIPE)
  info=$(v net-info "$NET" 2>/dev/null) || die "cannot read network $NET's state"
  if ! grep -Eq '^Autostart: +yes' <<<"$info"; then
    v net-autostart "$NET" >/dev/null || die "cannot mark network $NET autostart"
  fi
  if ! grep -Eq '^Active: +yes' <<<"$info"; then
    v net-start "$NET" >/dev/null 2>"$S/log/net-start.err" ||
      die "cannot start network $NET: $(tail -3 "$S/log/net-start.err")"
    log "started network $NET"
  fi
  # it lives in the namespace, and only there
  info=$(nsenter --net="$NETNS" ip -br addr show "$BRIDGE" 2>/dev/null || true)
  grep -q "$PREFIX.1/24" <<<"$info" ||
    die "bridge $BRIDGE has no $PREFIX.1/24 inside hvnet's network namespace"
  if ip link show "$BRIDGE" >/dev/null 2>&1; then
    die "a $BRIDGE exists in the HOST's network namespace: remove it (ip link del $BRIDGE); hvnet's is in its own"
  fi
}

# ------------------------------------------------------------- already up?
ld=$(hvnet_daemon libvirtd)
if [ -n "$ld" ] && answers; then
  if [ "$(readlink "/proc/$ld/ns/net" 2>/dev/null)" != "$(netns_id)" ]; then
    # the daemons run, but $S/netns was unbound (or bound to something else)
    unbind_netns
    touch "$NETNS"
    mount --bind "/proc/$ld/ns/net" "$NETNS" || die "cannot bind libvirtd's network namespace to $NETNS"
    log "re-bound $NETNS to libvirtd's network namespace"
  fi
  if [ -z "$(hvnet_daemon virtlogd)" ]; then
    # libvirtd would spawn one on demand; start it now, inside hvnet's namespaces
    nsenter --mount="/proc/$ld/ns/mnt" --net="/proc/$ld/ns/net" -- virtlogd -d </dev/null >/dev/null 2>&1 9>&- \
      || die "cannot restart hvnet's virtlogd"
    log "virtlogd was not running: restarted it in hvnet's namespaces"
  fi
  ensure_network
  log "already running"
  summary
  log "done in $(elapsed)"
  exit 0
fi

# ------------------------------------------------------------- stale state
procs=$(hvnet_others)
if [ -n "$procs" ]; then
  if [ -n "$ld" ]; then
    log "stale state: libvirtd (pid $ld) runs but does not answer on its socket within 15 s"
  else
    log "stale state: libvirtd is not running, but these hvnet processes are:"
  fi
  printf '%s\n' "$procs" | sed "s/^/$PROG:     /"
  log "stopping them all and starting afresh (domains that ran are shut off)"
  stop_pids "$(printf '%s\n' "$procs" | awk '{print $1}' | tr '\n' ' ')" 10
fi
# a namespace left bound with nothing in it (or with us in it): a fresh one below
unbind_netns

# ------------------------------------------------------------- state dir
if [ ! -e "$MARK" ]; then
  if [ -d "$S" ] && [ -n "$(ls -A "$S")" ]; then
    die "$S exists, is not empty and is not an hvnet state directory (no $MARK); choose another TPL_HVNET_DIR"
  fi
  mkdir -p "$S"
  rm -rf "${S:?}/etc" "${S:?}/lib" "${S:?}/cache" "${S:?}/log" "${S:?}/run"
  mkdir -p "$S"/{etc,lib,cache,log,run}
  chmod 755 "$S" "$S/run"
  # configuration: the host's *.conf files and nwfilter rules, but none of its
  # definitions (domains, networks, pools, secrets) and none of its hooks
  for f in /etc/libvirt/*; do
    [ -f "$f" ] && cp -a "$f" "$S/etc/"
  done
  [ -d /etc/libvirt/nwfilter ] && cp -a /etc/libvirt/nwfilter "$S/etc/"
  mkdir -p "$S/etc/qemu/networks/autostart" "$S/etc/qemu/autostart" "$S/etc/storage/autostart" "$S/etc/hooks"
  install -d -m 700 "$S/etc/secrets"
  # /var/lib/libvirt: the host's directory skeleton with its owners and modes
  # (qemu's dirs belong to libvirt-qemu, dnsmasq's to libvirt-dnsmasq), without
  # images, domain state or leases
  if [ -d /var/lib/libvirt ]; then
    (cd /var/lib/libvirt && find . -mindepth 1 -maxdepth 3 -type d ! -name 'domain-*' ! -path './images/*' \
      ! -path './dnsmasq/*' ! -path './qemu/domain-*') |
    while IFS= read -r d; do
      mkdir -p "$S/lib/$d"
      chown --reference="/var/lib/libvirt/$d" "$S/lib/$d"
      chmod --reference="/var/lib/libvirt/$d" "$S/lib/$d"
    done
  fi
  install -d -m 711 "$S/lib/images"
  [ -d "$S/lib/dnsmasq" ] || install -d -m 755 "$S/lib/dnsmasq"
  [ -d /var/lib/libvirt ] && chmod --reference=/var/lib/libvirt "$S/lib"
  # qemu capabilities: libvirt re-validates the cache (binary ctimes, kernel,
  # libvirt version) so a copy is safe and saves the probe of qemu
  if [ -d /var/cache/libvirt/qemu/capabilities ]; then
    mkdir -p "$S/cache/qemu"
    cp -a /var/cache/libvirt/qemu/capabilities "$S/cache/qemu/"
  fi
  [ -d /var/cache/libvirt ] && chmod --reference=/var/cache/libvirt "$S/cache"
  install -d -m 750 "$S/log/qemu"
  touch "$MARK"
  log "created state directory $S"
fi

# Our settings go FIRST in each file: libvirt's config parser returns the
# first entry of a name, so they win over anything the host's copy sets.
# Regenerated at every start from the host's current files (hvnet's own
# definitions under $S/etc are kept).
conf() {  # name "our settings"
  local src=/etc/libvirt/$1 dst=$S/etc/$1
  { printf '# written by hvnet-up.sh at every start: these lines first (the first entry of a\n'
    printf '# name wins), then the host'"'"'s /etc/libvirt/%s\n%s\n# ---- host file follows ----\n' "$1" "$2"
    [ -f "$src" ] && cat "$src"; } > "$dst.tmp"
  mv "$dst.tmp" "$dst"
}
# unix socket only (libvirtd runs without --listen)
conf libvirtd.conf "listen_tls = 0
listen_tcp = 0
log_outputs = \"3:file:/var/log/libvirt/libvirtd.log\""
# cgroup_controllers = [ ]: no machine/qemu-<id>-<name> cgroups at all (cgroups are
# shared with the host's libvirtd and hv2, whose domain ids also start at 1)
# namespaces = [ ]: no private /dev per domain: libvirt would try to move the
# /dev/kvm bind mount below into it and fail ("Unable to move ... mount to /dev/kvm")
conf qemu.conf "cgroup_controllers = [ ]
namespaces = [ ]"
conf virtlogd.conf "log_outputs = \"3:file:/var/log/libvirt/virtlogd.log\""

# ------------------------------------------------------------- start
rm -f "$S/run/libvirtd.pid" "$S/run/virtlogd.pid"
# The leases of an earlier hvnet session are all stale: its guests died with its daemons.
# dnsmasq would keep them up to an hour (libvirt reads them back when it starts the
# network), and a fixed address a test asks for would be refused as "leased already"
# to a MAC no domain has any more.
rm -f "$S/lib/dnsmasq/"*.status
touch "$NETNS"
# /dev/kvm on this machine belongs to a group libvirt's qemu user is not in, yet
# libvirt's qemu probe finds KVM: every capabilities lookup then finds its cache
# "outdated" ("KVM was enabled when probing, but it is not available now") and
# probes qemu again, 4-8 s each, several times per define or start (a define took
# 63 s). hvnet's domains are TCG (<domain type='qemu'>): in its mount namespace
# /dev/kvm is an empty file only root may open, so probe and check agree (no KVM)
# and the cache holds.
install -m 600 /dev/null "$S/nokvm"
mkdir -p "$S/sys"
# A new network namespace bound at $S/netns (unshare does the bind from the host's
# mount namespace), a private mount namespace for the bind mounts below. The daemons
# keep both alive; the shell exits once they forked.
# shellcheck disable=SC2016  # \$1 is the inner shell's
unshare --mount --propagation private --net="$NETNS" -- /bin/sh -ec '
  s=$1
  mount --bind "$s/run" /run
  mount --bind "$s/etc" /etc/libvirt
  mount --bind "$s/lib" /var/lib/libvirt
  mount --bind "$s/cache" /var/cache/libvirt
  mount --bind "$s/log" /var/log/libvirt
  mount -t tmpfs -o mode=1777,nosuid,nodev,size=256m hvnet-shm /dev/shm
  # no KVM for hvnet (its domains are TCG): see the note on /dev/kvm below
  [ ! -e /dev/kvm ] || mount --bind "$s/nokvm" /dev/kvm
  # the host interfaces libvirt lists (virsh iface-list; tpl-clone --bridge checks its
  # bridge there) are read by udev from /sys/class/net, which shows the network
  # namespace of whoever mounted sysfs: the host. A sysfs mounted in here shows ours.
  mount -t sysfs hvnet-sys "$s/sys"
  mount --bind "$s/sys/class/net" /sys/class/net
  mount --bind "$s/sys/devices/virtual/net" /sys/devices/virtual/net
  ip link set lo up
  virtlogd -d
  libvirtd -d
' hvnet "$S" </dev/null >>"$S/log/hvnet-up.out" 2>&1 9>&- || die "starting the daemons failed: $(tail -3 "$S/log/hvnet-up.out")"
[ -n "$(netns_id)" ] || die "$NETNS is not a network namespace after unshare"
log "daemons forked, waiting for $URI"

ok=0
for _ in $(seq $((WAIT * 5))); do
  if [ -S "$SOCK" ] && answers; then ok=1; break; fi
  [ -n "$(hvnet_daemon libvirtd)" ] || [ ! -s "$S/run/libvirtd.pid" ] || break
  sleep 0.2
done
[ "$ok" = 1 ] || die "hvnet's libvirtd does not answer on $URI (see $S/log/libvirtd.log, $S/log/hvnet-up.out)"
[ -n "$(hvnet_daemon virtlogd)" ] || die "hvnet's virtlogd is not running (see $S/log/virtlogd.log)"
ld=$(hvnet_daemon libvirtd)
[ "$(readlink "/proc/$ld/ns/net")" = "$(netns_id)" ] || die "libvirtd (pid $ld) is not in the namespace bound at $NETNS"
ensure_network
log "ready"
summary
log "done in $(elapsed)"
