#!/usr/bin/env python3
"""make bench: tpl-clone measured side by side with the usual ways of doing the same job.

A benchmark, not a test. On a generated template (a qcow2 image of 10 GiB virtual size
holding 1 GiB of random data in 1 MiB pieces spread every 10 MiB, defined as a libvirt
domain, marked generalized and locked with the real tpl-lock) it measures, alternating
the contenders run by run (A B C D, B C D A, C D A B, ...), RUNS runs each (default 3),
medians:

  full clone     tpl-clone --full, virt-clone, cp --sparse=always, qemu-img convert
                 on the machine's disk and on a btrfs loop file system (reflink):
                 wall time, peak RSS, space the clone allocated
  linked clones  100 in one tpl-clone call vs a shell loop of qemu-img create -b -F
                 + virsh define
  4k writes      qemu-img bench -w (4 KiB writes, O_DIRECT, depth 64) into a linked
                 clone's overlay made by tpl-clone vs one made with qemu-img's defaults
                 vs a fresh copy of the base image, in two patterns: over free space
                 (a 64 KiB stride from the start) and over the template's data
  inventory      tpl-list on 500 linked clones of the template vs what an administrator
                 runs without it: virsh list --all, then per domain virsh domblklist and
                 qemu-img info --backing-chain of each file disk; virsh list --all alone
                 is the floor (what listing the domains costs libvirt itself)
  removal        tpl-rm --with-clones of a template with BENCH_REMOVE linked clones
                 (250 and 1000) vs a shell loop of virsh undefine + rm over the same
                 clones and the template (what it replaces), on a small template of
                 its own

Before every measured command the template image's pages are dropped from the page
cache (sync, then posix_fadvise DONTNEED on the image and, for btrfs, on the loop
file's backing file), so every copy reads the template from the disk; programs and
libraries stay cached, as on a host in use (BENCH_DROP=all drops the whole page cache
instead, which adds the cold start of every program: about 0.1 s for a tool linked
with libvirt's 57 libraries). After the command comes a sync, inside the measured
time, so all pay for durability. Peak RSS is the measured process's (and its waited-for children's)
its peak RSS as /usr/bin/time reports it (its waited-for children included): for
virt-clone that is the Python client, the copy itself runs in libvirtd's qemu-img. Progress goes to stderr, the table to stdout. Everything lives
in /var/lib/libvirt/images/tpl-bench-PID/ and is removed at the end, also on failure
or Ctrl-C (domains undefined, loop file system unmounted).

Environment: URI (default qemu:///system), TPL_BIN_DIR (default target/release),
BENCH_RUNS (default 3), BENCH_LINKED (default 100), BENCH_INVENTORY (default 1000),
BENCH_REMOVE (default 250,1000), BENCH_DROP=all, BENCH_ONLY (some of
full,linked,writes,inventory,removal; default all).

Why qcow2: it is what libvirt templates are, and every contender copies the same file
(virt-clone through libvirt's storage pool, which runs qemu-img convert for qcow2).
cp and qemu-img convert copy only the image file; tpl-clone and virt-clone also define
the clone's domain.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

from benchlib import URI, med, on_signal, run, timed, undefine, virsh

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("TPL_BIN_DIR", os.path.join(HERE, "target", "release"))
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
LINKED = int(os.environ.get("BENCH_LINKED", "100"))
INVENTORY = int(os.environ.get("BENCH_INVENTORY", "1000"))
REMOVE = [int(n) for n in os.environ.get("BENCH_REMOVE", "250,1000").split(",")]
ONLY = set(os.environ.get("BENCH_ONLY", "full,linked,writes,inventory,removal").split(","))
REMOVE_LOOP = "virsh undefine + rm loop"
INVENTORY_LOOP = "virsh domblklist + qemu-img info per domain"
IMAGES = "/var/lib/libvirt/images"
PREFIX = "tpl-bench-"
ROOT = os.path.join(IMAGES, f"{PREFIX}{os.getpid()}")
TAG = f"{PREFIX}{os.getpid()}"  # every domain name this run defines starts with it
NS = "urn:x-tpl:template:1"
GIB, MIB = 1 << 30, 1 << 20
VIRTUAL = 10 * GIB
PIECE = MIB
STRIDE = 10 * MIB  # 1024 pieces of 1 MiB over 10 GiB: 1 GiB of data
OVERLAY_BENCH = ["-w", "-t", "none", "-c", "20000", "-s", "4k", "-S", "64k"]


def say(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


COLD = []  # files whose pages are dropped before each measured command


def evict(paths):
    """Drop these files' pages from the page cache (sync first: only clean pages go)."""
    os.sync()
    if os.environ.get("BENCH_DROP") == "all":
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure(argv, env=None, ok=(0,)):
    """Cold image, run argv, sync; (seconds incl. the sync, seconds of the command, peak RSS KiB).
    An exit status not in `ok` is a failure."""
    evict(COLD)
    return timed(argv, env, ok)


# --- what this run creates, and its removal -------------------------------------------

def cleanup(root=ROOT, tag=TAG):
    """Undefine every domain of a run, unmount its loop file system, remove its directory."""
    names = [n for n in virsh("list", "--all", "--name", check=False).split()
             if n.startswith(tag + "-")]
    undefine(names, "--nvram")
    # virt-clone may have made storage pools for our directories.
    for pool in virsh("pool-list", "--all", "--name", check=False).split():
        x = virsh("pool-dumpxml", pool, check=False)
        m = re.search(r"<path>([^<]*)</path>", x)
        if m and (m.group(1) + "/").startswith(root + "/"):
            virsh("pool-destroy", pool, check=False)
            virsh("pool-undefine", pool, check=False)
    mnt = os.path.join(root, "btrfs")
    if os.path.ismount(mnt):
        subprocess.run(["umount", mnt], capture_output=True)
        if os.path.ismount(mnt):
            subprocess.run(["umount", "-l", mnt], capture_output=True)
    if os.path.isdir(root):
        subprocess.run(["chmod", "-R", "u+w", root], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
    say(f"removed {root} and {len(names)} domain(s)")


def remove_clones(prefix, directory):
    undefine([n for n in virsh("list", "--all", "--name").split() if n.startswith(prefix)],
             "--nvram")
    for f in os.listdir(directory):
        if f.startswith(prefix):
            os.remove(os.path.join(directory, f))


# --- the template ---------------------------------------------------------------------

def domain_xml(name, disk):
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <features><acpi/></features>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='user'><model type='virtio'/></interface>
  </devices>
</domain>
"""


def make_image(path):
    """A qcow2 of 10 GiB virtual size with 1 GiB of random data spread over it."""
    raw = path + ".raw"
    with open(raw, "wb") as f:
        f.truncate(VIRTUAL)
        for off in range(0, VIRTUAL, STRIDE):
            f.seek(off)
            f.write(os.urandom(PIECE))
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path])
    os.remove(raw)


def make_template(name, disk):
    """Define the domain, mark it generalized (as tpl-generalize would), lock it with tpl-lock."""
    xml = os.path.join(ROOT, f"{name}.xml")
    with open(xml, "w") as f:
        f.write(domain_xml(name, disk))
    virsh("define", xml)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    meta = (f'<template xmlns="{NS}"><generalized at="{now}" method="virt-sysprep" '
            f'tool="tpl bench" operations="defaults"/></template>')
    virsh("metadata", name, "--uri", NS, "--key", "tpl", "--set", meta, "--config")
    run([os.path.join(BIN, "tpl-lock"), "-q", "-c", URI, name])


def clone_xml_template(tpl):
    """The template's definition with @NAME@/@FILE@ placeholders, no UUID, MACs or metadata,
    for the shell loop's sed."""
    root = ET.fromstring(virsh("dumpxml", "--inactive", tpl))
    root.find("name").text = "@NAME@"
    for tag in ("uuid", "metadata"):
        e = root.find(tag)
        if e is not None:
            root.remove(e)
    for iface in root.iter("interface"):
        for mac in iface.findall("mac"):
            iface.remove(mac)
    root.find("devices/disk/source").set("file", "@FILE@")
    path = os.path.join(ROOT, "clone.xml.in")
    with open(path, "w") as f:
        f.write(ET.tostring(root, encoding="unicode"))
    return path


# --- measurements ---------------------------------------------------------------------

def allocated(path, btrfs):
    """Bytes the clone file itself allocated: on btrfs its exclusive extents (a reflink
    allocates nothing of its own), elsewhere its blocks."""
    if btrfs:
        out = run(["btrfs", "filesystem", "du", "-s", "--raw", path]).splitlines()[-1].split()
        return int(out[1])
    return os.stat(path).st_blocks * 512


def full_clones(where, tpl, tpl_disk, out_dir, btrfs, results):
    tc = os.path.join(BIN, "tpl-clone")
    contenders = {
        "tpl-clone --full": lambda n, f: [tc, "-q", "-c", URI, tpl, n, "--full", "--dir", out_dir],
        "virt-clone": lambda n, f: ["virt-clone", "-q", "--connect", URI, "-o", tpl, "-n", n,
                                    "-f", f],
        "cp --sparse=always": lambda n, f: ["cp", "--sparse=always", tpl_disk, f],
        "qemu-img convert": lambda n, f: ["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2",
                                          tpl_disk, f],
    }
    order = list(enumerate(contenders.items()))
    for r in range(RUNS):
        # Each round starts with the next contender, so none is always first after the
        # setup or always after the same one.
        for i, (label, argv) in order[r % len(order):] + order[:r % len(order)]:
            name = f"{TAG}-full{i}-{r}"
            f = os.path.join(out_dir, f"{name}.qcow2")
            say(f"{where}: {label} (run {r + 1}/{RUNS})")
            wall, cmd, rss = measure(argv(name, f))
            alloc = allocated(f, btrfs)
            results.setdefault((where, label), []).append((wall, cmd, rss, alloc))
            say(f"  {wall:.2f} s ({cmd:.2f} s before the sync), {rss / 1024:.1f} MiB RSS, "
                f"{alloc / MIB:.0f} MiB allocated")
            remove_clones(name, out_dir)


def linked_clones(tpl, tpl_disk, out_dir, results):
    tc = os.path.join(BIN, "tpl-clone")
    xml_in = clone_xml_template(tpl)
    loop = os.path.join(ROOT, "loop.sh")
    with open(loop, "w") as f:
        f.write(f"""set -e
p=$1
for i in $(seq -w 1 {LINKED}); do
  n=$p$i; f={out_dir}/$n.qcow2
  qemu-img create -q -f qcow2 -b {tpl_disk} -F qcow2 "$f"
  sed -e "s|@NAME@|$n|" -e "s|@FILE@|$f|" {xml_in} > {out_dir}/$n.xml
  virsh -q -c {URI} define {out_dir}/$n.xml >/dev/null
done
""")
    contenders = {
        f"tpl-clone --linked --count {LINKED}":
            lambda p: [tc, "-q", "-c", URI, tpl, "--linked", "--count", str(LINKED),
                       "--prefix", p, "--dir", out_dir],
        "shell loop: qemu-img create + virsh define": lambda p: ["bash", loop, p],
    }
    for r in range(RUNS):
        for i, (label, argv) in enumerate(contenders.items()):
            p = f"{TAG}-lnk{i}-{r}-"
            say(f"linked: {label} (run {r + 1}/{RUNS})")
            wall, cmd, rss = measure(argv(p))
            n = len([x for x in os.listdir(out_dir) if x.startswith(p) and x.endswith(".qcow2")])
            if n != LINKED:
                raise RuntimeError(f"{label}: {n} overlays instead of {LINKED}")
            alloc = sum(os.stat(os.path.join(out_dir, x)).st_blocks * 512
                        for x in os.listdir(out_dir) if x.startswith(p))
            results.setdefault(("linked", label), []).append((wall, cmd, rss, alloc))
            say(f"  {wall:.2f} s ({cmd:.2f} s before the sync), {rss / 1024:.1f} MiB RSS")
            remove_clones(p, out_dir)


def overlay_writes(tpl, tpl_disk, out_dir, results):
    """Two patterns of 4 KiB O_DIRECT writes: 20000 at a 64 KiB stride from the start (over
    the disk's first 1.25 GiB, nine tenths of it free space in the template), and 16384 that
    all land on the template's data (16 passes over its 1024 pieces)."""
    tc = os.path.join(BIN, "tpl-clone")
    base = os.path.join(out_dir, f"{TAG}-base.qcow2")
    on_data = os.path.join(ROOT, "on-data.sh")
    with open(on_data, "w") as f:
        f.write(f"""set -e
for o in $(seq 0 65536 {PIECE - 1}); do
  qemu-img bench -w -t none -c {VIRTUAL // STRIDE} -s 4k -S {STRIDE} -o $o -f qcow2 "$1" >/dev/null
done
""")
    patterns = {
        "free space": lambda img: ["qemu-img", "bench", *OVERLAY_BENCH, "-f", "qcow2", img],
        "template data": lambda img: ["bash", on_data, img],
    }
    for r in range(RUNS):
        for pat, argv in patterns.items():
            ours = f"{TAG}-ovl-{r}"
            run([tc, "-q", "-c", URI, tpl, ours, "--linked", "--dir", out_dir])
            ours_f = os.path.join(out_dir, f"{ours}.qcow2")
            dflt_f = os.path.join(out_dir, f"{TAG}-dflt-{r}.qcow2")
            run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", tpl_disk, "-F", "qcow2", dflt_f])
            # The base image as a full clone would have it: a fresh copy every run.
            run(["cp", "--sparse=always", tpl_disk, base])
            os.chmod(base, 0o644)
            for label, img in ((f"{pat}: tpl-clone's overlay", ours_f),
                               (f"{pat}: qemu-img default overlay", dflt_f),
                               (f"{pat}: base image itself", base)):
                say(f"overlay writes on {label} (run {r + 1}/{RUNS})")
                wall, cmd, rss = measure(argv(img))
                results.setdefault(("4k writes", label), []).append(
                    (wall, cmd, rss, os.stat(img).st_blocks * 512))
                say(f"  {cmd:.2f} s")
            remove_clones(ours, out_dir)
            os.remove(dflt_f)
            os.remove(base)


def inventory(tpl, out_dir, results):
    """tpl-list on INVENTORY linked clones of the template, against virsh list --all and then,
    per domain, virsh domblklist and qemu-img info --backing-chain of each file disk (what
    tpl-list reads: the domains, their disks, their chains and the space they take). Every
    contender lists the whole connection."""
    tc = os.path.join(BIN, "tpl-clone")
    tl = os.path.join(BIN, "tpl-list")
    prefix = f"{TAG}-inv-"
    say(f"inventory: making {INVENTORY} linked clones")
    run([tc, "-q", "-c", URI, tpl, "--linked", "--count", str(INVENTORY), "--prefix", prefix,
         "--dir", out_dir])
    loop = os.path.join(ROOT, "inventory.sh")
    with open(loop, "w") as f:
        f.write(f"""set -e
for d in $(virsh -q -c {URI} list --all --name); do
  virsh -q -c {URI} domblklist --details "$d" | while read -r type device target source; do
    if [ "$type" = file ] && [ "$device" = disk ]; then
      qemu-img info -U --backing-chain --output=json "$source"
    fi
  done
done >/dev/null
""")
    contenders = {
        # Exit 1 is tpl-list reporting orphans that this machine may hold: a result too.
        "tpl-list (records)": ([tl, "-c", URI], (0, 1)),
        "virsh list --all (the floor)": (["virsh", "-q", "-c", URI, "list", "--all"], (0,)),
        INVENTORY_LOOP: (["bash", loop], (0,)),
    }
    order = list(contenders.items())
    for r in range(RUNS):
        for label, (argv, ok) in order[r % len(order):] + order[:r % len(order)]:
            say(f"inventory: {label} (run {r + 1}/{RUNS})")
            wall, cmd, rss = measure(argv, ok=ok)
            results.setdefault(("inventory", label), []).append((wall, cmd, rss, 0))
            say(f"  {cmd:.2f} s")
    remove_clones(prefix, out_dir)


def removal(out_dir, results):
    """tpl-rm --with-clones of a template with N linked clones, against a shell loop of
    virsh undefine and rm over the same clones and then the template. Each run makes a
    small template (64 MiB qcow2, no data: the removal reads headers, not data) and its
    clones afresh; only the removal is measured."""
    tc, tr = os.path.join(BIN, "tpl-clone"), os.path.join(BIN, "tpl-rm")
    loop = os.path.join(ROOT, "removal.sh")
    for n in REMOVE:
        contenders = ["tpl-rm --with-clones", REMOVE_LOOP]
        for r in range(RUNS):
            for label in contenders[r % 2:] + contenders[:r % 2]:
                tpl = f"{TAG}-rm{n}"
                disk = os.path.join(out_dir, f"{tpl}.qcow2")
                run(["qemu-img", "create", "-q", "-f", "qcow2", disk, "64M"])
                make_template(tpl, disk)
                prefix = f"{TAG}-rm{n}-c"
                say(f"removal: {n} linked clones for {label} (run {r + 1}/{RUNS})")
                run([tc, "-q", "-c", URI, tpl, "--linked", "--count", str(n), "--prefix",
                     prefix, "--dir", out_dir, "--no-identity"])
                if label == REMOVE_LOOP:
                    with open(loop, "w") as f:
                        f.write(f"""set -e
for d in $(virsh -q -c {URI} list --all --name | grep '^{prefix}'); do
  virsh -q -c {URI} undefine "$d" >/dev/null
  rm -f {out_dir}/"$d".qcow2
done
virsh -q -c {URI} undefine {tpl} >/dev/null
chmod u+w {disk}; rm -f {disk}
""")
                    argv = ["bash", loop]
                else:
                    argv = [tr, "-q", "-c", URI, "--with-clones", tpl]
                wall, cmd, rss = measure(argv)
                results.setdefault((f"removal {n}", label), []).append((wall, cmd, rss, 0))
                say(f"  {cmd:.2f} s")
                left = [f for f in os.listdir(out_dir) if f.startswith(tpl)]
                if left:
                    raise RuntimeError(f"removal: {label} left {len(left)} files: {left[:3]}")


def rss_of(argv):
    out = subprocess.run(["/usr/bin/time", "-f", "%M", *argv], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return int(out.stderr.split()[-1])


# --- the table ------------------------------------------------------------------------

def table(results, targets):
    out = []
    out.append(f"tpl bench: template qcow2, {VIRTUAL // GIB} GiB virtual, "
               f"{VIRTUAL // STRIDE * PIECE // MIB} MiB random data in {PIECE // MIB} MiB pieces "
               f"every {STRIDE // MIB} MiB; medians of {RUNS} alternating runs; template "
               f"image evicted from the page cache before and sync after each command")
    out.append("")
    hdr = f"{'case':<16} {'contender':<46} {'wall s':>8} {'cmd s':>8} {'peak RSS':>10} {'allocated':>10}"
    out.append(hdr)
    out.append("-" * len(hdr))
    for (where, label), rows in results.items():
        out.append(f"{where:<16} {label:<46} {med(rows, 0):>8.3f} {med(rows, 1):>8.3f} "
                   f"{med(rows, 2) / 1024:>7.1f} MiB {med(rows, 3) / MIB:>6.0f} MiB")
    out.append("")
    out.append("wall s: the command and the sync after it; cmd s: the command alone. "
               "allocated: the clone's blocks (btrfs: its exclusive extents; linked: all "
               "overlays; 4k writes: the image after them; cmd s of 4k writes is the figure compared).")
    out.append(f"peak RSS: /usr/bin/time's %M, which counts the pages of shared libraries too; "
               f"'tpl-clone --help' alone, loading libvirt's libraries: "
               f"{rss_of([os.path.join(BIN, 'tpl-clone'), '--help']) / 1024:.1f} MiB, "
               f"'virsh version': {rss_of(['virsh', '-c', URI, 'version']) / 1024:.1f} MiB.")
    out.append("")
    for ok, text in targets:
        out.append(f"{'PASS' if ok else 'FAIL'}  {text}")
    return "\n".join(out)


def targets(res):
    t = []
    m = lambda key, k=0: med(res[key], k)
    d = "machine's disk"
    if (d, "tpl-clone --full") in res:
        ours, cp, vc = (m((d, k)) for k in ("tpl-clone --full", "cp --sparse=always", "virt-clone"))
        t.append((ours <= cp, f"full clone on the machine's disk <= 1.0x cp: "
                              f"{ours:.2f} s vs {cp:.2f} s = {ours / cp:.2f}x"))
        t.append((ours <= 0.8 * vc, f"full clone on the machine's disk <= 0.8x virt-clone: "
                                    f"{ours:.2f} s vs {vc:.2f} s = {ours / vc:.2f}x"))
    if ("btrfs (reflink)", "tpl-clone --full") in res:
        rw = m(("btrfs (reflink)", "tpl-clone --full"))
        rc = m(("btrfs (reflink)", "tpl-clone --full"), 1)
        cw, cc = (m(("btrfs (reflink)", "cp --sparse=always"), k) for k in (0, 1))
        # tpl-clone fsyncs the clone and its directory before it exits; the sync after it
        # flushes whatever else the machine wrote meanwhile (cp's reflink pays it too).
        t.append((rc < 0.1, f"reflink full clone < 0.1 s: {rc:.3f} s, durable when it "
                            f"exits (with the sync after it: {rw:.3f} s; cp's reflink "
                            f"{cc:.3f} s, with the sync {cw:.3f} s)"))
    lk = [k for k in res if k[0] == "linked"]
    if lk:
        a, b = m(lk[0]), m(lk[1])
        t.append((a <= 0.5 * b, f"{LINKED} linked clones <= 0.5x the shell loop: "
                                f"{a:.2f} s vs {b:.2f} s = {a / b:.2f}x"))
    for pat in ("free space", "template data"):
        key = lambda who: ("4k writes", f"{pat}: {who}")
        if key("tpl-clone's overlay") not in res:
            continue
        a, b, c = (m(key(w), 1) for w in ("tpl-clone's overlay", "qemu-img default overlay",
                                          "base image itself"))
        t.append((b >= 3 * a, f"overlay 4k writes on {pat} >= 3x the defaults: {a:.2f} s vs "
                              f"{b:.2f} s = {b / a:.1f}x (base image: {c:.2f} s; ours "
                              f"{a / c:.2f}x the base's time)"))
    if ("inventory", "tpl-list (records)") in res:
        ours, floor, loop = (m(("inventory", k), 1) for k in
                             ("tpl-list (records)", "virsh list --all (the floor)", INVENTORY_LOOP))
        t.append((ours - floor < 0.5, f"tpl-list on {INVENTORY} linked clones < 0.5 s beyond "
                                      f"virsh list --all: {ours:.2f} s vs {floor:.2f} s "
                                      f"(+{ours - floor:.2f} s)"))
        t.append((ours <= 0.1 * loop, f"tpl-list on {INVENTORY} linked clones <= 0.1x {INVENTORY_LOOP}: "
                                      f"{ours:.2f} s vs {loop:.2f} s = {ours / loop:.3f}x"))
    if ("inventory", "tpl-list (records)") in res:
        ours, floor = (m(("inventory", k), 1) for k in
                       ("tpl-list (records)", "virsh list --all (the floor)"))
        t.append((ours <= 2 * floor, f"tpl-list on {INVENTORY} linked clones <= 2x virsh "
                                     f"list --all: {ours:.2f} s vs {floor:.2f} s = "
                                     f"{ours / floor:.2f}x"))
    rm = {n: (m((f"removal {n}", "tpl-rm --with-clones"), 1),
              m((f"removal {n}", REMOVE_LOOP), 1))
          for n in REMOVE if (f"removal {n}", REMOVE_LOOP) in res}
    for n, (ours, loop) in rm.items():
        t.append((ours <= 0.5 * loop, f"tpl-rm --with-clones of {n} linked clones <= 0.5x "
                                      f"the {REMOVE_LOOP}: {ours:.2f} s vs {loop:.2f} s = "
                                      f"{ours / loop:.2f}x"))
    if len(rm) >= 2:
        (n0, (a, _)), (n1, (b, _)) = sorted(rm.items())[0], sorted(rm.items())[-1]
        growth = (b / a) / (n1 / n0)
        t.append((growth <= 1.25, f"tpl-rm --with-clones linear from {n0} to {n1} clones: "
                                  f"{a:.2f} s to {b:.2f} s, {b / a:.1f}x the time for "
                                  f"{n1 / n0:.0f}x the clones ({growth:.2f} of linear)"))
    clone_rows = [r for k, rows in res.items() if k[1].startswith("tpl-clone") for r in rows]
    if not clone_rows:
        return t
    rss = max(r[2] for r in clone_rows)
    t.append((rss < 20 * 1024, f"tpl-clone peak RSS < 20 MiB: {rss / 1024:.1f} MiB "
                               f"(the largest of all its runs)"))
    return t


def main():
    if os.geteuid() != 0:
        sys.exit("bench: must run as root (libvirt's system URI, drop_caches, loop mount)")
    for b in ("tpl-clone", "tpl-lock", "tpl-list"):
        if not os.access(os.path.join(BIN, b), os.X_OK):
            sys.exit(f"bench: {BIN}/{b} missing; build with cargo build --release")
    # What killed runs left: directories of dead pids.
    for d in os.listdir(IMAGES):
        m = re.fullmatch(re.escape(PREFIX) + r"(\d+)", d)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            cleanup(os.path.join(IMAGES, d), d)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    started = time.monotonic()
    results = {}
    try:
        os.makedirs(ROOT)
        os.chmod(ROOT, 0o755)
        disk = os.path.join(ROOT, "template.qcow2")
        say(f"making the template in {ROOT} (1 GiB of random data)")
        make_image(disk)
        tpl = f"{TAG}-tpl"
        make_template(tpl, disk)
        out = os.path.join(ROOT, "out")
        os.makedirs(out)

        if "full" in ONLY:
            say("making a btrfs loop file system for the reflink case")
            mnt = os.path.join(ROOT, "btrfs")
            os.makedirs(mnt)
            fsimg = os.path.join(ROOT, "btrfs.img")
            with open(fsimg, "wb") as f:
                f.truncate(16 * GIB)
            run(["mkfs.btrfs", "-q", fsimg])
            run(["mount", "-o", "loop", fsimg, mnt])
            bdisk = os.path.join(mnt, "template.qcow2")
            run(["cp", "--reflink=never", "--sparse=always", disk, bdisk])
            btpl = f"{TAG}-tplb"
            make_template(btpl, bdisk)
            bout = os.path.join(mnt, "out")
            os.makedirs(bout)

            COLD[:] = [disk]
            full_clones("machine's disk", tpl, disk, out, False, results)
            COLD[:] = [bdisk, fsimg]
            full_clones("btrfs (reflink)", btpl, bdisk, bout, True, results)
        COLD[:] = [disk]
        if "linked" in ONLY:
            linked_clones(tpl, disk, out, results)
        if "writes" in ONLY:
            overlay_writes(tpl, disk, out, results)
        if "inventory" in ONLY:
            inventory(tpl, out, results)
        if "removal" in ONLY:
            removal(out, results)
        print(table(results, targets(results)), flush=True)
        say(f"done in {time.monotonic() - started:.0f} s")
    except KeyboardInterrupt:
        say("interrupted; cleaning up")
        if results:
            print(table(results, []), flush=True)
        cleanup()
        sys.exit(130)
    except BaseException:
        cleanup()
        raise
    cleanup()


if __name__ == "__main__":
    main()
