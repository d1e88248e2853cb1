#!/usr/bin/env python3
"""make bench, the Ceph RBD part: tpl-clone on RBD measured side by side with the usual ways
of doing the same job on the test cluster (scripts/ceph-up.sh; CEPH_CONF names it).

A benchmark, not a test. In a pool of its own (tpl-bench-PID, 32 PGs, removed at the end) it
makes a template image of 10 GiB virtual size holding 1 GiB of random data (1 MiB pieces
every 10 MiB, written sparsely), defines it as a libvirt domain whose disk is that image,
marks it generalized and locks it with the real tpl-lock (a protected snapshot `@tpl`).
Then, alternating the contenders run by run (A B C, B C A, C A B, ...), RUNS runs each
(default 3), medians:

  linked clones  100 in one tpl-clone call (linked: rbd clones of POOL/TPL@tpl, each
                 defined in libvirt) vs a shell loop of `rbd clone` + `virsh define`
                 (the same disk XML); target <= 0.2x the loop
  full clone     tpl-clone --full (a copy of the snapshot, defined in libvirt) vs
                 `rbd deep cp` and `qemu-img convert` rbd -> rbd (image only);
                 target <= 1.0x the faster of the two

Each command is followed by a sync inside the measured time (Ceph acknowledges a write
once it is durable; the sync is for symmetry with bench.py). Peak RSS is /usr/bin/time's
%M of the measured process (its waited-for children included: for the shell loop the
largest single rbd or virsh). Allocated: `rbd du` of what the command made (all 100
clones for the linked case). Progress goes to stderr, the table to stdout. Everything
(domains, pool, scratch directory) is removed at the end, also on failure or Ctrl-C; what
a killed run left (pools tpl-bench-PID and domains of a dead PID) is removed by the next.

Environment: CEPH_CONF (required), URI (default qemu:///system), TPL_BIN_DIR (default
target/release), TPL_CEPH_DIR (default /var/lib/tpl-ceph: the libvirt secret's uuid),
BENCH_RUNS (default 3), BENCH_LINKED (default 100), BENCH_ONLY (linked,full; default both).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from benchlib import URI, med, on_signal, run, timed, undefine, virsh

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("TPL_BIN_DIR", os.path.join(HERE, "target", "release"))
CONF = os.environ.get("CEPH_CONF", "")
CEPH_DIR = os.environ.get("TPL_CEPH_DIR", "/var/lib/tpl-ceph")
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
LINKED = int(os.environ.get("BENCH_LINKED", "100"))
ONLY = set(os.environ.get("BENCH_ONLY", "linked,full").split(","))
PREFIX = "tpl-bench-"
POOL = f"{PREFIX}{os.getpid()}"
TAG = f"{PREFIX}rbd-{os.getpid()}"  # every domain name this run defines starts with it
ROOT = os.path.join("/var/lib/libvirt/images", f"{PREFIX}rbd-{os.getpid()}")
NS = "urn:x-tpl:template:1"
GIB, MIB = 1 << 30, 1 << 20
VIRTUAL = 10 * GIB
PIECE = MIB
STRIDE = 10 * MIB  # 1024 pieces of 1 MiB over 10 GiB: 1 GiB of data
LOOP = "shell loop: rbd clone + virsh define"


def say(msg):
    print(f"bench-rbd: {msg}", file=sys.stderr, flush=True)


def ceph(*args, check=True):
    p = subprocess.run(["timeout", "120", "ceph", "--connect-timeout", "20", *args],
                       capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"ceph {' '.join(args)}: {p.stderr.strip()}")
    return p.stdout


def rbd(*args, check=True):
    p = subprocess.run(["rbd", *args], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"rbd {' '.join(args)}: {p.stderr.strip()}")
    return p.stdout


def qemu_rbd(image):
    return f"rbd:{POOL}/{image}:conf={CONF}:id=admin"


def measure(argv):
    """Run argv, then sync; (seconds incl. the sync, seconds of the command, peak RSS KiB)."""
    return timed(argv)


def used_bytes(images):
    """What `rbd du` says the images allocate (their own data, not their parent's)."""
    total = 0
    for i in images:
        out = json.loads(rbd("du", "--format", "json", f"{POOL}/{i}"))
        total += sum(x.get("used_size", 0) for x in out.get("images", []) if "snapshot" not in x)
    return total


# --- what this run creates, and its removal -------------------------------------------

def cleanup(pool=POOL, tag=TAG, root=ROOT):
    """Undefine every domain of a run, delete its pool (all its images go with it)."""
    names = [n for n in virsh("list", "--all", "--name", check=False).split()
             if n.startswith(tag + "-")]
    undefine(names)
    if pool in ceph("osd", "pool", "ls", check=False).split():
        ceph("osd", "pool", "rm", pool, pool, "--yes-i-really-really-mean-it", check=False)
    shutil.rmtree(root, ignore_errors=True)
    say(f"removed the pool {pool} and {len(names)} domain(s)")


def remove_images(images):
    for i in images:
        rbd("rm", "--no-progress", f"{POOL}/{i}", check=False)


def remove_clones(prefix):
    doms = [n for n in virsh("list", "--all", "--name").split() if n.startswith(prefix)]
    undefine(doms)
    remove_images([i for i in rbd("ls", POOL).split() if i.startswith(prefix)])


# --- the template ---------------------------------------------------------------------

def mon_v1():
    """The monitor's msgr-v1 address (what libvirt's <host> and qemu use)."""
    mons = json.loads(ceph("mon", "dump", "--format", "json"))["mons"]
    for m in mons:
        for a in m["public_addrs"]["addrvec"]:
            if a["type"] == "v1":
                host, port = a["addr"].rsplit(":", 1)
                return host, port
    raise RuntimeError("the cluster has no msgr-v1 monitor address")


def secret_uuid():
    path = os.path.join(CEPH_DIR, "libvirt-secret.uuid")
    try:
        uuid = open(path).read().strip()
    except OSError as e:
        sys.exit(f"bench-rbd: no libvirt ceph secret ({e}); run make ceph")
    virsh("secret-dumpxml", uuid)
    return uuid


def disk_xml(image, host, port, secret, snapshot=None):
    snap = f"<snapshot name='{snapshot}'/>" if snapshot else ""
    return (f"<disk type='network' device='disk'><driver name='qemu' type='raw'/>"
            f"<source protocol='rbd' name='{POOL}/{image}'>{snap}"
            f"<host name='{host}' port='{port}'/></source>"
            f"<auth username='admin'><secret type='ceph' uuid='{secret}'/></auth>"
            f"<target dev='vda' bus='virtio'/></disk>")


def domain_xml(name, disk):
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <features><acpi/></features>
  <devices>
    {disk}
    <interface type='user'><model type='virtio'/></interface>
  </devices>
</domain>
"""


def make_image(image):
    """POOL/image: 10 GiB virtual with 1 GiB of random data spread over it, written sparsely
    (qemu-img convert skips the holes of a sparse local file)."""
    raw = os.path.join(ROOT, "template.raw")
    with open(raw, "wb") as f:
        f.truncate(VIRTUAL)
        for off in range(0, VIRTUAL, STRIDE):
            f.seek(off)
            f.write(os.urandom(PIECE))
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", raw, qemu_rbd(image)])
    os.remove(raw)


def make_template(name, host, port, secret):
    """The domain on POOL/name, marked generalized (as tpl-generalize would), locked by tpl-lock."""
    xml = os.path.join(ROOT, f"{name}.xml")
    with open(xml, "w") as f:
        f.write(domain_xml(name, disk_xml(name, host, port, secret)))
    virsh("define", xml)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    meta = (f'<template xmlns="{NS}"><generalized at="{now}" method="virt-sysprep" '
            f'tool="tpl bench" operations="defaults"/></template>')
    virsh("metadata", name, "--uri", NS, "--key", "tpl", "--set", meta, "--config")
    run([os.path.join(BIN, "tpl-lock"), "-q", "-c", URI, name])


# --- measurements ---------------------------------------------------------------------

def linked_clones(tpl, host, port, secret, results):
    tc = os.path.join(BIN, "tpl-clone")
    xml_in = os.path.join(ROOT, "clone.xml.in")
    with open(xml_in, "w") as f:
        f.write(domain_xml("@NAME@", disk_xml("@NAME@", host, port, secret)))
    loop = os.path.join(ROOT, "loop.sh")
    with open(loop, "w") as f:
        f.write(f"""set -e
p=$1
for i in $(seq -w 1 {LINKED}); do
  n=$p$i
  rbd clone {POOL}/{tpl}@tpl {POOL}/$n
  sed -e "s|@NAME@|$n|g" {xml_in} > {ROOT}/$n.xml
  virsh -q -c {URI} define {ROOT}/$n.xml >/dev/null
done
""")
    contenders = {
        f"tpl-clone --linked --count {LINKED}":
            lambda p: [tc, "-q", "-c", URI, tpl, "--linked", "--count", str(LINKED),
                       "--prefix", p],
        LOOP: lambda p: ["bash", loop, p],
    }
    order = list(enumerate(contenders.items()))
    for r in range(RUNS):
        for i, (label, argv) in order[r % len(order):] + order[:r % len(order)]:
            p = f"{TAG}-lnk{i}-{r}-"
            say(f"linked: {label} (run {r + 1}/{RUNS})")
            wall, cmd, rss = measure(argv(p))
            made = [x for x in rbd("ls", POOL).split() if x.startswith(p)]
            doms = [n for n in virsh("list", "--all", "--name").split() if n.startswith(p)]
            if len(made) != LINKED or len(doms) != LINKED:
                raise RuntimeError(f"{label}: {len(made)} images and {len(doms)} domains "
                                   f"instead of {LINKED}")
            parent = json.loads(rbd("info", "--format", "json", f"{POOL}/{made[0]}"))["parent"]
            if (parent["image"], parent["snapshot"]) != (tpl, "tpl"):
                raise RuntimeError(f"{label}: {made[0]} stands on {parent}")
            alloc = used_bytes(made)
            results.setdefault(("linked", label), []).append((wall, cmd, rss, alloc))
            say(f"  {wall:.2f} s ({cmd:.2f} s before the sync), {rss / 1024:.1f} MiB RSS")
            remove_clones(p)


def full_clones(tpl, results):
    tc = os.path.join(BIN, "tpl-clone")
    contenders = {
        "tpl-clone --full": lambda n: [tc, "-q", "-c", URI, tpl, n, "--full"],
        "rbd deep cp": lambda n: ["rbd", "--no-progress", "deep", "cp",
                                  f"{POOL}/{tpl}@tpl", f"{POOL}/{n}"],
        "qemu-img convert rbd -> rbd": lambda n: ["qemu-img", "convert", "-f", "raw", "-O", "raw",
                                                  qemu_rbd(f"{tpl}@tpl"), qemu_rbd(n)],
    }
    order = list(enumerate(contenders.items()))
    for r in range(RUNS):
        for i, (label, argv) in order[r % len(order):] + order[:r % len(order)]:
            name = f"{TAG}-full{i}-{r}"
            say(f"full: {label} (run {r + 1}/{RUNS})")
            wall, cmd, rss = measure(argv(name))
            info = json.loads(rbd("info", "--format", "json", f"{POOL}/{name}"))
            if info["size"] != VIRTUAL or info.get("parent"):
                raise RuntimeError(f"{label}: {name} is {info}")
            alloc = used_bytes([name])
            results.setdefault(("full clone", label), []).append((wall, cmd, rss, alloc))
            say(f"  {wall:.2f} s ({cmd:.2f} s before the sync), {rss / 1024:.1f} MiB RSS, "
                f"{alloc / MIB:.0f} MiB allocated")
            # The template snapshot's data must be what the copies read.
            undefine([name])
            remove_images([name])


# --- the table ------------------------------------------------------------------------

def table(results, targets):
    out = []
    out.append(f"tpl bench on Ceph RBD ({POOL}, single-OSD test cluster): template image "
               f"{VIRTUAL // GIB} GiB virtual, {VIRTUAL // STRIDE * PIECE // MIB} MiB random "
               f"data in {PIECE // MIB} MiB pieces every {STRIDE // MIB} MiB; medians of "
               f"{RUNS} alternating runs; a sync after each command")
    out.append("")
    hdr = (f"{'case':<12} {'contender':<40} {'wall s':>8} {'cmd s':>8} {'peak RSS':>10} "
           f"{'allocated':>10}")
    out.append(hdr)
    out.append("-" * len(hdr))
    for (where, label), rows in results.items():
        out.append(f"{where:<12} {label:<40} {med(rows, 0):>8.3f} {med(rows, 1):>8.3f} "
                   f"{med(rows, 2) / 1024:>7.1f} MiB {med(rows, 3) / MIB:>6.0f} MiB")
    out.append("")
    out.append("wall s: the command and the sync after it (the figure compared); cmd s: the "
               "command alone. allocated: rbd du of what it made (linked: all clones), counted "
               "in whole 4 MiB objects: the template's 1 GiB touches 1024 of them. "
               "tpl-clone also defines each clone in libvirt; rbd deep cp and qemu-img only copy.")
    out.append("")
    for ok, text in targets:
        out.append(f"{'PASS' if ok else 'FAIL'}  {text}")
    return "\n".join(out)


def targets(res):
    t = []
    m = lambda key: med(res[key], 0)
    lk = ("linked", f"tpl-clone --linked --count {LINKED}")
    if lk in res and ("linked", LOOP) in res:
        a, b = m(lk), m(("linked", LOOP))
        t.append((a <= 0.2 * b, f"{LINKED} linked clones on RBD <= 0.2x the shell loop: "
                                f"{a:.2f} s vs {b:.2f} s = {a / b:.2f}x"))
    fk = ("full clone", "tpl-clone --full")
    if fk in res:
        ours = m(fk)
        others = {k[1]: m(k) for k in res if k[0] == "full clone" and k != fk}
        best = min(others, key=others.get)
        t.append((ours <= others[best], f"full RBD clone <= 1.0x the faster of "
                                        f"{' and '.join(others)} ({best}): {ours:.2f} s vs "
                                        f"{others[best]:.2f} s = {ours / others[best]:.2f}x"))
    return t


def main():
    if os.geteuid() != 0:
        sys.exit("bench-rbd: must run as root (libvirt's system URI)")
    if not CONF or not os.path.isfile(CONF):
        sys.exit("bench-rbd: CEPH_CONF must name the test cluster's ceph.conf (make ceph; "
                 "export CEPH_CONF=/var/lib/tpl-ceph/ceph.conf)")
    for b in ("tpl-clone", "tpl-lock"):
        if not os.access(os.path.join(BIN, b), os.X_OK):
            sys.exit(f"bench-rbd: {BIN}/{b} missing; build with cargo build --release")
    # What killed runs left: pools and domains of dead pids.
    for p in ceph("osd", "pool", "ls").split():
        mt = re.fullmatch(re.escape(PREFIX) + r"(\d+)", p)
        if mt and not os.path.exists(f"/proc/{mt.group(1)}"):
            cleanup(p, f"{PREFIX}rbd-{mt.group(1)}", os.path.join(
                "/var/lib/libvirt/images", f"{PREFIX}rbd-{mt.group(1)}"))
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    started = time.monotonic()
    results = {}
    try:
        os.makedirs(ROOT)
        ceph("osd", "pool", "create", POOL, "32")
        ceph("osd", "pool", "set", POOL, "pg_autoscale_mode", "off")
        rbd("pool", "init", POOL)
        host, port = mon_v1()
        secret = secret_uuid()
        tpl = f"{TAG}-tpl"
        say(f"making the template {POOL}/{tpl} (1 GiB of random data over 10 GiB)")
        make_image(tpl)
        make_template(tpl, host, port, secret)
        say(f"template locked at {POOL}/{tpl}@tpl")
        if "linked" in ONLY:
            linked_clones(tpl, host, port, secret, results)
        if "full" in ONLY:
            full_clones(tpl, results)
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
