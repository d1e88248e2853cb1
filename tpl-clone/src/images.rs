//! The clone's own image files: qcow2 overlays for linked clones, and for full clones a reflink, a sparse in-kernel copy, or a flattening `qemu-img convert`.
//!
//! Every function here writes to a temporary path the caller chose (never a final name)
//! and syncs it before returning; the caller renames it into place.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};
use tpl_common::child;
use tpl_common::error::{Error, IoContext, Result};
use tpl_common::fsutil::reflink;
use tpl_common::signals::Interrupt;
use tpl_common::text::shown_path;

/// What to do when qemu-img cannot be run at all.
const QEMU_IMG_HINT: &str = "is qemu-utils installed? try 'make deps'";

/// Options of the linked clones' overlays. qcow2 subclusters (extended L2 entries) let
/// a 4 KiB guest write allocate 4 KiB instead of copying a whole 64 KiB cluster from the
/// template: measured here with `qemu-img bench -w -t none -c 20000 -s 4k -S 64k`
/// (qemu 7.2, ext4), 8.7 s with the defaults against 2.3 s with these (the template image
/// itself: 1.2 s).
pub const OVERLAY_OPTIONS: &str = "extended_l2=on,cluster_size=128k";

/// Data is copied in pieces this large so progress and signals are seen in between,
/// and memory does not grow with the image.
const CHUNK: u64 = 64 << 20;

/// How a full clone's image was made, for the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Reflink,
    SparseCopy,
    Flatten,
}

impl Method {
    pub fn describe(self) -> &'static str {
        match self {
            Method::Reflink => "reflinked (shares extents until written)",
            Method::SparseCopy => "copied (sparse, in-kernel)",
            Method::Flatten => "flattened with qemu-img convert",
        }
    }
}

/// The overlays made in this run, per backing file and format. qemu-img writes the same
/// bytes for the same backing file, format and options (nothing in a new overlay is random
/// or dated), so after the first one each further clone's overlay is written from these
/// few KiB instead of running qemu-img again: that was most of a linked clone's time
/// (make bench, 100 linked clones in one call).
#[derive(Debug, Default)]
pub struct Overlays(RefCell<HashMap<OverlayKey, Option<Rc<Overlay>>>>);

/// The backing file, its format, and the overlay's size when it is not the backing file's.
type OverlayKey = (PathBuf, String, Option<u64>);

/// A new overlay as its non-zero blocks (three of them: header, refcounts, L1 table).
#[derive(Debug)]
struct Overlay {
    len: u64,
    blocks: Vec<(u64, Vec<u8>)>,
}

impl Overlay {
    /// Read a fresh overlay; None when it holds more than a new overlay would.
    fn read(path: &Path) -> Result<Option<Overlay>> {
        const BLOCK: usize = 4096;
        let f = File::open(path).ctx("cannot open", path)?;
        let len = f.metadata().ctx("cannot read the size of", path)?.len();
        let mut blocks = Vec::new();
        let mut buf = vec![0u8; BLOCK];
        for_each_extent(&f, path, len, |start, end| {
            let mut pos = start - start % BLOCK as u64;
            while pos < end {
                let n = f.read_at(&mut buf, pos).ctx("cannot read", path)?;
                if n == 0 {
                    break;
                }
                if buf[..n].iter().any(|&b| b != 0) {
                    blocks.push((pos, buf[..n].to_vec()));
                }
                pos += n as u64;
            }
            Ok(())
        })?;
        Ok((blocks.len() <= 64).then_some(Overlay { len, blocks }))
    }

    fn write(&self, tmp: &Path) -> Result<()> {
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(tmp)
            .ctx("cannot create", tmp)?;
        for (off, b) in &self.blocks {
            f.write_all_at(b, *off).ctx("cannot write", tmp)?;
        }
        f.set_len(self.len).ctx("cannot size", tmp)?;
        f.sync_all().ctx("cannot sync", tmp)
    }
}

/// Create a qcow2 overlay at `tmp` on top of `backing` (an absolute path) whose backing
/// format is written into the header, so qemu never probes it.
pub fn create_overlay(
    backing: &Path,
    backing_fmt: &str,
    tmp: &Path,
    size: Option<u64>,
    made: &Overlays,
    intr: &Interrupt,
) -> Result<()> {
    let key = (backing.to_path_buf(), backing_fmt.to_string(), size);
    let known = made.0.borrow().get(&key).cloned().flatten();
    if let Some(o) = known {
        return o.write(tmp);
    }
    let mut cmd = Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2", "-b"])
        .arg(backing)
        .args(["-F", backing_fmt, "-o", OVERLAY_OPTIONS])
        .arg(tmp)
        .args(size.map(|s| s.to_string()))
        .stdout(Stdio::null());
    child::run_quiet(
        &mut cmd,
        &format!(
            "create the overlay '{}' on '{}'",
            shown_path(tmp),
            shown_path(backing)
        ),
        QEMU_IMG_HINT,
        intr,
    )?;
    sync_file(tmp)?;
    let o = Overlay::read(tmp)?;
    made.0.borrow_mut().insert(key, o.map(Rc::new));
    Ok(())
}

/// Grow the image at `tmp` (format `fmt`) to `size` bytes; the guest's file system grows
/// into it at its first boot.
pub fn grow(tmp: &Path, fmt: &str, size: u64, intr: &Interrupt) -> Result<()> {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["resize", "-q", "-f", fmt])
        .arg(tmp)
        .arg(size.to_string())
        .stdout(Stdio::null());
    child::run_quiet(
        &mut cmd,
        &format!("grow '{}' to {}", shown_path(tmp), human(size)),
        QEMU_IMG_HINT,
        intr,
    )?;
    sync_file(tmp)
}

/// Write the image behind `src` (a chain) into one standalone image of format `fmt` at `tmp`.
pub fn flatten(
    src: &Path,
    fmt: &str,
    tmp: &Path,
    progress: bool,
    intr: &Interrupt,
) -> Result<Method> {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["convert", "-f", fmt, "-O", fmt]);
    if progress {
        // qemu-img prints its progress on stdout; ours goes to stderr.
        cmd.arg("-p");
        match io::stderr().as_fd().try_clone_to_owned() {
            Ok(fd) => cmd.stdout(Stdio::from(fd)),
            Err(_) => cmd.stdout(Stdio::null()),
        };
    } else {
        cmd.stdout(Stdio::null());
    }
    cmd.arg(src).arg(tmp);
    child::run_quiet(
        &mut cmd,
        &format!("flatten '{}' into '{}'", shown_path(src), shown_path(tmp)),
        QEMU_IMG_HINT,
        intr,
    )?;
    sync_file(tmp)?;
    Ok(Method::Flatten)
}

/// Copy the file `src` (no backing chain) to the new file `tmp`: a reflink where the file
/// system shares extents, else an in-kernel copy of the data extents only, which keeps holes.
pub fn copy_file(
    src: &Path,
    tmp: &Path,
    progress: Option<&str>,
    intr: &Interrupt,
) -> Result<Method> {
    let from = File::open(src).ctx("cannot open", src)?;
    let to = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(tmp)
        .ctx("cannot create", tmp)?;
    intr.check()?;
    let method = if reflink(&to, &from).is_ok() {
        Method::Reflink
    } else {
        // Nothing was shared; whatever FICLONE may have left is dropped.
        to.set_len(0).ctx("cannot truncate", tmp)?;
        sparse_copy(&from, src, &to, tmp, progress, intr)?;
        Method::SparseCopy
    };
    to.sync_all().ctx("cannot sync", tmp)?;
    Ok(method)
}

/// The data extents of `f` below `len`, as SEEK_DATA/SEEK_HOLE report them, one at a time.
fn for_each_extent(
    f: &File,
    path: &Path,
    len: u64,
    mut each: impl FnMut(u64, u64) -> Result<()>,
) -> Result<()> {
    let mut off: u64 = 0;
    while off < len {
        let start = match lseek(f.as_raw_fd(), off as i64, Whence::SeekData) {
            Ok(s) => s as u64,
            Err(Errno::ENXIO) => break, // only a hole remains
            Err(e) => return Err(e).ctx("cannot find the data extents of", path),
        };
        if start >= len {
            break;
        }
        let end = lseek(f.as_raw_fd(), start as i64, Whence::SeekHole)
            .ctx("cannot find the data extents of", path)? as u64;
        let end = end.min(len);
        each(start, end)?;
        off = end;
    }
    Ok(())
}

fn sparse_copy(
    from: &File,
    src: &Path,
    to: &File,
    tmp: &Path,
    progress: Option<&str>,
    intr: &Interrupt,
) -> Result<()> {
    let len = from.metadata().ctx("cannot read the size of", src)?.len();
    // The holes stay holes: the new file gets the full length, then only data is written.
    to.set_len(len).ctx("cannot size", tmp)?;
    let mut total = 0;
    for_each_extent(from, src, len, |s, e| {
        total += e - s;
        Ok(())
    })?;
    let mut bar = Progress::new(progress, total);
    let mut in_kernel = true;
    for_each_extent(from, src, len, |start, end| {
        let mut pos = start;
        while pos < end {
            intr.check()?;
            let n = (end - pos).min(CHUNK);
            let copied = if in_kernel {
                let (mut i, mut o) = (pos as i64, pos as i64);
                match nix::fcntl::copy_file_range(from, Some(&mut i), to, Some(&mut o), n as usize)
                {
                    Ok(c) => c as u64,
                    // A signal came: the loop's check decides whether to go on.
                    Err(Errno::EINTR) => continue,
                    // Some file system pairs cannot copy in the kernel; read and write instead.
                    Err(Errno::EXDEV | Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP) => {
                        in_kernel = false;
                        continue;
                    }
                    Err(e) => {
                        return Err(e).ctx(&format!("cannot copy '{}' to", shown_path(src)), tmp)
                    }
                }
            } else {
                copy_range_rw(from, src, to, tmp, pos, n)?
            };
            if copied == 0 {
                return Err(Error::failed(
                    format!("cannot copy '{}' to '{}'", shown_path(src), shown_path(tmp)),
                    "the source became shorter while being copied; is the template in use?",
                ));
            }
            pos += copied;
            bar.add(copied);
        }
        Ok(())
    })?;
    bar.finish();
    Ok(())
}

/// The plain fallback: read and write through one 1 MiB buffer.
fn copy_range_rw(from: &File, src: &Path, to: &File, tmp: &Path, pos: u64, n: u64) -> Result<u64> {
    let mut buf = vec![0u8; (1 << 20).min(n as usize)];
    let got = from.read_at(&mut buf, pos).ctx("cannot read", src)?;
    to.write_all_at(&buf[..got], pos).ctx("cannot write", tmp)?;
    Ok(got as u64)
}

fn sync_file(p: &Path) -> Result<()> {
    File::open(p)
        .and_then(|f| f.sync_all())
        .ctx("cannot sync", p)
}

/// "N of M copied" on stderr, redrawn at most a few times a second.
struct Progress<'a> {
    label: Option<&'a str>,
    total: u64,
    done: u64,
    last: Option<Instant>,
}

impl<'a> Progress<'a> {
    fn new(label: Option<&'a str>, total: u64) -> Self {
        let label = label.filter(|_| io::stderr().is_terminal());
        Progress {
            label,
            total,
            done: 0,
            last: None,
        }
    }

    fn add(&mut self, n: u64) {
        self.done += n;
        let Some(label) = self.label else { return };
        if self
            .last
            .is_some_and(|t| t.elapsed() < Duration::from_millis(200))
        {
            return;
        }
        self.last = Some(Instant::now());
        let pct = (self.done * 100).checked_div(self.total).unwrap_or(100);
        let mut e = io::stderr().lock();
        let _ = write!(
            e,
            "\r{}: {} of {} of data copied ({pct}%)   ",
            tpl_common::text::escape(label),
            human(self.done),
            human(self.total)
        );
        let _ = e.flush();
    }

    fn finish(&mut self) {
        if self.label.is_some() && self.last.is_some() {
            self.last = None;
            self.add(0);
            // Not eprintln!: it panics when the terminal hung up (SIGHUP) meanwhile.
            tpl_common::cli::say(format_args!(""));
        }
    }
}

pub fn human(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn sparse_copy_keeps_holes_and_data() {
        let d = tempfile::tempdir().unwrap();
        let (src, dst) = (d.path().join("src"), d.path().join("dst"));
        let f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[0xab; 1 << 20], 8 << 20).unwrap();
        f.write_all_at(&[0xcd; 4096], (64 << 20) - 4096).unwrap();
        f.sync_all().unwrap();
        let intr = Interrupt::default();
        copy_file(&src, &dst, None, &intr).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        let (ms, md) = (src.metadata().unwrap(), dst.metadata().unwrap());
        assert_eq!(md.len(), ms.len());
        // Allocated about as much as the source, far below the 64 MiB length.
        assert!(md.blocks() * 512 <= ms.blocks() * 512 + (1 << 20), "{md:?}");
        // A second copy to an existing name is refused, never overwritten.
        assert!(copy_file(&src, &dst, None, &intr).is_err());
    }

    #[test]
    fn later_overlays_are_the_first_ones_bytes() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("base.raw");
        File::create(&base).unwrap().set_len(64 << 20).unwrap();
        let intr = Interrupt::default();
        let made = Overlays::default();
        let (a, b) = (d.path().join("a.qcow2"), d.path().join("b.qcow2"));
        create_overlay(&base, "raw", &a, None, &made, &intr).unwrap();
        create_overlay(&base, "raw", &b, None, &made, &intr).unwrap();
        // What qemu-img itself makes for the second one.
        let c = d.path().join("c.qcow2");
        create_overlay(&base, "raw", &c, None, &Overlays::default(), &intr).unwrap();
        let bytes = std::fs::read(&c).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), bytes);
        assert_eq!(std::fs::read(&b).unwrap(), bytes);
        let out = Command::new("qemu-img")
            .args(["check", "-q"])
            .arg(&b)
            .status()
            .unwrap();
        assert!(out.success());
        // Never over an existing file.
        assert!(create_overlay(&base, "raw", &b, None, &made, &intr).is_err());
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(3 << 30), "3.0 GiB");
    }
}
