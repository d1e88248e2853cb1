# shellcheck shell=bash disable=SC2034  # its variables are used by the scripts that source it
# hv2-lib.sh — sourced by hv2-up.sh and hv2-down.sh; not run on its own.
#
# Environment (all optional):
#   TPL_HV2_DIR    state directory                   (/var/lib/tpl-hv2)
#   TPL_HV2_ADDR   TCP listen address, 127.0.0.0/8   (127.0.0.2)
#   TPL_HV2_PORT   TCP port                          (16509)
#   TPL_HV2_WAIT   seconds to wait for a daemon      (60)
#
# Layout of the state directory (host path -> path hv2 sees):
#   $S/etc   -> /etc/libvirt        its own configuration and definitions
#   $S/lib   -> /var/lib/libvirt    so $S/lib/images is hv2's /var/lib/libvirt/images
#   $S/run   -> /run (all of it)    so /run/libvirt, /run/libvirtd.pid, /run/virtlogd.pid
#                                   and everything else under /run are its own
#   $S/cache -> /var/cache/libvirt
#   $S/log   -> /var/log/libvirt
#   (tmpfs)  -> /dev/shm
# Every other path (/boot, /var/tmp, /tmp, /var/lib/tpl-ceph, $S itself, ...)
# is the same file for both.

S=${TPL_HV2_DIR:-/var/lib/tpl-hv2}
ADDR=${TPL_HV2_ADDR:-127.0.0.2}
PORT=${TPL_HV2_PORT:-16509}
WAIT=${TPL_HV2_WAIT:-60}
URI="qemu+tcp://$ADDR:$PORT/system"
[ "$PORT" = 16509 ] && URI="qemu+tcp://$ADDR/system"
# the unix socket reaches the same daemon without going through TCP
UNIX_URI="qemu+unix:///system?socket=$S/run/libvirt/libvirt-sock"
MARK=$S/.tpl-hv2        # says "this directory is an hv2 state directory"
T0=${EPOCHREALTIME/./}

elapsed() { local us=$(( ${EPOCHREALTIME/./} - T0 )); printf '%d.%01ds' $((us / 1000000)) $((us / 100000 % 10)); }
log() { printf '%s: [%6s] %s\n' "$PROG" "$(elapsed)" "$*"; }
die() { printf '%s: ERROR: %s (after %s)\n' "$PROG" "$*" "$(elapsed)" >&2; exit 1; }

check_env() {
  [ "$(id -u)" = 0 ] || die "must run as root"
  case "$S" in /*) ;; *) die "TPL_HV2_DIR must be an absolute path: $S" ;; esac
  case "$S" in /|/etc|/etc/*|/run|/run/*|/var/lib/libvirt|/var/lib/libvirt/*|/var/run|/var/run/*|/usr|/usr/*|/var/log/libvirt*|/var/cache/libvirt*)
    die "TPL_HV2_DIR must not be $S (it would shadow a path it is bound over)" ;; esac
  case "$ADDR" in 127.*) ;; *) die "TPL_HV2_ADDR must be a loopback address (127.0.0.0/8), not $ADDR" ;; esac
  [ "$ADDR" != 127.0.0.1 ] || die "TPL_HV2_ADDR must not be 127.0.0.1: the point is an address other than the host's"
  case "$PORT" in ''|*[!0-9]*) die "TPL_HV2_PORT must be a number: $PORT" ;; esac
}

# Serialise hv2-up/hv2-down on one state directory (fd 9, released at exit).
take_lock() {
  mkdir -p "$(dirname "$S")"
  exec 9>"$S.lock"
  flock -w "$WAIT" 9 || die "another hv2-up/hv2-down holds $S.lock"
}

# Our processes are told apart by the files they see, not by name or pid file:
# a process is hv2's when its /run is $S/run (the bind mount at the heart of
# its mount namespace). Prints "PID NAME" per live process: libvirtd,
# virtlogd, and every qemu (or helper) it started.
hv2_procs() {
  local want pid exe
  want=$(stat -c %d:%i "$S/run" 2>/dev/null) || return 0
  # one stat for all processes; one that exits meanwhile makes stat fail
  # (skipped: "|| true", or set -e with pipefail would end the caller silently)
  { stat -L -c '%n %d:%i' /proc/[0-9]*/root/run 2>/dev/null || true; } |
  while read -r path id; do
    [ "$id" = "$want" ] || continue
    pid=${path#/proc/}; pid=${pid%%/*}
    exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || continue
    exe=${exe% (deleted)}
    echo "$pid ${exe##*/}"
  done
  return 0
}

# pid of our live daemon NAME (libvirtd or virtlogd), from its pid file,
# checked against hv2_procs; prints nothing if it is not running
hv2_daemon() {
  local pid
  [ -s "$S/run/$1.pid" ] || return 0
  pid=$(cat "$S/run/$1.pid")
  case "$pid" in ''|*[!0-9]*) return 0 ;; esac
  hv2_procs | awk -v p="$pid" -v n="$1" '$1 == p && $2 == n { print p }'
}

# alive, stop_pids
# shellcheck source=daemons-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/daemons-lib.sh"
