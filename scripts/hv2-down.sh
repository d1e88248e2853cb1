#!/bin/bash
# hv2-down.sh — stop hv2 (started by hv2-up.sh, same TPL_HV2_DIR):
#   hv2-down.sh           destroy hv2's running domains through libvirt, stop
#                         its libvirtd and virtlogd, then any process left in
#                         its namespace (an orphaned qemu); keep its state
#   hv2-down.sh --purge   also delete TPL_HV2_DIR (its definitions and images)
# Only processes whose /run is TPL_HV2_DIR/run are signalled: the system
# libvirtd, its virtlogd and its guests are never touched. Idempotent.
set -euo pipefail
PROG=hv2-down
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=hv2-lib.sh
. "$HERE/hv2-lib.sh"

PURGE=0
case "${1:-}" in
  --purge) PURGE=1 ;;
  "") ;;
  *) echo "usage: $0 [--purge]" >&2; exit 2 ;;
esac
[ $# -le 1 ] || { echo "usage: $0 [--purge]" >&2; exit 2; }
check_env
if [ ! -d "$S" ]; then
  log "nothing to do: $S does not exist"
  exit 0
fi
[ -e "$MARK" ] || die "$S is not an hv2 state directory (no $MARK): not touching it"
take_lock

ld=$(hv2_daemon libvirtd)
if [ -n "$ld" ]; then
  # domains first, through libvirt: it restores the files' owners (dynamic
  # ownership) and leaves its status clean
  doms=$(timeout 15 virsh -q -c "$UNIX_URI" list --name 2>/dev/null || true)
  for d in $doms; do
    if timeout 30 virsh -q -c "$UNIX_URI" destroy "$d" >/dev/null 2>&1; then
      log "destroyed domain $d"
    else
      log "could not destroy domain $d through libvirt (killed below)"
    fi
  done
fi
# both at once: each takes 1-2 s to exit on SIGTERM
vl=$(hv2_daemon virtlogd)
if [ -n "$ld$vl" ]; then
  stop_pids "$ld $vl" 15
  log "stopped${ld:+ libvirtd (pid $ld)}${vl:+ virtlogd (pid $vl)}"
fi
rest=$(hv2_procs)
if [ -n "$rest" ]; then
  log "stopping what is left in hv2's namespace:"
  printf '%s\n' "$rest" | sed "s/^/$PROG:     /"
  stop_pids "$(printf '%s\n' "$rest" | awk '{print $1}' | tr '\n' ' ')" 10
fi
rm -f "$S/run/libvirtd.pid" "$S/run/virtlogd.pid"
[ -z "$(hv2_procs)" ] || die "hv2 processes are still running: $(hv2_procs | tr '\n' ' ')"
log "hv2 is stopped (state kept in $S)"

if [ "$PURGE" = 1 ]; then
  # no process is left in the namespace, so its bind mounts are gone too;
  # refuse anyway if something is mounted under $S
  if awk -v s="$S/" 'index($5 "/", s) == 1 { found = 1 } END { exit !found }' /proc/self/mountinfo; then
    die "something is mounted under $S: not deleting it"
  fi
  # images made immutable on hv2 (tpl-lock --immutable) would stop rm -rf
  chattr -R -i "$S/lib" 2>/dev/null || true
  rm -rf "$S"
  rm -f "$S.lock"
  log "purged $S"
fi
log "done in $(elapsed)"
