"""make bench, issue 20: the time from the command to a successful ssh login with the
user's own key, for 1 and for 4 clones of one Debian 12 template, tpl against the ways a
KVM administrator has without it, on the same template and the same network:

  tpl:    tpl-clone TPL NAMES... --ssh-key KEY.pub --ready=ssh, then ssh to each clone
          (the host keys pinned from the records);
  peer A: for each clone, one after another: virt-clone, virt-customize (the user made,
          --ssh-inject its key), virsh start, wait for the DHCP lease, ssh;
  peer B: for each clone, one after another: a copy of the template's disk, virt-install
          --import --cloud-init user-data=(the user with its key), wait for the lease,
          ssh.

Every way makes the same user (bench) with the same key and logs in as it.

Everything runs on hvnet (scripts/hvnet-up.sh): its guests are reached only inside its
network namespace, through scripts/hvnet-exec.sh; every ssh and every tool that waits for
a guest runs there. TCG (docs/ENVIRONMENT.md): a guest boots in about a minute, so the
numbers are minutes; what they compare is the same on every side.

Prints a table and the ratios; the target is 4 clones ready in at most 0.5x the peer
loop's time."""

import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BIN = os.environ.get("TPL_BIN_DIR", os.path.join(ROOT, "target", "release"))
HVNET_DIR = os.environ.get("TPL_HVNET_DIR", "/var/lib/tpl-hvnet")
URI = f"qemu+unix:///system?socket={HVNET_DIR}/run/libvirt/libvirt-sock"
# benchlib's virsh talks to $URI: hvnet's.
os.environ["URI"] = URI
sys.path.insert(0, HERE)
import benchlib  # noqa: E402
EXEC = os.path.join(HERE, "hvnet-exec.sh")
DIR = "/var/tmp/tpl-bench-ready"
TPL = "tplbench-ready-tpl"
TIMEOUT = 900
STATE = os.path.join(DIR, "state")
# The user every way creates, who logs in with the key.
USER = "bench"


def say(msg):
    print(f"bench-ready: {msg}", file=sys.stderr, flush=True)


def run(argv, netns=False, **kw):
    """A helper command that must succeed; its stdout."""
    if netns:
        argv = [EXEC, *argv]
    env = dict(os.environ, TPL_STATE_DIR=STATE, LIBGUESTFS_BACKEND="direct",
               LIBGUESTFS_BACKEND_SETTINGS="force_tcg")
    p = subprocess.run(argv, capture_output=True, text=True, env=env, **kw)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {p.returncode}: {p.stderr.strip()[-2000:]}")
    return p.stdout


def virsh(*args, check=True):
    return benchlib.virsh(*args, check=check)


def tool(name):
    return os.path.join(BIN, name)


def lease(name):
    """The domain's IPv4 address from tplnet's DHCP leases, or None."""
    out = virsh("domifaddr", name, "--source", "lease", check=False)
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 4 and f[2] == "ipv4":
            return f[3].split("/")[0]
    return None


def ssh_ok(addr, user, key, known_hosts=None):
    """One ssh login (inside hvnet's namespace) that runs `true`."""
    opts = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=5"]
    if known_hosts:
        opts += ["-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known_hosts}"]
    else:
        # The peers have no way to know the host key: they trust the first connection.
        opts += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
    p = subprocess.run([EXEC, "ssh", "-i", key, *opts, f"{user}@{addr}", "true"],
                       capture_output=True, text=True)
    return p.returncode == 0


def wait_login(name, user, key):
    """Poll until the domain has a lease and takes an ssh login (polling with a deadline:
    nothing tells when a guest is up)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < TIMEOUT:
        addr = lease(name)
        if addr and ssh_ok(addr, user, key):
            return
        time.sleep(1)
    raise RuntimeError(f"{name}: no ssh login within {TIMEOUT} s")


def cleanup():
    for d in virsh("list", "--all", "--name", check=False).split():
        if d.startswith("tplbench-ready"):
            virsh("destroy", d, check=False)
            virsh("undefine", "--nvram", d, check=False)
    # The reservations and leases of removed domains are of no one; tplnet keeps them
    # until they expire, which changes nothing here (no fixed address is used).
    if os.path.isdir(DIR):
        subprocess.run(["chattr", "-R", "-i", DIR], capture_output=True)
        shutil.rmtree(DIR, ignore_errors=True)


def template():
    """The Debian template on hvnet: generalized and locked by tpl."""
    disk, kernel, initrd = run([os.path.join(ROOT, "tests/guest/build-debian.sh"),
                                "--cached"]).split()
    os.makedirs(STATE, exist_ok=True)
    os.chmod(DIR, 0o755)
    d = os.path.join(DIR, f"{TPL}.qcow2")
    run(["cp", "--sparse=always", disk, d])
    k, i = os.path.join(DIR, "vmlinuz"), os.path.join(DIR, "initrd")
    shutil.copy(kernel, k)
    shutil.copy(initrd, i)
    with open(os.path.join(ROOT, "tests/guest/debian-domain.xml")) as f:
        xml = f.read()
    xml = (xml.replace("@NAME@", TPL).replace("@DISK@", d).replace("@KERNEL@", k)
           .replace("@INITRD@", i).replace("@EXTRA@", "")
           .replace("<log file='@CONSOLE@' append='off'/>", ""))
    x = os.path.join(DIR, "tpl.xml")
    with open(x, "w") as f:
        f.write(xml)
    virsh("define", x)
    run([tool("tpl-generalize"), "-c", URI, "-q", TPL])
    run([tool("tpl-lock"), "-c", URI, "-q", TPL])
    return d, k, i


def tpl_way(names, key):
    """tpl-clone ... --ready=ssh, then an ssh login to each with the pinned host keys."""
    import json
    t0 = time.monotonic()
    out = run([tool("tpl-clone"), "-c", URI, "-q", TPL, *names, "--user", USER,
               "--ssh-key", key + ".pub", "--ready=ssh", "--ready-timeout", str(TIMEOUT)],
              netns=True)
    for line in out.splitlines():
        rec = json.loads(line)
        addr = rec["ready"]["addresses"][0]
        kh = os.path.join(DIR, rec["name"] + ".known_hosts")
        with open(kh, "w") as f:
            for k in rec["ready"]["host_keys"]:
                f.write(f"{addr} {k['key']}\n")
        if not ssh_ok(addr, USER, key, kh):
            raise RuntimeError(f"tpl: no ssh login to {rec['name']} at {addr}")
    return time.monotonic() - t0


def peer_a(names, key):
    """virt-clone + virt-customize --ssh-inject + start + lease + ssh, one after another;
    the time of each clone, cumulated."""
    times, t0 = [], time.monotonic()
    for n in names:
        run(["virt-clone", "--connect", URI, "--original", TPL, "--name", n,
             "--file", os.path.join(DIR, n + ".qcow2")])
        run(["virt-customize", "-q", "-c", URI, "-d", n,
             "--run-command", f"useradd -m -s /bin/bash {USER}",
             "--ssh-inject", f"{USER}:file:{key}.pub"])
        virsh("start", n)
        wait_login(n, USER, key)
        times.append(time.monotonic() - t0)
    return times


def peer_b(names, key, disk, kernel, initrd):
    """A copy of the template's disk + virt-install --import --cloud-init + lease + ssh,
    one after another; the time of each clone, cumulated."""
    userdata = os.path.join(DIR, "user-data")
    with open(key + ".pub") as f:
        pub = f.read().strip()
    with open(userdata, "w") as f:
        f.write(f"#cloud-config\nusers:\n  - name: {USER}\n    shell: /bin/bash\n"
                f"    ssh_authorized_keys: ['{pub}']\n")
    times, t0 = [], time.monotonic()
    for n in names:
        d = os.path.join(DIR, n + ".qcow2")
        run(["cp", "--sparse=always", disk, d])
        os.chmod(d, 0o644)  # the template's image is read-only (locked); its copy is not
        # virt-install writes its cloud-init ISO under /var/lib/libvirt/boot, a path
        # that is hvnet's own inside the daemon's mount namespace: run it there.
        with open(os.path.join(HVNET_DIR, "run/libvirtd.pid")) as f:
            mnt = f"/proc/{f.read().strip()}/ns/mnt"
        run(["nsenter", f"--mount={mnt}", "--",
             "virt-install", "--connect", URI, "--name", n, "--import",
             "--disk", f"path={d},bus=virtio", "--memory", "1024", "--vcpus", "1",
             "--virt-type", "qemu", "--network", "network=tplnet",
             "--boot", f"kernel={kernel},initrd={initrd},"
                       "kernel_args=root=/dev/vda1 ro console=ttyS0 net.ifnames=0",
             "--osinfo", "debian11", "--cloud-init", f"user-data={userdata}",
             "--graphics", "none", "--noautoconsole", "--noreboot"])
        if not virsh("domstate", n).startswith("running"):
            virsh("start", n)
        wait_login(n, USER, key)
        times.append(time.monotonic() - t0)
    return times


def main():
    for b in ["virt-clone", "virt-customize", "virt-install", "ssh"]:
        if not shutil.which(b):
            sys.exit(f"bench-ready: {b} is missing (make bench installs virtinst)")
    if not os.path.exists(os.path.join(HVNET_DIR, "run/libvirt/libvirt-sock")):
        sys.exit("bench-ready: hvnet is not running (make hvnet)")
    cleanup()
    os.makedirs(DIR)
    say("the template: the Debian 12 test guest, generalized and locked by tpl")
    disk, kernel, initrd = template()
    key = os.path.join(DIR, "id_bench")
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key])
    res = {}
    for n in (1, 4):
        names = [f"tplbench-ready-t{n}-{i}" for i in range(n)]
        say(f"tpl: {n} clone(s) ready and logged in to")
        res[("tpl", n)] = tpl_way(names, key)
        say(f"tpl: {n} clone(s): {res[('tpl', n)]:.1f} s")
        for c in names:
            virsh("destroy", c, check=False)
    names = [f"tplbench-ready-a{i}" for i in range(4)]
    say("peer A: virt-clone + virt-customize --ssh-inject + start + lease + ssh, x4")
    a = peer_a(names, key)
    res[("peer A", 1)], res[("peer A", 4)] = a[0], a[-1]
    say(f"peer A: {' '.join(f'{t:.1f}' for t in a)} s (cumulated)")
    for c in names:
        virsh("destroy", c, check=False)
    names = [f"tplbench-ready-b{i}" for i in range(4)]
    say("peer B: a copy + virt-install --import --cloud-init + lease + ssh, x4")
    b = peer_b(names, key, os.path.join(DIR, f"{TPL}.qcow2"), kernel, initrd)
    res[("peer B", 1)], res[("peer B", 4)] = b[0], b[-1]
    print("\nTime from the command to a successful ssh login with the user's key (s, TCG)")
    print(f"{'':>8} {'1 clone':>10} {'4 clones':>10}")
    for w in ("tpl", "peer A", "peer B"):
        print(f"{w:>8} {res[(w, 1)]:>10.1f} {res[(w, 4)]:>10.1f}")
    for w in ("peer A", "peer B"):
        for n in (1, 4):
            r = res[("tpl", n)] / res[(w, n)]
            target = " (target <= 0.5)" if n == 4 else ""
            print(f"tpl / {w}, {n} clone(s): {r:.2f}{target}")
    cleanup()


if __name__ == "__main__":
    main()
