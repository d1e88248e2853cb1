#!/bin/bash
# hvnet-down.sh — stop hvnet (started by hvnet-up.sh, same TPL_HVNET_DIR):
#   hvnet-down.sh           destroy hvnet's running domains through libvirt, stop its
#                           libvirtd and virtlogd, then every process left in its
#                           namespaces (an orphaned qemu, the network's dnsmasq, an
#                           ssh started by hvnet-exec.sh), unbind its network
#                           namespace; keep its state (definitions, images)
#   hvnet-down.sh --purge   also delete TPL_HVNET_DIR (its definitions and images)
# Only processes whose /run is TPL_HVNET_DIR/run or that are in the network
# namespace bound at TPL_HVNET_DIR/netns are signalled (never this script or its
# ancestors): the system libvirtd, hv2 and their guests are never touched.
# Nothing of hvnet is left running: its network namespace goes with its last
# process. Idempotent.
set -euo pipefail
PROG=hvnet-down
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=hvnet-lib.sh
. "$HERE/hvnet-lib.sh"

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
[ -e "$MARK" ] || die "$S is not an hvnet state directory (no $MARK): not touching it"
take_lock

ld=$(hvnet_daemon libvirtd)
if [ -n "$ld" ]; then
  # domains first, through libvirt: it restores the files' owners (dynamic
  # ownership) and leaves its status clean
  doms=$(timeout 15 virsh -q -c "$URI" list --name 2>/dev/null || true)
  for d in $doms; do
    if timeout 30 virsh -q -c "$URI" destroy "$d" >/dev/null 2>&1; then
      log "destroyed domain $d"
    else
      log "could not destroy domain $d through libvirt (killed below)"
    fi
  done
fi
# both at once: each takes 1-2 s to exit on SIGTERM. libvirtd leaves the network's
# dnsmasq running on purpose (it finds it again at its next start): killed below.
vl=$(hvnet_daemon virtlogd)
if [ -n "$ld$vl" ]; then
  stop_pids "$ld $vl" 15
  log "stopped${ld:+ libvirtd (pid $ld)}${vl:+ virtlogd (pid $vl)}"
fi
rest=$(hvnet_others)
if [ -n "$rest" ]; then
  log "stopping what is left in hvnet's namespaces:"
  printf '%s\n' "$rest" | sed "s/^/$PROG:     /"
  stop_pids "$(printf '%s\n' "$rest" | awk '{print $1}' | tr '\n' ' ')" 10
fi
rm -f "$S/run/libvirtd.pid" "$S/run/virtlogd.pid"
[ -z "$(hvnet_others)" ] || die "hvnet processes are still running: $(hvnet_others | tr '\n' ' ')"
if [ -n "$(hvnet_procs)" ]; then
  log "note: this command itself runs inside hvnet's network namespace (pids $(hvnet_procs | awk '{print $1}' | tr '\n' ' ')): it goes when they exit"
fi
unbind_netns
log "hvnet is stopped (state kept in $S)"

if [ "$PURGE" = 1 ]; then
  # no process is left in the namespace, so its bind mounts are gone too;
  # refuse anyway if something is mounted under $S
  if awk -v s="$S/" 'index($5 "/", s) == 1 { found = 1 } END { exit !found }' /proc/self/mountinfo; then
    die "something is mounted under $S: not deleting it"
  fi
  # images made immutable (tpl-lock --immutable) would stop rm -rf
  chattr -R -i "$S/lib" 2>/dev/null || true
  rm -rf "$S"
  rm -f "$S.lock"
  log "purged $S"
fi
log "done in $(elapsed)"
