#!/bin/bash
# hv2-up.sh — start "hv2", a second libvirt hypervisor on this machine whose
# files are not this machine's: a privileged libvirtd + its own virtlogd in a
# private mount namespace where /etc/libvirt, /var/lib/libvirt, /run,
# /var/cache/libvirt, /var/log/libvirt and /dev/shm are its own. It listens on
# TCP at 127.0.0.2 only, without authentication (a test rig: anyone on this
# machine who can reach 127.0.0.2 is root through it):
#
#     virsh -c qemu+tcp://127.0.0.2/system list --all
#
# Its /var/lib/libvirt/images is $TPL_HV2_DIR/lib/images on the host.
# Idempotent: a running hv2 is left alone; a half-dead one (daemons killed,
# orphaned qemu) is stopped and started afresh. Stop it with hv2-down.sh.
# Must run as root. Environment: see hv2-lib.sh (TPL_HV2_DIR, TPL_HV2_ADDR,
# TPL_HV2_PORT, TPL_HV2_WAIT).
set -euo pipefail
PROG=hv2-up
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=hv2-lib.sh
. "$HERE/hv2-lib.sh"

[ $# = 0 ] || { echo "usage: $0   (no arguments; environment: TPL_HV2_DIR TPL_HV2_ADDR TPL_HV2_PORT)" >&2; exit 2; }
check_env
for b in libvirtd virtlogd virsh unshare nsenter flock ss; do
  command -v "$b" >/dev/null || die "$b not found (apt-get install libvirt-daemon-system libvirt-clients util-linux iproute2)"
done
take_lock

answers() { timeout 15 virsh -q -c "$URI" uri >/dev/null 2>&1; }

summary() {
  cat <<EOF
$PROG: URI        $URI
$PROG: also       virsh -c '$UNIX_URI'
$PROG: state dir  $S   (TPL_HV2_DIR)
$PROG: hv2 sees   /var/lib/libvirt/images = $S/lib/images on this host
$PROG:            /etc/libvirt = $S/etc, /var/lib/libvirt = $S/lib, /run = $S/run,
$PROG:            /var/cache/libvirt = $S/cache, /var/log/libvirt = $S/log (daemon logs: libvirtd.log, virtlogd.log)
$PROG:            every other path is shared with this host (/boot, /var/tmp, /tmp, ...)
$PROG: daemons    libvirtd $(hv2_daemon libvirtd) virtlogd $(hv2_daemon virtlogd)
EOF
}

# ------------------------------------------------------------- already up?
ld=$(hv2_daemon libvirtd)
if [ -n "$ld" ] && answers; then
  if [ -z "$(hv2_daemon virtlogd)" ]; then
    # libvirtd would spawn one on demand; start it now, inside hv2's namespace
    nsenter --mount="/proc/$ld/ns/mnt" -- virtlogd -d </dev/null >/dev/null 2>&1 9>&- \
      || die "cannot restart hv2's virtlogd"
    log "virtlogd was not running: restarted it in hv2's namespace"
  fi
  log "already running"
  summary
  log "done in $(elapsed)"
  exit 0
fi

# ------------------------------------------------------------- stale state
procs=$(hv2_procs)
if [ -n "$procs" ]; then
  if [ -n "$ld" ]; then
    log "stale state: libvirtd (pid $ld) runs but does not answer on $URI within 15 s"
  else
    log "stale state: libvirtd is not running, but these hv2 processes are:"
  fi
  printf '%s\n' "$procs" | sed "s/^/$PROG:     /"
  log "stopping them all and starting afresh (domains that ran are shut off)"
  stop_pids "$(printf '%s\n' "$procs" | awk '{print $1}' | tr '\n' ' ')" 10
fi

# ------------------------------------------------------------- state dir
if [ ! -e "$MARK" ]; then
  if [ -d "$S" ] && [ -n "$(ls -A "$S")" ]; then
    die "$S exists, is not empty and is not an hv2 state directory (no $MARK); choose another TPL_HV2_DIR"
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
  # (qemu's dirs belong to libvirt-qemu), without images or domain state
  if [ -d /var/lib/libvirt ]; then
    (cd /var/lib/libvirt && find . -mindepth 1 -maxdepth 3 -type d ! -name 'domain-*' ! -path './images/*' \
      ! -path './dnsmasq*' ! -path './qemu/domain-*') |
    while IFS= read -r d; do
      mkdir -p "$S/lib/$d"
      chown --reference="/var/lib/libvirt/$d" "$S/lib/$d"
      chmod --reference="/var/lib/libvirt/$d" "$S/lib/$d"
    done
  fi
  install -d -m 711 "$S/lib/images"
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
# Regenerated at every start from the host's current files (hv2's own
# definitions under $S/etc are kept).
conf() {  # name "our settings"
  local src=/etc/libvirt/$1 dst=$S/etc/$1
  { printf '# written by hv2-up.sh at every start: these lines first (the first entry of a\n'
    printf '# name wins), then the host'"'"'s /etc/libvirt/%s\n%s\n# ---- host file follows ----\n' "$1" "$2"
    [ -f "$src" ] && cat "$src"; } > "$dst.tmp"
  mv "$dst.tmp" "$dst"
}
conf libvirtd.conf "listen_tls = 0
listen_tcp = 1
listen_addr = \"$ADDR\"
tcp_port = \"$PORT\"
auth_tcp = \"none\"
log_outputs = \"3:file:/var/log/libvirt/libvirtd.log\""
# cgroup_controllers = [ ]: no machine/qemu-<id>-<name> cgroups at all; with
# them both daemons would create (and remove!) the same cgroup directories,
# because domain ids start at 1 in each daemon. Display, websocket and
# migration ports: ranges the system libvirtd does not use by default.
conf qemu.conf "cgroup_controllers = [ ]
remote_display_port_min = 15900
remote_display_port_max = 15999
remote_websocket_port_min = 15700
remote_websocket_port_max = 15799
migration_port_min = 49400
migration_port_max = 49463"
conf virtlogd.conf "log_outputs = \"3:file:/var/log/libvirt/virtlogd.log\""

# ------------------------------------------------------------- start
rm -f "$S/run/libvirtd.pid" "$S/run/virtlogd.pid"
# the port must be free on our address (a wildcard listener takes it too)
busy=$(ss -Hltnp "sport = :$PORT" 2>/dev/null | awk -v a="$ADDR:$PORT" '$4 == a || $4 == "0.0.0.0:'"$PORT"'" || $4 == "*:'"$PORT"'" || $4 == "[::]:'"$PORT"'"' || true)
[ -z "$busy" ] || die "TCP $ADDR:$PORT is taken: $busy"

# The daemons keep the namespace alive; the shell exits once they forked.
# Propagation private: none of these mounts is seen by the host.
# shellcheck disable=SC2016  # \$1 is the inner shell's
unshare --mount --propagation private -- /bin/sh -ec '
  s=$1
  mount --bind "$s/run" /run
  mount --bind "$s/etc" /etc/libvirt
  mount --bind "$s/lib" /var/lib/libvirt
  mount --bind "$s/cache" /var/cache/libvirt
  mount --bind "$s/log" /var/log/libvirt
  mount -t tmpfs -o mode=1777,nosuid,nodev,size=256m hv2-shm /dev/shm
  virtlogd -d
  libvirtd -d -l
' hv2 "$S" </dev/null >>"$S/log/hv2-up.out" 2>&1 9>&- || die "starting the daemons failed: $(tail -3 "$S/log/hv2-up.out")"
log "daemons forked, waiting for $URI"

ok=0
for _ in $(seq $((WAIT * 5))); do
  if [ -S "$S/run/libvirt/libvirt-sock" ] && answers; then ok=1; break; fi
  [ -n "$(hv2_daemon libvirtd)" ] || [ ! -s "$S/run/libvirtd.pid" ] || break
  sleep 0.2
done
[ "$ok" = 1 ] || die "hv2's libvirtd does not answer on $URI (see $S/log/libvirtd.log, $S/log/hv2-up.out)"
[ -n "$(hv2_daemon virtlogd)" ] || die "hv2's virtlogd is not running (see $S/log/virtlogd.log)"
log "ready"
summary
log "done in $(elapsed)"
