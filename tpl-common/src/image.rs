//! Disk images: the backing file named in a qcow2 header, backing chains, and the images that depend on a template's.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};
use crate::record::BackingImage;

const QCOW2_MAGIC: u32 = 0x5146_49fb;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_END: u32 = 0;
/// qemu refuses backing file names longer than this; so do we.
const MAX_BACKING_NAME: usize = 1023;
/// Header extensions sit in the first cluster; 64 KiB is qcow2's default cluster and plenty.
const MAX_EXT_AREA: u64 = 64 * 1024;
/// Longer chains than this are refused by qemu too (and catch loops).
const MAX_CHAIN: usize = 64;

/// What a qcow2 header says about the image below it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Backing {
    /// The backing file name exactly as stored (may be relative to the image's directory).
    pub name: String,
    /// The backing format from the header extension; `None` means qemu would probe it.
    pub format: Option<String>,
}

/// Open an image to read its header. The path may come from a header a guest could have
/// written, so a FIFO must not block the open and nothing but a file or block device is read.
fn open_image(path: &Path) -> io::Result<Option<File>> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let t = f.metadata()?.file_type();
    Ok((t.is_file() || t.is_block_device()).then_some(f))
}

/// Whether the file starts with the qcow2 magic.
pub fn is_qcow2(path: &Path) -> Result<bool> {
    let Some(mut f) = open_image(path).ctx("cannot open image", path)? else {
        return Ok(false);
    };
    let mut magic = [0u8; 4];
    match f.read_exact(&mut magic) {
        Ok(()) => Ok(u32::from_be_bytes(magic) == QCOW2_MAGIC),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e).ctx("cannot read image", path),
    }
}

/// The size the guest sees: a qcow2's from its header, any other file's length (raw).
pub fn virtual_size(path: &Path) -> Result<u64> {
    let f = File::open(path).ctx("cannot open image", path)?;
    let mut hdr = [0u8; 32];
    let n = read_up_to(&f, &mut hdr, 0).ctx("cannot read image", path)?;
    if n == 32 && be32(&hdr, 0) == QCOW2_MAGIC {
        return Ok(be64(&hdr, 24));
    }
    Ok(f.metadata().ctx("cannot stat", path)?.len())
}

/// Read the backing file of a qcow2 image from its header; `Ok(None)` for a qcow2 without
/// one and for any file that is not qcow2.
pub fn qcow2_backing(path: &Path) -> Result<Option<Qcow2Backing>> {
    let Some(f) = open_image(path).ctx("cannot open image", path)? else {
        return Ok(None);
    };
    read_backing(&f).ctx("cannot read the qcow2 header of", path)
}

fn read_backing(f: &File) -> io::Result<Option<Qcow2Backing>> {
    let mut hdr = [0u8; 104];
    let n = read_up_to(f, &mut hdr, 0)?;
    if n < 72 || be32(&hdr, 0) != QCOW2_MAGIC {
        return Ok(None);
    }
    let version = be32(&hdr, 4);
    let backing_offset = be64(&hdr, 8);
    let backing_size = be32(&hdr, 16) as usize;
    if backing_offset == 0 || backing_size == 0 {
        return Ok(None);
    }
    if backing_size > MAX_BACKING_NAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "backing file name too long",
        ));
    }
    let mut name = vec![0u8; backing_size];
    f.read_exact_at(&mut name, backing_offset)?;
    let name = String::from_utf8(name).map_err(|_| {
        io::Error::new(io::ErrorKind::InvalidData, "backing file name is not UTF-8")
    })?;

    // Header extensions follow the header: 72 bytes in v2, header_length in v3.
    let mut off = if version >= 3 && n >= 104 {
        u64::from(be32(&hdr, 100))
    } else {
        72
    };
    let end = backing_offset.min(MAX_EXT_AREA);
    let mut format = None;
    while off + 8 <= end {
        let mut eh = [0u8; 8];
        f.read_exact_at(&mut eh, off)?;
        let (ty, len) = (be32(&eh, 0), u64::from(be32(&eh, 4)));
        if ty == EXT_END {
            break;
        }
        if ty == EXT_BACKING_FORMAT && len <= 64 {
            let mut v = vec![0u8; len as usize];
            f.read_exact_at(&mut v, off + 8)?;
            format = Some(String::from_utf8_lossy(&v).into_owned());
        }
        off += 8 + len.div_ceil(8) * 8;
    }
    Ok(Some(Qcow2Backing { name, format }))
}

fn read_up_to(f: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], off + n as u64)? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// Where a backing file name stored in `image` points: relative names are relative to
/// the image's directory, as qemu resolves them.
pub fn resolve_backing(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        image.parent().unwrap_or(Path::new(".")).join(p)
    }
}

/// The images below `path`, nearest first. Stops at a non-qcow2 image, and below a link
/// its overlay names with a format other than qcow2 (a raw image's first bytes are the
/// guest's, and qemu does not read them as a header either).
pub fn backing_chain(path: &Path) -> Result<Vec<BackingImage>> {
    match readable_chain(path) {
        (chain, None) => Ok(chain),
        (_, Some(e)) => Err(e),
    }
}

/// As much of the backing chain of `path` as can be read, and the error that cut it short.
/// Callers that must not miss a dependent treat that error as "cannot tell".
pub fn readable_chain(path: &Path) -> (Vec<BackingImage>, Option<crate::Error>) {
    let mut chain: Vec<BackingImage> = Vec::new();
    let mut cur = path.to_path_buf();
    loop {
        let b = match qcow2_backing(&cur) {
            Ok(Some(b)) => b,
            Ok(None) => return (chain, None),
            Err(e) => return (chain, Some(e)),
        };
        let next = resolve_backing(&cur, &b.name);
        let follow = b.format.as_deref().is_none_or(|f| f == "qcow2");
        chain.push(BackingImage {
            path: next.clone(),
            format: b.format,
        });
        if chain.len() > MAX_CHAIN {
            let e = crate::Error::failed(
                format!("backing chain of '{}' is too long", path.display()),
                "more than 64 images, or a loop",
            );
            return (chain, Some(e));
        }
        if !follow {
            return (chain, None);
        }
        cur = next;
    }
}

/// Whether an error reading an image means the file is not there (nothing to depend on).
pub fn is_not_found(e: &crate::Error) -> bool {
    matches!(e, crate::Error::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
}

/// The canonical form of a path for comparisons: symlinks and `..` resolved where the file exists.
pub fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Something that would break if one of a template's images changed or moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dependent {
    /// A defined domain whose disk is, or backs onto, the image.
    Domain {
        name: String,
        target: String,
        path: PathBuf,
    },
    /// A qcow2 file on disk whose backing file is the image, whether or not a domain uses it.
    Overlay { path: PathBuf, backing: PathBuf },
    /// An overlay tpl-clone registered in the template's metadata when it made a linked
    /// clone, found where it was made whether or not a domain still uses it.
    Registered { path: PathBuf, clone_name: String },
    /// A file or directory that could not be read, so whether it depends on the image is
    /// unknown; counted as a dependent, because guessing "no" could break a linked clone.
    Unchecked { path: PathBuf, reason: String },
    /// An RBD clone of a snapshot of the image (`POOL/IMAGE`), and the domain using it.
    RbdClone {
        image: String,
        domain: Option<String>,
        in_trash: bool,
    },
}

impl fmt::Display for Dependent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use crate::text::{shown, shown_path};
        match self {
            Dependent::Domain { name, target, path } => write!(
                f,
                "domain '{}' (disk {target}: {})",
                shown(name),
                shown_path(path)
            ),
            Dependent::Overlay { path, backing } => write!(
                f,
                "overlay '{}' (backing file {})",
                shown_path(path),
                shown_path(backing)
            ),
            Dependent::Registered { path, clone_name } => write!(
                f,
                "overlay '{}' of linked clone '{}' (registered by tpl-clone; no domain uses it \
                 now)",
                shown_path(path),
                shown(clone_name)
            ),
            Dependent::Unchecked { path, reason } => write!(
                f,
                "'{}', which could not be checked ({reason})",
                shown_path(path)
            ),
            Dependent::RbdClone {
                image,
                domain,
                in_trash,
            } => {
                write!(f, "RBD clone '{}'", shown(image))?;
                match domain {
                    Some(d) => write!(f, " of domain '{}'", shown(d))?,
                    None => f.write_str(" (no domain uses it)")?,
                }
                if *in_trash {
                    f.write_str(" in Ceph's trash")?;
                }
                Ok(())
            }
        }
    }
}

/// The first image in the backing chain of `path` that can be written to by its owner,
/// if any: a template whose image backs onto a writable file is not locked by locking
/// its own files. An unreadable chain is an error (it cannot be checked).
pub fn writable_backing(path: &Path) -> Result<Option<PathBuf>> {
    use std::os::unix::fs::PermissionsExt;
    for link in backing_chain(path)? {
        let m = std::fs::metadata(&link.path).ctx("cannot read the backing file", &link.path)?;
        if m.permissions().mode() & 0o222 != 0 {
            return Ok(Some(link.path));
        }
    }
    Ok(None)
}

/// The qcow2 files under `dirs` (not following symlinks) whose backing file resolves to one
/// of `images`, and what could not be read there. A file that vanished meanwhile is skipped.
pub fn overlays_in(dirs: &[PathBuf], images: &[PathBuf]) -> Vec<Dependent> {
    let images: Vec<PathBuf> = images.iter().map(|p| canonical(p)).collect();
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for dir in dirs {
        let walk = walkdir::WalkDir::new(dir)
            .follow_links(false)
            .max_depth(4)
            .same_file_system(true);
        for entry in walk {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    let gone = e.io_error().map(io::Error::kind) == Some(io::ErrorKind::NotFound);
                    if !gone {
                        out.push(Dependent::Unchecked {
                            path: e.path().unwrap_or(dir).to_path_buf(),
                            reason: e.to_string(),
                        });
                    }
                    continue;
                }
            };
            if !entry.file_type().is_file() || !seen.insert(entry.path().to_path_buf()) {
                continue;
            }
            let path = entry.path();
            match qcow2_backing(path) {
                Ok(Some(b)) => {
                    let backing = canonical(&resolve_backing(path, &b.name));
                    if images.contains(&backing) {
                        out.push(Dependent::Overlay {
                            path: path.to_path_buf(),
                            backing,
                        });
                    }
                }
                Ok(None) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => out.push(Dependent::Unchecked {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                }),
            }
        }
    }
    out
}

/// Run the real qemu-img for a unit test; panics with its stderr when it fails.
#[cfg(test)]
pub(crate) fn qemu_img(args: &[&str]) {
    let st = std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img must be installed (make deps)");
    assert!(
        st.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&st.stderr)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_backing_name_and_format_like_qemu_img() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("base.qcow2");
        let raw = d.path().join("raw.img");
        let mid = d.path().join("mid.qcow2");
        let top = d.path().join("top.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "1M"]);
        qemu_img(&["create", "-q", "-f", "raw", raw.to_str().unwrap(), "1M"]);
        overlay(&mid, "base.qcow2", "qcow2");
        overlay(&top, p(&mid), "qcow2");

        assert!(is_qcow2(&base).unwrap());
        assert!(!is_qcow2(&raw).unwrap());
        assert_eq!(qcow2_backing(&base).unwrap(), None);
        assert_eq!(qcow2_backing(&raw).unwrap(), None);
        let b = qcow2_backing(&mid).unwrap().unwrap();
        assert_eq!(
            b,
            Qcow2Backing {
                name: "base.qcow2".into(),
                format: Some("qcow2".into())
            }
        );

        let chain = backing_chain(&top).unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[0].path, mid);
        assert_eq!(chain[1].path, d.path().join("base.qcow2"));

        let found = overlays_in(&[d.path().to_path_buf()], std::slice::from_ref(&base));
        assert_eq!(
            found,
            vec![Dependent::Overlay {
                path: mid.clone(),
                backing: canonical(&base)
            }]
        );
    }

    #[test]
    fn compat_0_10_header_is_read_too() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("b.img");
        let top = d.path().join("t.qcow2");
        qemu_img(&["create", "-q", "-f", "raw", base.to_str().unwrap(), "1M"]);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "-b",
            base.to_str().unwrap(),
            "-F",
            "raw",
            top.to_str().unwrap(),
        ]);
        let b = qcow2_backing(&top).unwrap().unwrap();
        assert_eq!(b.format.as_deref(), Some("raw"));
        assert_eq!(PathBuf::from(b.name), base);
    }

    #[test]
    fn a_link_named_raw_is_not_read_as_a_header_and_a_fifo_does_not_block() {
        let d = tempfile::tempdir().unwrap();
        let (base, guest, top) = (
            d.path().join("base.qcow2"),
            d.path().join("guest.img"),
            d.path().join("top.qcow2"),
        );
        qemu_img(&["create", "-q", "-f", "qcow2", p(&base), "1M"]);
        // A "raw" disk whose guest wrote a qcow2 header naming a backing file.
        overlay(&guest, p(&base), "qcow2");
        overlay(&top, p(&guest), "raw");
        let chain = backing_chain(&top).unwrap();
        assert_eq!(chain.len(), 1, "{chain:?}");
        assert_eq!(chain[0].path, guest);

        let fifo = d.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let over = d.path().join("over.qcow2");
        overlay(&over, p(&fifo), "qcow2");
        let (chain, err) = readable_chain(&over);
        assert_eq!(chain.len(), 1);
        assert!(err.is_none(), "{err:?}");
        assert!(!is_qcow2(&fifo).unwrap());
    }

    #[test]
    fn a_missing_link_ends_the_chain_with_not_found() {
        let d = tempfile::tempdir().unwrap();
        let top = d.path().join("top.qcow2");
        let gone = d.path().join("gone.qcow2");
        overlay(&top, p(&gone), "qcow2");
        let (chain, err) = readable_chain(&top);
        assert_eq!(chain.len(), 1);
        assert!(is_not_found(&err.unwrap()));
        assert!(backing_chain(&top).is_err());
    }

    /// `over`, a qcow2 overlay naming `backing` (as written) of format `fmt`, made without
    /// opening the backing file (`-u`): it may be missing or not a file at all.
    fn overlay(over: &Path, backing: &str, fmt: &str) {
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            backing,
            "-F",
            fmt,
            p(over),
            "1M",
        ]);
    }

    fn p(path: &Path) -> &str {
        path.to_str().unwrap()
    }
}
