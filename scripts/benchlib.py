"""What make bench's two scripts (bench.py, on files; bench_rbd.py, on Ceph RBD) share:
running helper commands and virsh, timing a measured command with its peak RSS, removing
the domains a run defined, and the medians of the table. Not a benchmark itself."""

import os
import statistics
import subprocess
import tempfile
import time

URI = os.environ.get("URI", "qemu:///system")


def run(argv, **kw):
    """Run a helper command (not measured); fail loudly with its stderr."""
    p = subprocess.run(argv, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {p.returncode}: {p.stderr.strip()}")
    return p.stdout


def virsh(*args, check=True):
    p = subprocess.run(["virsh", "-q", "-c", URI, *args], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"virsh {' '.join(args)}: {p.stderr.strip()}")
    return p.stdout


def timed(argv, env=None, ok=(0,)):
    """Run argv, then sync; (seconds incl. the sync, seconds of the command, peak RSS KiB).
    An exit status not in `ok` is a failure."""
    # Peak RSS through /usr/bin/time: a child forked from this Python process would
    # count Python's own resident pages (about 17 MiB) as its peak.
    with tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile("r") as rss:
        t0 = time.monotonic()
        p = subprocess.Popen(["/usr/bin/time", "-f", "%M", "-o", rss.name, *argv],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=err, env=env)
        p.wait()
        t1 = time.monotonic()
        os.sync()
        t2 = time.monotonic()
        if p.returncode not in ok:
            err.seek(0)
            raise RuntimeError(f"{' '.join(argv)}: exit {p.returncode}: "
                               f"{err.read().decode(errors='replace').strip()}")
        peak = int(rss.read().split()[-1])
    return t2 - t0, t1 - t0, peak


def undefine(names, flags=""):
    """Undefine the domains (`flags` for virsh undefine, e.g. "--nvram"), with one virsh
    for many of them: `virsh 'undefine a; undefine b'`."""
    for i in range(0, len(names), 50):
        cmds = "; ".join(f"undefine {flags} {n}".replace("  ", " ")
                         for n in names[i:i + 50])
        if cmds:
            subprocess.run(["virsh", "-q", "-c", URI, cmds], capture_output=True)


def on_signal(sig, _frame):
    raise KeyboardInterrupt(f"signal {sig}")


def med(rows, k):
    return statistics.median(r[k] for r in rows)
