#!/bin/bash
# Build the Debian 12 (bookworm) test guest of issue 20: a real, small Debian
# with systemd, openssh-server, cloud-init (NoCloud), qemu-guest-agent and what
# cloud-init's growpart/resizefs need, made with debootstrap from the Debian
# mirror apt uses on this machine.
#
#   build-debian.sh OUT.qcow2 [SIZE]   a copy of the image at OUT, and the guest's
#                                      own kernel and initrd next to it:
#                                      OUT-without-.qcow2.vmlinuz and .initrd
#   build-debian.sh --cached [SIZE]    only build (or find) the cached image; print
#                                      its three paths (disk kernel initrd)
#
# SIZE is the disk's virtual size (default 2G; the root file system fills it).
#
# The disk: an MBR partition table with ONE ext4 partition, /dev/vda1, from 1 MiB
# to the end, labelled tpl-root; no swap, no boot loader. It is booted by direct
# kernel boot (libvirt <kernel>/<initrd>, cmdline "root=/dev/vda1 ro
# console=ttyS0"): the kernel and initrd are the guest's own (/boot inside), copied
# out. One partition rather than a bare file system because that is what real VM
# images have: a bigger disk is grown at first boot by cloud-init's growpart
# (sfdisk moves the end of vda1) and then resizefs (online resize2fs), the path a
# real clone takes; a first-boot action without cloud-init must do the same
# (growpart /dev/vda 1 && resize2fs /dev/vda1; cloud-guest-utils is installed).
#
# The image looks like an installed VM for virt-sysprep: /etc/machine-id filled,
# SSH host keys made by openssh-server's installation, logs of the installation.
# Note: Debian does not make missing SSH host keys at boot (ssh.service fails
# "sshd: no hostkeys available"); cloud-init does (ssh_deletekeys), so a guest
# whose keys were removed and whose cloud-init is disabled needs whoever removed
# them to run 'ssh-keygen -A' at first boot.
#
# Networking: systemd-networkd; /etc/systemd/network/99-tpl-dhcp.network asks for
# DHCP on every en*/eth* interface (client id = MAC), so the guest gets an address
# with or without cloud-init. cloud-init renders its own network config for
# networkd (10-cloud-init-*.network, which comes first and so wins).
#
# The result is cached in $TPL_DEBIAN_CACHE (default /var/tmp/tpl-debian), keyed by
# a hash of this script (its comment lines left out) and SIZE, so a second call only
# copies; it is built in a temporary directory and renamed into place: complete or
# absent. Downloaded .debs
# are kept in $TPL_DEBIAN_CACHE/debs for the next build; the image of another version
# of this script, unused for a day, is deleted after a build. Mirror: the one of apt's
# bookworm sources on this machine, or $TPL_DEBIAN_MIRROR. Must run as root (about
# 1-1.5 minutes the first time here; see docs/ENVIRONMENT.md).
set -euo pipefail
PROG=build-debian
T0=${EPOCHREALTIME/./}
elapsed() { local us=$(( ${EPOCHREALTIME/./} - T0 )); printf '%d.%01ds' $((us / 1000000)) $((us / 100000 % 10)); }
log() { printf '%s: [%6s] %s\n' "$PROG" "$(elapsed)" "$*" >&2; }
die() { printf '%s: ERROR: %s (after %s)\n' "$PROG" "$*" "$(elapsed)" >&2; exit 1; }
usage() { echo "usage: $0 OUT.qcow2 [SIZE] | $0 --cached [SIZE]" >&2; exit 2; }

if [ $# -lt 1 ] || [ $# -gt 2 ]; then usage; fi
OUT=$1
SIZE=${2:-2G}
[ -n "$OUT" ] || usage
case "$OUT" in --cached) ;; -*) usage ;; esac
case "$SIZE" in *[!0-9KMGT]*|'') die "SIZE must be like 2G or 2048M: $SIZE" ;; esac
[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot)"
CACHE=${TPL_DEBIAN_CACHE:-/var/tmp/tpl-debian}
case "$CACHE" in /*) ;; *) die "TPL_DEBIAN_CACHE must be an absolute path: $CACHE" ;; esac

SELF=$(readlink -f "${BASH_SOURCE[0]}")
# the key: the script without its comment lines (a comment edit rebuilds nothing), and SIZE
KEY=$( { grep -v "^[[:space:]]*#" "$SELF"; echo "size=$SIZE"; } | sha256sum | cut -c1-16)
C=$CACHE/$KEY
DISK=$C/debian.qcow2 KERNEL=$C/vmlinuz INITRD=$C/initrd.img

# ---------------------------------------------------------------- the mirror
# The first http(s) URI that apt uses for "bookworm" (one-line .list or deb822 .sources).
apt_mirror() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    awk '$1 == "deb" { i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                       if ($(i + 1) == "bookworm") { print $i; exit } }' "$f"
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk 'BEGIN { RS = ""; FS = "\n" }
         { uri = ""; ok = 0
           for (i = 1; i <= NF; i++) {
             if ($i ~ /^URIs:/) { split($i, a, /[ \t]+/); uri = a[2] }
             if ($i ~ /^Suites:/) { n = split($i, s, /[ \t]+/); for (j = 2; j <= n; j++) if (s[j] == "bookworm") ok = 1 }
           }
           if (ok && uri != "") print uri }' "$f"
  done
}

build() {
  local mirror tmp r
  for b in debootstrap chroot mke2fs sfdisk qemu-img unshare flock; do
    command -v "$b" >/dev/null || die "$b not found (make deps: debootstrap e2fsprogs fdisk qemu-utils util-linux)"
  done
  mirror=${TPL_DEBIAN_MIRROR:-$(apt_mirror | grep -m1 -E '^https?://' || true)}
  [ -n "$mirror" ] || mirror=http://deb.debian.org/debian
  log "building the Debian 12 guest (cache key $KEY) from $mirror"
  mkdir -p "$CACHE/debs"
  tmp=$(mktemp -d "$CACHE/build.XXXXXX")
  # shellcheck disable=SC2064  # expand $tmp now
  trap "rm -rf '$tmp'" EXIT
  r=$tmp/root
  mkdir -p "$r"

  # Everything that mounts (debootstrap's /proc, our /dev, the .deb cache) runs in a
  # private mount namespace: whatever happens, no mount is left on the host.
  local pkgs=(systemd-sysv udev kmod linux-image-amd64 initramfs-tools zstd openssh-server
    cloud-init qemu-guest-agent cloud-guest-utils fdisk e2fsprogs sudo iproute2 netbase
    ca-certificates less)
  # shellcheck disable=SC2016  # the inner script's variables are its own
  unshare --mount --propagation private -- /bin/bash -euo pipefail -c '
    r=$1 mirror=$2 debs=$3 pkgs=$4
    debootstrap --variant=minbase --cache-dir="$debs" bookworm "$r" "$mirror" >"$r.debootstrap.log" 2>&1 ||
      { tail -20 "$r.debootstrap.log" >&2; echo "debootstrap failed (log above)" >&2; exit 1; }
    mount -t proc proc "$r/proc"
    mount -t sysfs sys "$r/sys"
    mount --bind /dev "$r/dev"
    mkdir -p "$r/var/cache/apt/archives"
    mount --bind "$debs" "$r/var/cache/apt/archives"
    # no service starts in the chroot
    printf "#!/bin/sh\nexit 101\n" > "$r/usr/sbin/policy-rc.d"; chmod 755 "$r/usr/sbin/policy-rc.d"
    # a small initrd: only what a virtio disk with ext4 needs (boots much faster under TCG
    # than MODULES=most)
    mkdir -p "$r/etc/initramfs-tools/conf.d"
    echo MODULES=list > "$r/etc/initramfs-tools/conf.d/tpl.conf"
    printf "%s\n" virtio_pci virtio_blk virtio_scsi virtio_net virtio_console ext4 crc32c_generic >> "$r/etc/initramfs-tools/modules"
    LC_ALL=C DEBIAN_FRONTEND=noninteractive chroot "$r" apt-get install -y -q \
      --no-install-recommends -o Dpkg::Use-Pty=0 \
      -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold $pkgs >"$r.apt.log" 2>&1 ||
      { tail -30 "$r.apt.log" >&2; echo "apt-get install in the chroot failed (log above)" >&2; exit 1; }
    rm -f "$r/usr/sbin/policy-rc.d"
  ' debian "$r" "$mirror" "$CACHE/debs" "${pkgs[*]}" || die "installing Debian into $r failed"
  log "debootstrap + packages done"

  configure "$r"

  # kernel and initrd, copied out for direct kernel boot (and left in /boot)
  local k i
  k=("$r"/boot/vmlinuz-*) i=("$r"/boot/initrd.img-*)
  [ ${#k[@]} = 1 ] && [ -f "${k[0]}" ] && [ ${#i[@]} = 1 ] && [ -f "${i[0]}" ] ||
    die "not one kernel and one initrd in the image's /boot: ${k[*]} ${i[*]}"
  cp "${k[0]}" "$tmp/vmlinuz"
  cp "${i[0]}" "$tmp/initrd.img"

  # the disk: one partition from 1 MiB to the end holding an ext4 made from the tree
  local bytes fsbytes
  bytes=$(qemu-img create -q -f raw "$tmp/disk.raw" "$SIZE" && stat -c %s "$tmp/disk.raw")
  fsbytes=$(( bytes - 1048576 ))
  echo 'label: dos
start=2048, type=83, bootable' | sfdisk -q "$tmp/disk.raw" >/dev/null
  mke2fs -q -F -t ext4 -L tpl-root -d "$r" "$tmp/fs.raw" "$((fsbytes / 1024))k" >/dev/null ||
    die "mke2fs failed (is $SIZE big enough for $(du -sh "$r" | cut -f1)?)"
  dd if="$tmp/fs.raw" of="$tmp/disk.raw" bs=1M seek=1 conv=notrunc,sparse status=none
  rm -f "$tmp/fs.raw"
  qemu-img convert -q -f raw -O qcow2 "$tmp/disk.raw" "$tmp/debian.qcow2"
  rm -f "$tmp/disk.raw"
  du -sh "$r" | awk '{print "root tree " $1}' > "$tmp/info"
  rm -rf "$r" "$r.debootstrap.log" "$r.apt.log"
  chmod 644 "$tmp/debian.qcow2" "$tmp/vmlinuz" "$tmp/initrd.img"
  chmod 755 "$tmp"
  rm -rf "$C"
  mv "$tmp" "$C"
  trap - EXIT
  log "built $DISK ($(du -h "$DISK" | cut -f1) allocated, virtual $SIZE), kernel and initrd beside it"
  prune
}

# Images of other versions of this script (other keys) unused for a day are deleted
# (about 500 MB each), unless a build-debian holds their lock.
prune() {
  local d k
  for d in "$CACHE"/????????????????; do
    k=${d##*/}
    [ "$k" != "$KEY" ] && [ -d "$d" ] || continue
    [ -z "$(find "$d" -maxdepth 0 -mmin -1440)" ] || continue
    ( flock -n 7 || exit 0; rm -rf "$d"; rm -f "$CACHE/$k.lock" ) 7>"$CACHE/$k.lock"
    [ -d "$d" ] || log "deleted the unused image of another version: $d"
  done
}

# The guest's configuration, written into the tree before the file system is made.
configure() {
  local r=$1
  # every path below is under $r: never let it be anything but our build tree
  case "$r" in "$CACHE"/build.*/root) ;; *) die "configure: not a build tree: '$r'" ;; esac
  [ -d "$r/etc" ] && [ -x "$r/bin/sh" ] || die "configure: $r has no Debian in it"
  echo tpl-debian > "$r/etc/hostname"
  printf '127.0.0.1\tlocalhost\n127.0.1.1\ttpl-debian\n::1\tlocalhost ip6-localhost ip6-loopback\n' > "$r/etc/hosts"
  printf '# <file system> <mount point> <type> <options> <dump> <pass>\n/dev/vda1 / ext4 errors=remount-ro 0 1\n' > "$r/etc/fstab"

  # networkd: DHCP on the first NIC whatever its name, with or without cloud-init
  mkdir -p "$r/etc/systemd/network"
  cat > "$r/etc/systemd/network/99-tpl-dhcp.network" <<'EOF'
# tpl test guest: DHCP on any wired interface (cloud-init's 10-cloud-init-*.network wins)
[Match]
Name=en* eth*

[Network]
DHCP=yes

[DHCPv4]
ClientIdentifier=mac
EOF
  chroot "$r" systemctl -q enable systemd-networkd.service systemd-networkd-wait-online.service ||
    die "systemctl enable systemd-networkd in the image failed"
  # one address is enough to be online, and never wait long for it
  mkdir -p "$r/etc/systemd/system/systemd-networkd-wait-online.service.d"
  printf '[Service]\nExecStart=\nExecStart=/lib/systemd/systemd-networkd-wait-online --any --timeout=30\n' \
    > "$r/etc/systemd/system/systemd-networkd-wait-online.service.d/tpl.conf"

  # cloud-init: NoCloud only (a cidata disk or ds=nocloud in the SMBIOS serial), and
  # its network config for networkd
  mkdir -p "$r/etc/cloud/cloud.cfg.d"
  printf '# written by tpl build-debian.sh\ndatasource_list: [ NoCloud, None ]\n' > "$r/etc/cloud/cloud.cfg.d/90_dpkg.cfg"
  cat > "$r/etc/cloud/cloud.cfg.d/95_tpl.cfg" <<'EOF'
# written by tpl build-debian.sh (tests/guest): a small test guest
system_info:
  network:
    renderers: [ networkd ]
# /etc/hosts names the clone's own host name (sudo complains otherwise)
manage_etc_hosts: true
EOF
  # a locale set up as the installer would: cloud-init's locale module then has
  # nothing to generate at first boot (locale-gen is slow under TCG)
  echo 'en_US.UTF-8 UTF-8' > "$r/etc/locale.gen"
  chroot "$r" locale-gen >/dev/null || die "locale-gen in the image failed"
  echo 'LANG=en_US.UTF-8' > "$r/etc/default/locale"
  # fast boot: no timers, no VGA console, no waiting for settle
  local u
  for u in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer \
           man-db.timer getty@tty1.service systemd-udev-settle.service; do
    ln -sf /dev/null "$r/etc/systemd/system/$u"
  done
  # journald in memory only
  mkdir -p "$r/etc/systemd/journald.conf.d"
  printf '[Journal]\nStorage=volatile\n' > "$r/etc/systemd/journald.conf.d/tpl.conf"
  # an installed VM's identity, for virt-sysprep to remove
  [ -s "$r/etc/machine-id" ] || { head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n'; echo; } > "$r/etc/machine-id"
  # systemd saves one at every boot and shutdown (virt-sysprep replaces it)
  mkdir -p "$r/var/lib/systemd"
  head -c 512 /dev/urandom > "$r/var/lib/systemd/random-seed"
  chmod 600 "$r/var/lib/systemd/random-seed"
  ls "$r"/etc/ssh/ssh_host_*_key >/dev/null 2>&1 || die "openssh-server made no host keys in the image"
  # smaller: no .debs, no package lists, no documentation or translations (dpkg keeps
  # them out of later installs too), no kernel modules for hardware a VM never has
  rm -rf "$r"/var/lib/apt/lists/* "$r"/var/cache/apt/*.bin "$r"/var/cache/apt/archives/*.deb \
    "$r"/var/cache/debconf/*-old "$r"/var/lib/dpkg/*-old
  printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
    'path-exclude /usr/share/man/*' 'path-exclude /usr/share/locale/*' \
    'path-include /usr/share/locale/locale.alias' 'path-exclude /usr/share/info/*' \
    > "$r/etc/dpkg/dpkg.cfg.d/01-tpl-nodoc"
  find "$r/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete
  find "$r/usr/share/doc" -mindepth 1 -type d -empty -delete
  rm -rf "$r"/usr/share/man/* "$r"/usr/share/info/*
  find "$r/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
  local kdir kver
  for kdir in "$r"/usr/lib/modules/*/kernel; do
    (cd "$kdir" && rm -rf drivers/gpu drivers/media drivers/infiniband drivers/iio drivers/staging \
      drivers/net/wireless drivers/bluetooth drivers/isdn sound net/wireless net/mac80211 net/bluetooth)
    kver=$(basename "$(dirname "$kdir")")
    chroot "$r" depmod -a "$kver" || die "depmod $kver in the image failed"
  done
  echo "deb http://deb.debian.org/debian bookworm main" > "$r/etc/apt/sources.list"
}

# ---------------------------------------------------------------- main
mkdir -p "$CACHE"
exec 8>"$CACHE/$KEY.lock"
flock -w 1800 8 || die "another build-debian holds $CACHE/$KEY.lock"
if [ -s "$DISK" ] && [ -s "$KERNEL" ] && [ -s "$INITRD" ]; then
  touch "$C"   # its last use, for prune
  log "cached: $C"
else
  build
fi
if [ "$OUT" = --cached ]; then
  echo "$DISK $KERNEL $INITRD"
  exit 0
fi
base=${OUT%.qcow2}
cp --sparse=always "$DISK" "$OUT.tmp.$$"
cp "$KERNEL" "$base.vmlinuz.tmp.$$"
cp "$INITRD" "$base.initrd.tmp.$$"
mv "$base.vmlinuz.tmp.$$" "$base.vmlinuz"
mv "$base.initrd.tmp.$$" "$base.initrd"
mv "$OUT.tmp.$$" "$OUT"
log "wrote $OUT, $base.vmlinuz, $base.initrd"
