#!/bin/sh
# Build the tiny guest disk that tests and the demo use: a static-busybox root
# filesystem that looks like Debian to virt-sysprep, with everything a real
# installed VM carries that must be unique per machine (machine-id, SSH host
# keys, logs, a DHCP lease, shell history, cloud-init state, files in /tmp).
#
#   build-guest.sh OUT.qcow2 [SIZE]      (SIZE default 64M)
#
# The result is written under a temporary name and renamed into place, so OUT
# is either complete or absent.
set -eu
out=$1
size=${2:-64M}
here=$(cd "$(dirname "$0")" && pwd)
busybox=$(command -v busybox) || { echo "build-guest: busybox-static is not installed (make deps)" >&2; exit 1; }
file -L "$busybox" 2>/dev/null | grep -q 'statically linked' || [ ! -x /usr/bin/file ] ||
  { echo "build-guest: $busybox is not static (install busybox-static)" >&2; exit 1; }

tmp=$(mktemp -d "${TMPDIR:-/tmp}/tpl-guest.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
r=$tmp/root
mkdir -p "$r"/bin "$r"/sbin "$r"/usr/bin "$r"/usr/sbin "$r"/usr/lib "$r"/etc/ssh "$r"/etc/network \
  "$r"/etc/init.d "$r"/etc/rc2.d "$r"/etc/default "$r"/var/log/apt "$r"/var/lib/dhcp "$r"/var/lib/cloud/instances/i-0abc \
  "$r"/var/lib/cloud/data "$r"/var/tmp "$r"/root "$r"/home/user "$r"/tmp "$r"/proc "$r"/sys "$r"/dev "$r"/run \
  "$r"/mnt "$r"/var/spool/cron
cp "$busybox" "$r"/bin/busybox
for a in $("$busybox" --list); do
  [ -e "$r/bin/$a" ] || ln -s busybox "$r/bin/$a"
done
ln -s ../bin/busybox "$r"/sbin/init.busybox
ln -sf /bin/sh "$r"/bin/bash

cat > "$r"/etc/os-release <<'OS'
PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
VERSION="12 (bookworm)"
VERSION_CODENAME=bookworm
ID=debian
HOME_URL="https://www.debian.org/"
OS
echo 12.8 > "$r"/etc/debian_version
echo '/dev/vda / ext4 defaults 0 1' > "$r"/etc/fstab
printf 'root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n' > "$r"/etc/passwd
printf 'root:x:0:\nuser:x:1000:\n' > "$r"/etc/group
printf 'root:*:19000:0:99999:7:::\nuser:*:19000:0:99999:7:::\n' > "$r"/etc/shadow
chmod 600 "$r"/etc/shadow
echo original-vm > "$r"/etc/hostname
printf '127.0.0.1 localhost\n127.0.1.1 original-vm\n' > "$r"/etc/hosts
printf 'auto lo\niface lo inet loopback\n' > "$r"/etc/network/interfaces
head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$r"/etc/machine-id
echo >> "$r"/etc/machine-id
for t in rsa ecdsa ed25519; do
  printf -- '-----BEGIN OPENSSH PRIVATE KEY-----\n%s\n-----END OPENSSH PRIVATE KEY-----\n' \
    "$(head -c 48 /dev/urandom | base64)" > "$r/etc/ssh/ssh_host_${t}_key"
  chmod 600 "$r/etc/ssh/ssh_host_${t}_key"
  echo "ssh-$t AAAA$(head -c 32 /dev/urandom | base64 | tr -d '\n') root@original-vm" > "$r/etc/ssh/ssh_host_${t}_key.pub"
done
echo 'Nov 24 10:00:00 original-vm kernel: booted' > "$r"/var/log/syslog
echo 'Nov 24 10:00:01 original-vm sshd[1]: Accepted key for root' > "$r"/var/log/auth.log
echo '2026-11-24 10:00:00 install foo:amd64' > "$r"/var/log/dpkg.log
echo 'Start-Date: 2026-11-24' > "$r"/var/log/apt/history.log
cat > "$r"/var/lib/dhcp/dhclient.eth0.leases <<'LEASE'
lease {
  interface "eth0";
  fixed-address 192.168.122.50;
  option dhcp-client-identifier 1:52:54:00:12:34:56;
}
LEASE
echo 'ls -la /secret' > "$r"/root/.bash_history
echo 'sudo cat /etc/shadow' > "$r"/home/user/.bash_history
echo 'temporary junk' > "$r"/tmp/junk.txt
echo 'more junk' > "$r"/var/tmp/junk.txt
echo 'i-0abc' > "$r"/var/lib/cloud/data/instance-id
echo '{"v1": {"instance-id": "i-0abc"}}' > "$r"/var/lib/cloud/instances/i-0abc/obj.pkl
ln -s instances/i-0abc "$r"/var/lib/cloud/instance
chown -R 1000:1000 "$r"/home/user

# A stand-in for OpenSSH's 'ssh-keygen -A' (busybox has none): it makes each missing
# host key, so a first-boot action that calls it can be seen to work. Real guests
# run the real one; the keys here are random bytes, not usable keys.
cat > "$r"/usr/bin/ssh-keygen <<'KEYGEN'
#!/bin/sh
[ "$1" = -A ] || { echo "ssh-keygen: this test stand-in only does -A" >&2; exit 1; }
for t in rsa ecdsa ed25519; do
  k=/etc/ssh/ssh_host_${t}_key
  [ -e "$k" ] && continue
  head -c 48 /dev/urandom | base64 > "$k" && chmod 600 "$k"
  echo "ssh-$t AAAA$(head -c 32 /dev/urandom | base64 | tr -d '\n') root@$(hostname)" > "$k.pub"
  echo "ssh-keygen: generated $t host key"
done
KEYGEN
chmod 755 "$r"/usr/bin/ssh-keygen

# /sbin/init: what a distro's init does for these tests. It runs first-boot
# scripts the way sysvinit would (virt-sysprep installs its runner as
# /usr/lib/virt-sysprep/firstboot.sh), then reports the identity of the
# machine on the serial console in 'TPL-BOOT key=value' lines, and powers off.
install -m 755 "$here/init.sh" "$r"/sbin/init

mke2fs -q -F -t ext4 -L root -d "$r" "$tmp"/disk.raw "$size" >/dev/null
qemu-img convert -q -f raw -O qcow2 "$tmp"/disk.raw "$tmp"/disk.qcow2
mv "$tmp"/disk.qcow2 "$out.tmp.$$"
mv "$out.tmp.$$" "$out"
