#!/bin/sh
# tpl-firstboot: run once by virt-sysprep's first-boot service in every clone of a
# template that tpl-generalize sealed. POSIX sh: it runs under bash, dash or busybox.
#
# 1. Hostname: tpl-clone writes each clone's name into the SMBIOS system serial in
#    cloud-init's NoCloud form (ds=nocloud;h=NAME;i=ID). cloud-init reads that itself;
#    on a guest without cloud-init, set the hostname from it here. First, so that the
#    host keys below carry the clone's name in their comments, not the template's.
# 2. SSH host keys: the template has none (virt-sysprep removed them so that clones do
#    not share them), and Debian/Ubuntu sshd does not start without them. Make fresh
#    ones and (re)start sshd.
#
#   tpl-firstboot                       do both jobs (what the first boot runs)
#   tpl-firstboot --hostname-from S     print the hostname serial S carries, if any
#   tpl-firstboot --valid-hostname N    whether N is fit for /etc/hostname
#   tpl-firstboot --hostname-for N      print the hostname to set for N, or fail

PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH

say() { echo "tpl-firstboot: $*"; }

# The hostname in a NoCloud SMBIOS serial, or nothing. Accepts ds=nocloud and
# ds=nocloud-net, with h= or local-hostname= anywhere among the ;-separated fields.
hostname_from() {
  case $1 in
    ds=nocloud|ds=nocloud\;*|ds=nocloud-net|ds=nocloud-net\;*) ;;
    *) return 0 ;;
  esac
  old_ifs=$IFS
  IFS=';'
  set -f
  # shellcheck disable=SC2086 # splitting on ; is the point
  set -- $1
  set +f
  IFS=$old_ifs
  for kv in "$@"; do
    case $kv in
      h=*) echo "${kv#h=}"; return 0 ;;
      local-hostname=*) echo "${kv#local-hostname=}"; return 0 ;;
    esac
  done
}

# A name fit for /etc/hostname: letters, digits, '-' and '.', no leading '-' or '.',
# at most 64 characters (the kernel's limit for a hostname; sethostname fails beyond it).
valid_hostname() {
  case $1 in
    ''|-*|.*|*[!A-Za-z0-9.-]*) return 1 ;;
  esac
  [ "${#1}" -le 64 ]
}

# The hostname to set for the name N in the serial, or fail. N itself when it fits; for
# a longer FQDN (up to DNS's 253 characters) its first label, which is what cloud-init
# sets from the same serial (its datasources hand over the first label of local-hostname,
# the FQDN only with prefer_fqdn_over_hostname), so a guest gets the same name either way.
hostname_for() {
  case $1 in
    ''|-*|.*|*[!A-Za-z0-9.-]*) return 1 ;;
  esac
  [ "${#1}" -le 253 ] || return 1
  if valid_hostname "$1"; then
    echo "$1"
  elif valid_hostname "${1%%.*}"; then
    echo "${1%%.*}"
  else
    return 1
  fi
}

cloud_init_active() {
  command -v cloud-init >/dev/null 2>&1 || return 1
  [ ! -e /etc/cloud/cloud-init.disabled ]
}

ssh_host_keys() {
  [ -d /etc/ssh ] || return 0
  for k in /etc/ssh/ssh_host_*_key; do
    [ -e "$k" ] && return 0
  done
  if ! command -v ssh-keygen >/dev/null 2>&1; then
    say "no SSH host keys and no ssh-keygen: nothing to do"
    return 0
  fi
  say "generating SSH host keys"
  ssh-keygen -A || { say "ssh-keygen -A failed"; return 1; }
  # sshd may have tried to start before us and stopped for lack of keys.
  # --no-block: this runs inside a boot-time unit; never wait on another job.
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    # Debian/Ubuntu call it ssh (sshd an alias), Fedora/SUSE sshd: restart the first found.
    for u in ssh.service sshd.service; do
      if systemctl is-enabled --quiet "$u" 2>/dev/null; then
        systemctl reset-failed "$u" 2>/dev/null
        systemctl --no-block restart "$u" || say "cannot restart $u"
        break
      fi
    done
  else
    for s in /etc/init.d/ssh /etc/init.d/sshd; do
      if [ -x "$s" ]; then
        "$s" restart || say "cannot restart $s"
        break
      fi
    done
  fi
  return 0
}

set_hostname() {
  serial=$(cat /sys/class/dmi/id/product_serial 2>/dev/null) || return 0
  name=$(hostname_from "$serial")
  [ -n "$name" ] || return 0
  if cloud_init_active; then
    say "cloud-init is installed; it sets the hostname '$name' from the serial"
    return 0
  fi
  if ! host=$(hostname_for "$name"); then
    say "ignoring invalid hostname '$name' in the SMBIOS serial"
    return 1
  fi
  short=${name%%.*}
  if [ "$host" = "$name" ]; then
    say "setting the hostname to '$name'"
  else
    say "setting the hostname to '$host': '$name' is longer than the kernel's 64 characters (the full name goes to /etc/hosts)"
  fi
  echo "$host" > /etc/hostname
  hostname "$host" 2>/dev/null || echo "$host" > /proc/sys/kernel/hostname
  if [ -d /run/systemd/system ] && command -v hostnamectl >/dev/null 2>&1; then
    hostnamectl set-hostname "$host" 2>/dev/null || say "hostnamectl failed"
  fi
  # Debian's convention: the host's own name on 127.0.1.1, the FQDN first.
  if [ "$name" = "$short" ]; then line="127.0.1.1	$name"; else line="127.0.1.1	$name $short"; fi
  if [ -f /etc/hosts ] && grep -q '^127\.0\.1\.1[[:space:]]' /etc/hosts; then
    sed "s/^127\.0\.1\.1[[:space:]].*/$line/" /etc/hosts > /etc/hosts.tpl-firstboot &&
      cat /etc/hosts.tpl-firstboot > /etc/hosts
    rm -f /etc/hosts.tpl-firstboot
  else
    echo "$line" >> /etc/hosts
  fi
}

case ${1-} in
  --hostname-from) hostname_from "${2-}"; exit 0 ;;
  --valid-hostname) valid_hostname "${2-}"; exit ;;
  --hostname-for) hostname_for "${2-}"; exit ;;
esac

rc=0
set_hostname || rc=1
ssh_host_keys || rc=1
exit $rc
