# shellcheck shell=bash disable=SC2034  # its variables are used by the scripts that source it
# hvnet-lib.sh — sourced by hvnet-up.sh, hvnet-down.sh, hvnet-exec.sh; not run on its own.
#
# hvnet is a libvirtd (with its virtlogd) in its OWN network and mount namespace:
# its guests, their NAT network (bridge + dnsmasq) and every address on it exist
# only inside that network namespace. Nothing of it is reachable from the host's
# network namespace, and the host's namespace never sends a packet to it: the
# only ways in are the libvirt unix socket (a file) and commands run inside the
# namespace (hvnet-exec.sh).
#
# Environment (all optional):
#   TPL_HVNET_DIR     state directory                            (/var/lib/tpl-hvnet)
#   TPL_HVNET_PREFIX  first three octets of the /24 of tplnet    (192.168.123)
#   TPL_HVNET_WAIT    seconds to wait for a daemon               (60)
#
# Layout of the state directory (host path -> path hvnet sees):
#   $S/etc   -> /etc/libvirt        its own configuration and definitions
#   $S/lib   -> /var/lib/libvirt    so $S/lib/images is hvnet's /var/lib/libvirt/images
#   $S/run   -> /run (all of it)    so /run/libvirt/libvirt-sock, /run/libvirtd.pid, ...
#                                   are its own; the socket is $S/run/libvirt/libvirt-sock here
#   $S/cache -> /var/cache/libvirt
#   $S/log   -> /var/log/libvirt
#   (tmpfs)  -> /dev/shm
#   $S/netns    the network namespace itself (an nsfs bind mount on the host, made by
#               `unshare --net=$S/netns`): `nsenter --net=$S/netns CMD` runs CMD in it
# Every other path (/boot, /var/tmp, /tmp, $S itself, ...) is the same file for
# both, so tpl's locality probe finds the host's files on hvnet.

S=${TPL_HVNET_DIR:-/var/lib/tpl-hvnet}
PREFIX=${TPL_HVNET_PREFIX:-192.168.123}
WAIT=${TPL_HVNET_WAIT:-60}
SOCK=$S/run/libvirt/libvirt-sock
URI="qemu+unix:///system?socket=$SOCK"
NETNS=$S/netns
NET=tplnet
BRIDGE=virbr-tpl
MARK=$S/.tpl-hvnet        # says "this directory is an hvnet state directory"
T0=${EPOCHREALTIME/./}

elapsed() { local us=$(( ${EPOCHREALTIME/./} - T0 )); printf '%d.%01ds' $((us / 1000000)) $((us / 100000 % 10)); }
log() { printf '%s: [%6s] %s\n' "$PROG" "$(elapsed)" "$*"; }
die() { printf '%s: ERROR: %s (after %s)\n' "$PROG" "$*" "$(elapsed)" >&2; exit 1; }

check_env() {
  [ "$(id -u)" = 0 ] || die "must run as root"
  case "$S" in /*) ;; *) die "TPL_HVNET_DIR must be an absolute path: $S" ;; esac
  case "$S" in /|/etc|/etc/*|/run|/run/*|/var/lib/libvirt|/var/lib/libvirt/*|/var/run|/var/run/*|/usr|/usr/*|/var/log/libvirt*|/var/cache/libvirt*|/dev|/dev/*)
    die "TPL_HVNET_DIR must not be $S (it would shadow a path it is bound over)" ;; esac
  # the socket path must fit in sun_path (108 bytes)
  [ ${#SOCK} -lt 108 ] || die "TPL_HVNET_DIR is too long for a unix socket path: $SOCK"
  # only private /24s: the network lives in the namespace, but its addresses must not
  # be mistaken for anything real either
  case "$PREFIX" in
    192.168.*|10.*|172.1[6-9].*|172.2[0-9].*|172.3[01].*) ;;
    *) die "TPL_HVNET_PREFIX must be the first three octets of a private /24 (like 192.168.123): $PREFIX" ;;
  esac
  echo "$PREFIX" | grep -Eq '^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$' || die "TPL_HVNET_PREFIX must be three octets, like 192.168.123: $PREFIX"
}

# Serialise hvnet-up/hvnet-down on one state directory (fd 9, released at exit).
take_lock() {
  mkdir -p "$(dirname "$S")"
  exec 9>"$S.lock"
  flock -w "$WAIT" 9 || die "another hvnet-up/hvnet-down holds $S.lock"
}

# "net:[INODE]" of the namespace bound at $S/netns, or nothing when none is bound.
netns_id() {
  [ "$(stat -f -c %T "$NETNS" 2>/dev/null)" = nsfs ] || return 0
  echo "net:[$(stat -L -c %i "$NETNS")]"
}

# Our processes are told apart by what they see, not by name or pid file: a process
# is hvnet's when its /run is $S/run (the bind mount at the heart of its mount
# namespace: libvirtd, virtlogd, and the qemu and dnsmasq they start) or when it is
# in hvnet's network namespace (anything hvnet-exec.sh started: ssh, a tool waiting
# for a guest). Prints "PID NAME" per live process.
hvnet_procs() {
  local want net path id pid exe n
  want=$(stat -c %d:%i "$S/run" 2>/dev/null) || want=none
  net=$(netns_id)
  # one stat for all processes; one that exits meanwhile makes stat fail
  # (skipped: "|| true", or set -e with pipefail would end the caller silently)
  { stat -L -c '%n %d:%i' /proc/[0-9]*/root/run 2>/dev/null || true; } |
  while read -r path id; do
    pid=${path#/proc/}; pid=${pid%%/*}
    if [ "$id" != "$want" ]; then
      [ -n "$net" ] || continue
      n=$(readlink "/proc/$pid/ns/net" 2>/dev/null) || continue
      [ "$n" = "$net" ] || continue
    fi
    exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || continue
    exe=${exe% (deleted)}
    echo "$pid ${exe##*/}"
  done
  return 0
}

# pid of our live daemon NAME (libvirtd or virtlogd), from its pid file, checked
# against hvnet_procs; prints nothing if it is not running
hvnet_daemon() {
  local pid
  [ -s "$S/run/$1.pid" ] || return 0
  pid=$(cat "$S/run/$1.pid")
  case "$pid" in ''|*[!0-9]*) return 0 ;; esac
  hvnet_procs | awk -v p="$pid" -v n="$1" '$1 == p && $2 == n { print p }'
}

# This process and its ancestors: never signalled (hvnet-down.sh run through
# hvnet-exec.sh, or from a test that runs inside the namespace).
self_and_ancestors() {
  local p=$$
  while [ -n "$p" ] && [ "$p" != 0 ]; do
    echo "$p"
    p=$(awk '/^PPid:/ { print $2 }' "/proc/$p/status" 2>/dev/null)
  done
}


# Every hvnet process except this one and its ancestors, as "PID NAME" lines.
hvnet_others() {
  local keep
  keep=" $(self_and_ancestors | tr '\n' ' ') "
  hvnet_procs | while read -r pid name; do
    case "$keep" in *" $pid "*) ;; *) echo "$pid $name" ;; esac
  done
}

# Unbind $S/netns (every stacked bind); the namespace itself goes with its last process.
unbind_netns() {
  local i
  for i in 1 2 3 4 5; do
    [ "$(stat -f -c %T "$NETNS" 2>/dev/null)" = nsfs ] || return 0
    umount "$NETNS" 2>/dev/null || umount -l "$NETNS" || die "cannot unmount $NETNS"
  done
  [ "$(stat -f -c %T "$NETNS" 2>/dev/null)" != nsfs ] || die "$NETNS is still a namespace after 5 unmounts"
}

# alive, stop_pids
# shellcheck source=daemons-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/daemons-lib.sh"
