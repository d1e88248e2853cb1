#!/bin/bash
# ceph-down.sh — stop the cluster started by ceph-up.sh (same TPL_CEPH_DIR).
#   ceph-down.sh           stop osd, mgr, mon (SIGTERM, then SIGKILL after 30 s)
#   ceph-down.sh --purge   also delete TPL_CEPH_DIR (all images are lost) and,
#                          if TPL_CEPH_LIBVIRT_URI is set, undefine the libvirt
#                          secret that ceph-up.sh defined
# Only processes whose pid file lies in TPL_CEPH_DIR and whose command line
# names TPL_CEPH_DIR/ceph.conf are signalled. Idempotent.
set -euo pipefail

D=${TPL_CEPH_DIR:-/var/lib/tpl-ceph}
CONF=$D/ceph.conf
LIBVIRT_URI=${TPL_CEPH_LIBVIRT_URI:-}
PURGE=0
case "${1:-}" in
  --purge) PURGE=1 ;;
  "") ;;
  *) echo "usage: $0 [--purge]" >&2; exit 2 ;;
esac

die() { echo "ceph-down: ERROR: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root"

# A daemon that exited stays a zombie until pid 1 reaps it, and some pid 1s
# (container/VM init stubs) reap late: a zombie counts as gone.
alive() { [ -d "/proc/$1" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; }

ours() {  # pidfile binary -> prints pid if that process is ours and alive
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1")
  alive "$pid" || return 1
  [ "$(readlink "/proc/$pid/exe" 2>/dev/null | sed 's/ (deleted)$//')" = "/usr/bin/$2" ] || return 1
  tr '\0' ' ' < "/proc/$pid/cmdline" | grep -qF -- "$CONF" || return 1
  echo "$pid"
}

stop() {  # name binary
  local pf=$D/run/ceph-$1.pid pid
  pid=$(ours "$pf" "$2") || { rm -f "$pf"; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 300); do alive "$pid" || break; sleep 0.1; done
  if alive "$pid"; then
    echo "ceph-down: $1 (pid $pid) ignored SIGTERM for 30 s, sending SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null || true
    for _ in $(seq 50); do alive "$pid" || break; sleep 0.1; done
  fi
  alive "$pid" && die "$1 (pid $pid) does not die"
  rm -f "$pf"
  echo "ceph-down: stopped $1 (pid $pid)"
}

if [ -d "$D" ]; then
  # osd first (clients see it go down cleanly), the mon last
  stop osd.0 ceph-osd
  stop mgr.a ceph-mgr
  stop mon.a ceph-mon
fi

if [ "$PURGE" = 1 ]; then
  if [ -n "$LIBVIRT_URI" ] && [ -s "$D/libvirt-secret.uuid" ]; then
    virsh -q -c "$LIBVIRT_URI" secret-undefine "$(cat "$D/libvirt-secret.uuid")" >/dev/null 2>&1 || true
  fi
  case "$D" in /|/var|/var/lib|/tmp|/var/tmp|"") die "refusing to delete $D" ;; esac
  rm -rf "$D"
  echo "ceph-down: removed $D"
fi
