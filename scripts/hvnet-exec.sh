#!/bin/bash
# hvnet-exec.sh CMD [ARGS...] — run CMD inside hvnet's network namespace (started by
# hvnet-up.sh, same TPL_HVNET_DIR), where its NAT network tplnet and its guests are:
#
#     scripts/hvnet-exec.sh ssh -i KEY user@192.168.123.N hostname
#     scripts/hvnet-exec.sh ip -br addr
#
# The ONLY way for a test to reach a guest of hvnet: from the host's own network
# namespace, the guests' addresses do not exist (and must never be tried).
# It is `nsenter --net=$TPL_HVNET_DIR/netns CMD`: only the network namespace
# changes; CMD sees the host's files, including hvnet's libvirt socket (so a tool run
# this way reaches hvnet's libvirtd at its usual URI, and the guests by address).
# CMD's exit status is this command's. Must run as root.
set -euo pipefail
# shellcheck disable=SC2034  # used by die in hvnet-lib.sh
PROG=hvnet-exec
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=hvnet-lib.sh
. "$HERE/hvnet-lib.sh"
[ $# -ge 1 ] || { echo "usage: $0 CMD [ARGS...]   (runs CMD in hvnet's network namespace)" >&2; exit 2; }
[ "$(id -u)" = 0 ] || die "must run as root (nsenter)"
[ -n "$(netns_id)" ] || die "hvnet is not running: $NETNS is not a network namespace (start it: scripts/hvnet-up.sh)"
exec nsenter --net="$NETNS" -- "$@"
