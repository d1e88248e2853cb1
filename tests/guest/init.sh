#!/bin/sh
# init of the tiny test guest: mount, run first-boot actions like a distro's
# init, print the machine's identity on the console, power off.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mount -o remount,rw /
hostname -F /etc/hostname 2>/dev/null
echo "TPL-BOOT root=$(awk '$2=="/"{print $1}' /proc/mounts | tail -n1)"
# virt-sysprep's first-boot runner, as its sysvinit script would start it.
if [ -x /usr/lib/virt-sysprep/firstboot.sh ]; then
  echo "TPL-BOOT firstboot=run"
  /usr/lib/virt-sysprep/firstboot.sh start >/dev/console 2>&1
fi
echo "TPL-BOOT serial=$(cat /sys/class/dmi/id/product_serial 2>/dev/null)"
# What systemd does at boot: an empty /etc/machine-id (a generalized image) is
# filled with a fresh random id, so each clone becomes its own machine.
echo "TPL-BOOT machine-id-at-boot=$(cat /etc/machine-id 2>/dev/null)"
if [ -e /etc/machine-id ] && [ ! -s /etc/machine-id ]; then
  head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > /etc/machine-id
  echo >> /etc/machine-id
fi
echo "TPL-BOOT machine-id=$(cat /etc/machine-id 2>/dev/null)"
echo "TPL-BOOT hostname=$(hostname)"
for k in /etc/ssh/ssh_host_*_key.pub; do
  [ -e "$k" ] && echo "TPL-BOOT hostkey=$(md5sum < "$k" | cut -c1-32) $k"
done
[ -e /etc/ssh/ssh_host_ed25519_key.pub ] || echo "TPL-BOOT hostkey=none"
echo "TPL-BOOT done"
sync
poweroff -f
