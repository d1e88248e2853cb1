# shellcheck shell=bash
# daemons-lib.sh — what hv2-lib.sh and hvnet-lib.sh share to stop the daemons of a
# hypervisor of their own; sourced by them (which define log and die), not run alone.

# Is pid $1 alive? A zombie is not: the daemons' children are reparented to pid 1,
# which on these machines reaps them only seconds later.
alive() {
  local st
  st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$st" ] && [ "${st%% *}" != Z ]
}

# Signal the given pids and wait until they are gone (SIGKILL after $2 s).
stop_pids() {  # "PIDS" seconds
  local pids=$1 t=$2 p left
  [ -n "$pids" ] || return 0
  # shellcheck disable=SC2086
  kill -TERM $pids 2>/dev/null || true
  for _ in $(seq $((t * 10))); do
    left=""
    for p in $pids; do alive "$p" && left="$left $p"; done
    [ -z "$left" ] && return 0
    sleep 0.1
  done
  log "still alive after ${t}s, SIGKILL:$left"
  # shellcheck disable=SC2086
  kill -KILL $left 2>/dev/null || true
  for _ in $(seq 50); do
    left=""
    for p in $pids; do alive "$p" && left="$left $p"; done
    [ -z "$left" ] && return 0
    sleep 0.1
  done
  die "cannot kill:$left"
}
