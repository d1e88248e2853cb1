#!/usr/bin/env bash
# The main job, end to end, on a tiny guest of its own: build a demo VM, make it a
# template (generalize | lock | rename), stamp out two linked clones and one full
# clone, boot each once and show from its serial console that every clone is its own
# machine, and that the template refuses to start.
#
# Records go to stdout; the story goes to stderr. Safe to run twice: it replaces its
# own demo domains and directory, and touches nothing else. A domain in its way that it
# did not make (one of its names, or one using files in its directory) stops it, with
# nothing changed.
#
# STORAGE=rbd (make demo STORAGE=rbd): the same demo with the guest's disk on Ceph RBD,
# in a pool of its own (TPL_DEMO_POOL, default tpl-demo) of the cluster CEPH_CONF names
# (default: the test cluster of scripts/ceph-up.sh, which make starts first). The pool
# is the demo's as its directory is: a rerun deletes and makes it again. The template is
# then a protected snapshot, the linked clones rbd clones of it, the full clone a copy.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
bin=${TPL_BIN_DIR:-$here/target/debug}
# This machine class cannot run KVM guests (docs/ENVIRONMENT.md): libguestfs runs its
# appliance under TCG unless the caller says otherwise. The tools never set these.
export LIBGUESTFS_BACKEND=${LIBGUESTFS_BACKEND:-direct}
export LIBGUESTFS_BACKEND_SETTINGS=${LIBGUESTFS_BACKEND_SETTINGS:-force_tcg}
export PATH="$bin:$PATH"
uri=qemu:///system
export LIBVIRT_DEFAULT_URI=$uri
dir=/var/lib/libvirt/images/tpl-demo
storage=${STORAGE:-file}
case $storage in
  file|rbd) ;;
  *) echo "demo: STORAGE must be 'file' or 'rbd', not '$storage'" >&2; exit 2 ;;
esac
# The demo's pool: its images are the demo's in either mode (a file demo after an RBD one
# replaces the RBD demo's domains; their images go with the next RBD demo's new pool).
demo_pool=${TPL_DEMO_POOL:-tpl-demo}
pool=
if [ "$storage" = rbd ]; then
  ceph_dir=${TPL_CEPH_DIR:-/var/lib/tpl-ceph}
  export CEPH_CONF=${CEPH_CONF:-$ceph_dir/ceph.conf}
  pool=$demo_pool
  [ -r "$CEPH_CONF" ] && timeout 30 ceph --connect-timeout 20 -s >/dev/null 2>&1 || {
    echo "demo: no Ceph cluster answers at CEPH_CONF=$CEPH_CONF; start the test cluster with 'make ceph'" >&2; exit 1; }
  secret=$(cat "$ceph_dir/libvirt-secret.uuid" 2>/dev/null) && virsh -q -c "$uri" secret-dumpxml "$secret" >/dev/null 2>&1 || {
    echo "demo: no libvirt secret for Ceph ($ceph_dir/libvirt-secret.uuid); 'make ceph' defines it (TPL_CEPH_LIBVIRT_URI=$uri scripts/ceph-up.sh)" >&2; exit 1; }
  # The monitor as qemu reaches it (msgr v1), from the cluster's configuration.
  mon=$(sed -n 's/^mon_host = .*v1:\([^],]*\).*/\1/p' "$CEPH_CONF" | head -n1)
  mon=${mon:-127.0.0.1:6789}
fi
vm=demo-vm
tpl=TplDemo
clones=(demo-web1 demo-web2 demo-full1)
# A clone ready to work: a user of the demo's, with a key the demo makes.
ready=demo-ready1

say() { printf '\033[1m== %s\033[0m\n' "$*" >&2; }
v() { virsh -q -c "$uri" "$@"; }

# Which domains are the demo's: those with the demo's SMBIOS manufacturer ('tpl demo',
# set below; clones keep it) whose files (disks, NVRAM) all lie in $dir. Prints "demo",
# "uses-dir" (not the demo's, but it uses files in $dir) or "other", then a reason; or
# "gone".
classify() {
  local xml
  # A domain undefined since it was listed (another run's clean-up) is in nobody's way.
  xml=$(v dumpxml --inactive "$1" 2>/dev/null) || { echo "gone"; return 0; }
  python3 -c '
import os, sys, xml.etree.ElementTree as ET
d = ET.parse(sys.stdin).getroot()
home = os.path.normpath(sys.argv[1]) + "/"
pool = sys.argv[2]
maker = [e.text for e in d.iterfind("sysinfo/system/entry") if e.get("name") == "manufacturer"]
files = [s.get("file") for s in d.iterfind("devices/disk/source") if s.get("file")]
files += [n.text.strip() for n in d.iterfind("os/nvram") if (n.text or "").strip()]
# RBD images count as files: those in the demo pool (STORAGE=rbd) are inside.
rbd = ["rbd:" + s.get("name") for s in d.iterfind("devices/disk/source") if s.get("protocol") == "rbd"]
inside = [f for f in files if os.path.normpath(f).startswith(home)]
inside += [r for r in rbd if pool and r.startswith("rbd:" + pool + "/")]
files += rbd
outside = [f for f in files if f not in inside]
if maker == ["tpl demo"] and not outside:
    print("demo it uses " + (inside[0] if inside else "no files"))
elif inside:
    print("uses-dir it uses " + inside[0])
elif maker != ["tpl demo"]:
    print("other its SMBIOS manufacturer is not \"tpl demo\"")
else:
    print("other its disk " + outside[0] + " is outside " + home + " and the pool " + pool)' "$dir" "$demo_pool" <<<"$xml"
}

say "cleaning up any earlier demo"
# Look first, touch nothing until it is clear that every domain in the way is the demo's.
ours=()
while IFS= read -r d; do
  [ -n "$d" ] || continue
  c=$(classify "$d") || c="other its definition cannot be read"
  [ "$c" != gone ] || continue
  named=no
  for n in "$vm" "$tpl" "${clones[@]}" "$ready"; do [ "$d" = "$n" ] && named=yes; done
  if [ $named = yes ]; then
    if [ "${c%% *}" = demo ]; then ours+=("$d"); continue; fi
    echo "demo: error: a domain named '$d' exists and is not the demo's (${c#* }); the demo needs that name. Nothing was changed: remove or rename '$d' yourself, then run the demo again." >&2
    exit 1
  fi
  # Not one of the demo's names, yet in its directory: a clone of TplDemo made by hand, say.
  if [ "${c%% *}" != other ]; then
    echo "demo: error: domain '$d' is not one the demo made but uses files in $dir or images in the pool $demo_pool (${c#* }), which the demo deletes. Nothing was changed: remove '$d' or move its files, then run the demo again." >&2
    exit 1
  fi
done < <(v list --all --name)
for d in "${ours[@]}"; do
  echo "  removing the earlier demo's domain '$d'" >&2
  v destroy "$d" >/dev/null 2>&1 || true
  v undefine --nvram "$d" >/dev/null 2>&1 || v undefine "$d" >/dev/null
done
if [ -d "$dir" ]; then chattr -R -i "$dir" 2>/dev/null || true; chmod -R u+w "$dir"; rm -rf "$dir"; fi
mkdir -p "$dir"; chmod 755 "$dir"
if [ "$storage" = rbd ]; then
  # The demo's pool, as its directory: made afresh (needs mon_allow_pool_delete, which the
  # test cluster has).
  if ceph osd pool ls | grep -qx "$pool"; then
    echo "  deleting the earlier demo's pool '$pool'" >&2
    ceph osd pool rm "$pool" "$pool" --yes-i-really-really-mean-it >/dev/null
  fi
  ceph osd pool create "$pool" 8 >/dev/null 2>&1
  rbd pool init "$pool"
fi

say "building the demo guest (a busybox root that looks like Debian)"
"$here/tests/guest/build-guest.sh" "$dir/$vm.qcow2"
kernel=$(ls /boot/vmlinuz-* | sort | tail -n1)
initrd=/boot/initrd.img-${kernel#/boot/vmlinuz-}
# The same small TCG domain the tests boot (direct kernel boot, serial console to a file).
sed -e "s|@NAME@|$vm|; s|@KERNEL@|$kernel|; s|@INITRD@|$initrd|; s|@DISK@|$dir/$vm.qcow2|" \
    -e "s|@CONSOLE@|$dir/$vm.console.log|; s|@EXTRA@||; s|tpl tests|tpl demo|" \
    "$here/tests/guest/domain.xml" > "$dir/$vm.xml"
if [ "$storage" = rbd ]; then
  say "moving its disk onto Ceph: qemu-img convert -O raw $vm.qcow2 rbd:$pool/$vm"
  qemu-img convert -f qcow2 -O raw "$dir/$vm.qcow2" "rbd:$pool/$vm:conf=$CEPH_CONF:id=admin"
  rm "$dir/$vm.qcow2"
  # vda becomes the RBD image, with the monitor and the cephx user's libvirt secret.
  python3 - "$dir/$vm.xml" "$pool/$vm" "${mon%:*}" "${mon##*:}" "$secret" <<'PY'
import re, sys
path, name, host, port, secret = sys.argv[1:]
xml = open(path).read()
disk = (f"<disk type='network' device='disk'>\n      <driver name='qemu' type='raw'/>\n"
        f"      <source protocol='rbd' name='{name}'><host name='{host}' port='{port}'/></source>\n"
        f"      <auth username='admin'><secret type='ceph' uuid='{secret}'/></auth>\n"
        f"      <target dev='vda' bus='virtio'/>\n    </disk>")
new, n = re.subn(r"<disk type='file'.*?</disk>", disk, xml, count=1, flags=re.S)
assert n == 1, "tests/guest/domain.xml: no file disk to replace"
open(path, "w").write(new)
PY
fi
v define "$dir/$vm.xml" >/dev/null

# Boot domains once (in parallel) and wait until their init powers them off.
boot() {
  for d in "$@"; do v start "$d" >/dev/null; done
  for d in "$@"; do
    for _ in $(seq 1 240); do
      [ "$(v domstate "$d" | head -n1)" = "shut off" ] && break
      sleep 0.5
    done
    [ "$(v domstate "$d" | head -n1)" = "shut off" ] || { echo "demo: $d did not power off in 120 s" >&2; exit 1; }
  done
}
console_of() { v dumpxml "$1" | sed -n "s/.*<source path='\([^']*console[^']*\)'.*/\1/p" | head -n1; }
identity() {
  local log=${2:-}; [ -n "$log" ] || log=$(console_of "$1")
  local mid host key serial
  mid=$(sed -n 's/^TPL-BOOT machine-id=\(.*\)\r\?$/\1/p' "$log" | tr -d '\r' | tail -n1)
  host=$(sed -n 's/^TPL-BOOT hostname=//p' "$log" | tr -d '\r' | tail -n1)
  key=$(sed -n 's/^TPL-BOOT hostkey=\([^ ]*\).*ed25519.*/\1/p; s/^TPL-BOOT hostkey=none.*/none/p' "$log" | tr -d '\r' | tail -n1)
  serial=$(sed -n 's/^TPL-BOOT serial=//p' "$log" | tr -d '\r' | tail -n1)
  printf '  %-12s machine-id=%-32s hostname=%-12s ed25519-key=%-32s serial=%s\n' \
    "$1" "${mid:-(empty)}" "${host:-?}" "${key:-?}" "${serial:-(none)}" >&2
}

say "booting the original VM once"
boot "$vm"
# Keep it: the refused start of the template below truncates the console file.
cp "$dir/$vm.console.log" "$dir/original.console.log"
identity "$vm" "$dir/original.console.log"

say "tpl-generalize $vm --hostname $tpl | tpl-lock | tpl-rename --disks $tpl"
tpl-generalize "$vm" --hostname "$tpl" | tpl-lock | tpl-rename --disks "$tpl"

if [ "$storage" = rbd ]; then
  say "the template refuses to start (its disk reads the protected snapshot $pool/$tpl@tpl)"
else
  say "the template refuses to start (its images are read-only)"
fi
if out=$(v start "$tpl" 2>&1); then
  echo "demo: the locked template started; that must not happen" >&2; exit 1
fi
echo "  virsh start $tpl: $(echo "$out" | grep -m1 -o "Could not open.*\|Permission denied.*\|Block node is read-only.*" || echo "$out")" >&2

say "tpl-clone $tpl ${clones[0]} ${clones[1]} --linked ; tpl-clone $tpl ${clones[2]} --full"
tpl-clone "$tpl" "${clones[0]}" "${clones[1]}" --linked
tpl-clone "$tpl" "${clones[2]}" --full

if [ "$storage" = rbd ]; then
  say "rbd ls -l $pool: the linked clones are rbd clones of the template's snapshot, the full one a copy"
  rbd ls -l "$pool" >&2
  # Check what the listing shows: each linked clone's parent is the snapshot, the full has none.
  for c in "${clones[@]}"; do
    parent=$(rbd info --format json "$pool/$c" | python3 -c 'import json, sys; p = json.load(sys.stdin).get("parent"); print("%s/%s@%s" % (p["pool"], p["image"], p["snapshot"]) if p else "none")')
    want=$pool/$tpl@tpl; [ "$c" = "${clones[2]}" ] && want=none
    [ "$parent" = "$want" ] || { echo "demo: $pool/$c stands on '$parent', not '$want'" >&2; exit 1; }
  done
fi

say "tpl-clone $tpl $ready --user demo --ssh-key $dir/demo_key.pub: a clone its user logs in to with their own key"
ssh-keygen -q -t ed25519 -N '' -C 'tpl demo' -f "$dir/demo_key"
tpl-clone "$tpl" "$ready" --user demo --ssh-key "$dir/demo_key.pub" --dir "$dir" | tee "$dir/ready.json"
seed=$(python3 -c 'import json, sys; print(json.load(sys.stdin)["clone"]["seed"])' < "$dir/ready.json")
# What the clone's first boot reads (cloud-init, or tpl's first-boot action without it):
# read back from the seed by mtools, and checked against the key the demo made.
echo "  its seed $seed: label '$(blkid -o value -s LABEL "$seed")', $(stat -c '%a %U:%G' "$seed")" >&2
echo "  user: $(mtype -i "$seed" ::tpl-user)" >&2
echo "  key:  $(mtype -i "$seed" ::tpl-authorized_keys)" >&2
mtype -i "$seed" ::tpl-authorized_keys | grep -qF "$(cut -d' ' -f2 "$dir/demo_key.pub")" || {
  echo "demo: the seed of $ready does not hold the demo's key" >&2; exit 1; }
echo "  (the demo's busybox guest runs no SSH server: the network tests boot a Debian clone on" >&2
echo "   hvnet with --ready=ssh and log in with the key: make test, tests/tests/network.rs)" >&2

say "booting each clone once"
boot "${clones[@]}"
say "identity of each machine, from its serial console"
identity "$vm" "$dir/original.console.log"
for c in "${clones[@]}"; do identity "$c"; done
# Check what the table shows, so the demo fails loudly when a clone is not its own machine:
# the original and every clone, each with its own machine-id, hostname and SSH host keys.
logs=("$dir/original.console.log")
for c in "${clones[@]}"; do logs+=("$(console_of "$c")"); done
values() { sed -n "s/^TPL-BOOT $1=//p" "$2" | tr -d '\r'; }
duplicated() { sort | uniq -d | grep -c . || true; }
ids=$(for l in "${logs[@]}"; do values machine-id "$l"; done)
hosts=$(for l in "${logs[@]}"; do values hostname "$l"; done)
# As identity() reads them: 'hostkey=<md5 of the .pub file> <path>', or 'hostkey=none'.
keys=$(for l in "${logs[@]}"; do values hostkey "$l"; done | awk '$1 != "none" { print $1 }')
keyless=0
for l in "${logs[@]}"; do
  [ "$(values hostkey "$l" | awk '$1 != "none"' | wc -l)" -gt 0 ] || keyless=$((keyless + 1))
done
n=${#logs[@]}
nids=$(grep -c . <<<"$ids" || true); nhosts=$(grep -c . <<<"$hosts" || true); nkeys=$(grep -c . <<<"$keys" || true)
dup_ids=$(duplicated <<<"$ids"); dup_hosts=$(duplicated <<<"$hosts"); dup_keys=$(duplicated <<<"$keys")
if [ "$nids" = "$n" ] && [ "$nhosts" = "$n" ] && [ "$keyless" = 0 ] &&
   [ "$dup_ids" = 0 ] && [ "$dup_hosts" = 0 ] && [ "$dup_keys" = 0 ]; then
  say "done: the original and each of the ${#clones[@]} clones has its own machine-id, hostname and SSH host keys ($nkeys distinct); the template stays sealed"
else
  echo "demo: the clones do not all have their own identity: of $n machines, $nids report a machine-id ($dup_ids shared), $nhosts a hostname ($dup_hosts shared), $((n - keyless)) SSH host keys ($dup_keys of $nkeys keys shared)" >&2
  exit 1
fi
