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
# 3. The seed (tpl-clone --user, --ssh-key, --ip on a bridge): a vfat disk labelled
#    cidata. cloud-init reads it itself; without cloud-init, apply its tpl-* files here:
#    the host name, the user (sudo without a password, password locked), the SSH keys
#    (the user's, else root's), a static address.
# 4. The root file system grows into a bigger disk (tpl-clone --disk-size), as
#    cloud-init's growpart and resizefs do: growpart when the root is a partition.
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
    HOSTNAME_SET=1
    return 0
  fi
  apply_hostname "$name" "the SMBIOS serial"
}

# Set the hostname NAME (from WHERE, for the message).
apply_hostname() {
  name=$1
  if ! host=$(hostname_for "$name"); then
    say "ignoring invalid hostname '$name' in $2"
    return 1
  fi
  HOSTNAME_SET=1
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

# The seed's device, if the clone has one.
seed_device() {
  dev=$(blkid -t LABEL=cidata -o device 2>/dev/null | head -n 1)
  # busybox's blkid takes no -t and lists every device: then findfs (busybox has it).
  case $dev in /dev/*:*|*' '*|'') dev=$(findfs LABEL=cidata 2>/dev/null) ;; esac
  case $dev in /dev/*:*|*' '*) ;; /dev/*) echo "$dev" ;; esac
}

# A seed file's first line, or nothing.
seed_value() {
  [ -f "$SEED/$1" ] || return 0
  head -n 1 "$SEED/$1"
}

add_user() {
  user=$1
  case $user in ''|*[!a-z0-9_-]*|-*) say "ignoring invalid user name '$user'"; return 1 ;; esac
  if ! id "$user" >/dev/null 2>&1; then
    shell=/bin/sh
    [ -x /bin/bash ] && shell=/bin/bash
    if command -v useradd >/dev/null 2>&1; then
      useradd -m -s "$shell" "$user" || { say "cannot create user '$user'"; return 1; }
    else
      adduser -D -s "$shell" "$user" || { say "cannot create user '$user'"; return 1; }
    fi
    say "created user '$user'"
  fi
  passwd -l "$user" >/dev/null 2>&1
  if [ -d /etc/sudoers.d ]; then
    echo "$user ALL=(ALL) NOPASSWD:ALL" > "/etc/sudoers.d/90-tpl-$user"
    chmod 0440 "/etc/sudoers.d/90-tpl-$user"
  fi
}

add_keys() {
  user=$1
  home=$(getent passwd "$user" 2>/dev/null | cut -d: -f6)
  [ -n "$home" ] || { [ "$user" = root ] && home=/root; }
  [ -n "$home" ] || { say "no home for '$user': keys not installed"; return 1; }
  mkdir -p "$home/.ssh" && chmod 700 "$home/.ssh"
  touch "$home/.ssh/authorized_keys" && chmod 600 "$home/.ssh/authorized_keys"
  while IFS= read -r line; do
    [ -n "$line" ] || continue
    grep -qxF "$line" "$home/.ssh/authorized_keys" || echo "$line" >> "$home/.ssh/authorized_keys"
  done < "$SEED/tpl-authorized_keys"
  group=$(id -gn "$user" 2>/dev/null) || group=$user
  chown -R "$user:$group" "$home/.ssh"
  say "installed the SSH keys of '$user'"
}

static_network() {
  MAC='' ADDRESS='' PREFIX='' GATEWAY='' DNS=''
  while IFS='=' read -r key value; do
    case $key in
      MAC) MAC=$value ;; ADDRESS) ADDRESS=$value ;; PREFIX) PREFIX=$value ;;
      GATEWAY) GATEWAY=$value ;; DNS) DNS=$value ;;
    esac
  done < "$SEED/tpl-network"
  [ -n "$ADDRESS" ] && [ -n "$PREFIX" ] || return 0
  if [ -d /run/systemd/system ] && [ -d /etc/systemd/network ]; then
    {
      echo "[Match]"
      echo "MACAddress=$MAC"
      echo "[Network]"
      echo "Address=$ADDRESS/$PREFIX"
      [ -z "$GATEWAY" ] || echo "Gateway=$GATEWAY"
      for d in $(echo "$DNS" | tr ',' ' '); do echo "DNS=$d"; done
    } > /etc/systemd/network/05-tpl-static.network
    networkctl reload 2>/dev/null || systemctl --no-block restart systemd-networkd 2>/dev/null
  else
    dev=
    for i in /sys/class/net/*; do
      [ "$(cat "$i/address" 2>/dev/null)" = "$MAC" ] && dev=${i##*/}
    done
    [ -n "$dev" ] || { say "no interface with MAC $MAC"; return 1; }
    ip addr add "$ADDRESS/$PREFIX" dev "$dev" && ip link set "$dev" up
    [ -z "$GATEWAY" ] || ip route add default via "$GATEWAY"
  fi
  say "static address $ADDRESS/$PREFIX"
}

apply_seed() {
  cloud_init_active && return 0
  dev=$(seed_device)
  [ -n "$dev" ] || return 0
  SEED=/run/tpl-seed
  mkdir -p "$SEED"
  mount -o ro -t vfat "$dev" "$SEED" || { say "cannot mount the seed $dev"; return 1; }
  ok=0
  # The serial names the host (it is the same name); without one (--no-identity), the seed.
  name=$(seed_value tpl-hostname)
  if [ -z "${HOSTNAME_SET-}" ] && [ -n "$name" ]; then
    apply_hostname "$name" "the seed" || ok=1
  fi
  user=$(seed_value tpl-user)
  if [ -n "$user" ]; then add_user "$user" || ok=1; fi
  if [ -s "$SEED/tpl-authorized_keys" ]; then add_keys "${user:-root}" || ok=1; fi
  if [ -s "$SEED/tpl-network" ]; then static_network || ok=1; fi
  umount "$SEED"
  return $ok
}

grow_root() {
  cloud_init_active && return 0
  src=$(findmnt -n -o SOURCE / 2>/dev/null) || return 0
  case $src in /dev/*) ;; *) return 0 ;; esac
  case $src in
    /dev/vd[a-z][0-9]*|/dev/sd[a-z][0-9]*|/dev/xvd[a-z][0-9]*)
      disk=${src%%[0-9]*}; part=${src#"$disk"}
      if command -v growpart >/dev/null 2>&1; then
        growpart "$disk" "$part" >/dev/null 2>&1 && say "grew partition $part of $disk"
      fi ;;
  esac
  if command -v resize2fs >/dev/null 2>&1; then
    resize2fs "$src" >/dev/null 2>&1 && say "root file system fills $src"
  fi
  return 0
}

case ${1-} in
  --hostname-from) hostname_from "${2-}"; exit 0 ;;
  --valid-hostname) valid_hostname "${2-}"; exit ;;
  --hostname-for) hostname_for "${2-}"; exit ;;
esac

rc=0
set_hostname || rc=1
apply_seed || rc=1
ssh_host_keys || rc=1
grow_root || rc=1
exit $rc
