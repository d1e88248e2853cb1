//! Whether the hypervisor behind a libvirt connection sees, at a directory, the same files as this process: decided by files, never by the address.
//!
//! Every file a tool changes or reads for a domain goes through this check first
//! ([`crate::session::Session::require_same_files`]), so that `-c qemu+ssh://hv2/system`
//! never chmods, copies or renames this machine's file of the same path. Decided by
//! files, never by the address:
//! `qemu+tcp://127.0.0.2/system` is a local address and may well be a
//! hypervisor with other files, and a remote address may share an NFS mount.
//!
//! # Algorithm (one call, about 6 round trips, no refresh of any existing pool)
//!
//! 1. Sweep leftovers of killed probes: marker directories
//!    `DIR/.tpl-locality-<epoch>-<host>-<pid>-<hex32>` here, transient pools
//!    `tpl-locality-<epoch>-<host>-<pid>-<hex32>` on the hypervisor: at once when
//!    `<host>` is this host and `<pid>` no longer runs (directories), else once older
//!    than [`STALE_AFTER`] (another host's probe, or a pid in use again). Before it makes
//!    its directory, a probe notes it and its connection in
//!    `$TPL_STATE_DIR/probes/<token>`, so that the next run of any tool sharing that
//!    state directory finds what a probe killed anywhere left ([`sweep_dead`]),
//!    whichever directory it probes itself.
//! 2. Here: create a fresh, uniquely named directory `DIR/.tpl-locality-TOKEN`
//!    (mode 0755) holding a file `tpl-locality-marker` of random length.
//! 3. There: create a *transient* `dir` storage pool whose target is that new
//!    directory. Its start refreshes only that directory (one file), so the
//!    cost does not grow with the number of images in DIR, no pool of the
//!    user's is refreshed or touched, and libvirt's "one pool per target path"
//!    rule cannot get in the way (the target is brand new).
//!    * it fails with "No such file or directory"/"Not a directory" for our
//!      directory: the hypervisor does not see what this process just wrote
//!      => [`Locality::Different`];
//!    * any other failure (read-only connection, access denied, no storage
//!      driver, ...) => [`Error::Undecided`].
//! 4. The pool must list `tpl-locality-marker` as a file of exactly the size
//!    written here; otherwise (e.g. the `test:///` driver's pools, which list
//!    nothing) => [`Error::Undecided`].
//! 5. The other way round: the hypervisor creates a raw volume
//!    `tpl-locality-reply` of a random size in the pool; this process must
//!    find that file, of that size, in its own `DIR/.tpl-locality-TOKEN`
//!    => [`Locality::Same`]. Absent => [`Locality::Different`] (a one-way
//!    view, e.g. a replica of this directory); unreadable => undecided.
//! 6. Always (also on error or panic): destroy the transient pool, remove the
//!    two files and the directory.
//!
//! Only [`Locality::Same`] allows this process to act on files for the
//! hypervisor; callers must treat `Different` and every `Err` alike: refuse.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use virt::connect::Connect;
use virt::error::ErrorNumber;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;

use crate::host::{host_tag, pid_exists};

/// Prefix of the transient pools; the marker directory is `"." + PREFIX + token`.
pub const PREFIX: &str = "tpl-locality-";
/// The file this process writes for the hypervisor to find.
pub const MARKER: &str = "tpl-locality-marker";
/// The volume the hypervisor writes for this process to find.
pub const REPLY: &str = "tpl-locality-reply";
/// Leftovers (of a killed probe) older than this are removed by the next probe.
pub const STALE_AFTER: Duration = Duration::from_secs(600);

/// What the probe proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Locality {
    /// Each side saw, at once and with the right size, a file the other had
    /// just written in `dir`.
    Same,
    /// Proven not the same directory; the reason says how.
    Different(String),
}

impl Locality {
    pub fn is_same(&self) -> bool {
        matches!(self, Locality::Same)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// This process cannot probe `path`: not an absolute UTF-8 path, not a
    /// directory here, or not writable here.
    #[error("{}: {what}", path.display())]
    Local {
        path: PathBuf,
        what: String,
        #[source]
        source: Option<io::Error>,
    },
    /// The hypervisor could not run the check (read-only connection, access
    /// denied, no storage driver, a driver that does not look at files, ...).
    /// It is not known whether the files are the same: act as if they are not.
    #[error("cannot tell whether the hypervisor sees {} as this machine does: {why}", path.display())]
    Undecided { path: PathBuf, why: String },
    /// This process may not write in `path` (read-only mount, immutable directory, no
    /// permission), so it cannot leave the marker the proof needs. Nothing was asked of
    /// the hypervisor.
    #[error("{}: this process cannot write the short-lived marker the check needs there: {source}", path.display())]
    Unwritable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// `Ok(true)` only when it is proven that the hypervisor behind `conn` sees,
/// at `dir`, the directory this process sees. `Ok(false)`: proven not.
/// `Err`: cannot tell; callers must then act as for `Ok(false)`.
pub fn same_files(conn: &Connect, dir: &Path) -> Result<bool, Error> {
    probe(conn, dir).map(|l| l.is_same())
}

/// As [`same_files`], with the reason when the directories differ.
pub fn probe(conn: &Connect, dir: &Path) -> Result<Locality, Error> {
    let local = |what: &str, source: Option<io::Error>| Error::Local {
        path: dir.to_path_buf(),
        what: what.to_string(),
        source,
    };
    let undecided = |why: String| Error::Undecided {
        path: dir.to_path_buf(),
        why,
    };
    if !dir.is_absolute() {
        return Err(local("not an absolute path", None));
    }
    if dir.as_os_str().as_bytes().contains(&0) {
        return Err(local("the path contains a NUL byte", None));
    }
    if dir.to_str().is_none() {
        return Err(local("the path is not UTF-8 (libvirt takes UTF-8)", None));
    }
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(local("not a directory here", None)),
        Err(e) => return Err(local("cannot see it here", Some(e))),
    }

    let now = epoch();
    sweep_local(dir, now);
    sweep_remote(conn, now);

    let mut rnd = [0u8; 24];
    random(&mut rnd).map_err(|e| local("cannot read /dev/urandom", Some(e)))?;
    let token = format!(
        "{now}-{}-{}-{}",
        host_tag(),
        std::process::id(),
        hex(&rnd[..16])
    );
    let pool_name = format!("{PREFIX}{token}");
    let probe_dir = dir.join(format!(".{PREFIX}{token}"));
    let probe_str = probe_dir.to_str().expect("UTF-8 checked above").to_string();

    // noted before it exists: a kill from here on leaves what the next run finds
    let noted = note_probe(&token, &probe_dir, &conn.uri().unwrap_or_default())
        .map_err(|e| local("cannot note the probe in the state directory", Some(e)))?;
    let mut guard = Guard {
        dir: None,
        pool: None,
        noted,
    };
    fs::DirBuilder::new()
        .mode(0o755)
        .create(&probe_dir)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EACCES | libc::EPERM | libc::EROFS) => Error::Unwritable {
                path: dir.to_path_buf(),
                source: e,
            },
            _ => local("cannot create the probe directory here", Some(e)),
        })?;
    // from here on, whatever happens, the probe's traces go
    guard.dir = Some(probe_dir.clone());
    // readable by the hypervisor's user even through root-squashing NFS
    fs::set_permissions(&probe_dir, fs::Permissions::from_mode(0o755))
        .map_err(|e| local("cannot chmod the probe directory", Some(e)))?;
    let marker_len = 512 + u64::from(u16::from_le_bytes([rnd[16], rnd[17]]) % 3584);
    write_marker(&probe_dir.join(MARKER), &token, marker_len)
        .map_err(|e| local("cannot write the probe marker here", Some(e)))?;

    // --- step 3: the hypervisor opens the new directory
    let xml = format!(
        "<pool type='dir'><name>{}</name><target><path>{}</path></target></pool>",
        xml_escape(&pool_name),
        xml_escape(&probe_str)
    );
    let pool = match conn.create_storage_pool_xml(&xml, 0) {
        Ok(p) => guard.pool.insert(p),
        Err(e) => {
            return match classify_create_error(&e, &token) {
                Some(why) => Ok(Locality::Different(why)),
                None => Err(undecided(format!(
                    "it could not open a directory this process made there: {}",
                    e.message()
                ))),
            }
        }
    };

    // --- step 4: it must list our marker, with our size
    let seen = pool
        .lookup_storage_vol_by_name(MARKER)
        .and_then(|v| v.info())
        .map_err(|e| {
            undecided(format!(
                "it opened {probe_str} but does not list {MARKER} in it ({})",
                e.message()
            ))
        })?;
    if seen.kind != virt::sys::VIR_STORAGE_VOL_FILE || seen.capacity != marker_len {
        return Err(undecided(format!(
            "it sees {probe_str}/{MARKER} as {} bytes (type {}), this process wrote {marker_len} bytes",
            seen.capacity, seen.kind
        )));
    }

    // --- step 5: and we must see what it writes
    let reply_len = 512 * (1 + u64::from(u16::from_le_bytes([rnd[18], rnd[19]]) % 1024));
    let vxml = format!(
        "<volume><name>{REPLY}</name><capacity unit='bytes'>{reply_len}</capacity>\
         <allocation unit='bytes'>0</allocation><target><format type='raw'/></target></volume>"
    );
    let reply = StorageVol::create_xml(pool, &vxml, 0).map_err(|e| {
        undecided(format!(
            "it sees this process's marker but cannot create a file next to it ({})",
            e.message()
        ))
    })?;
    match fs::symlink_metadata(probe_dir.join(REPLY)) {
        Ok(m) if m.is_file() && m.len() == reply_len => Ok(Locality::Same),
        Ok(m) => Err(undecided(format!(
            "it wrote {REPLY} of {reply_len} bytes, this process sees {} bytes",
            m.len()
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // a one-way view: remove its file where it is
            let _ = reply.delete(0);
            Ok(Locality::Different(format!(
                "the hypervisor sees this process's files in {} but what it writes there does not appear here (a copy or replica, not the same directory)",
                dir.display()
            )))
        }
        Err(e) => Err(undecided(format!(
            "it wrote {probe_str}/{REPLY}, which this process cannot stat: {e}"
        ))),
    }
}

/// A failed pool creation that proves the hypervisor does not see our fresh
/// directory: libvirt's system error for exactly that path, ENOENT or ENOTDIR.
/// Matched on the C-locale strerror text: a daemon in another locale makes
/// this return None (undecided), which is still a refusal, never "same".
fn classify_create_error(e: &virt::error::Error, token: &str) -> Option<String> {
    if !e.code().is(ErrorNumber::SystemError) {
        return None;
    }
    let m = e.message();
    let gone = m.ends_with(": No such file or directory") || m.ends_with(": Not a directory");
    if gone && m.contains(token) {
        Some(format!(
            "the hypervisor does not see the directory this process just made there ({m})"
        ))
    } else {
        None
    }
}

/// Destroys the transient pool and removes what this probe wrote, its note last, however
/// the probe ends.
struct Guard {
    dir: Option<PathBuf>,
    pool: Option<StoragePool>,
    noted: PathBuf,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(p) = self.pool.take() {
            let _ = p.destroy();
        }
        if let Some(d) = &self.dir {
            remove_probe_dir(d);
        }
        let _ = fs::remove_file(&self.noted);
    }
}

/// Where probes in flight are noted: `$TPL_STATE_DIR/probes/`, one file a probe, named
/// by its token and holding its directory's path and its connection's URI, a line each.
fn probes_dir() -> PathBuf {
    crate::state::state_dir().join("probes")
}

fn note_probe(token: &str, probe_dir: &Path, uri: &str) -> io::Result<PathBuf> {
    let dir = probes_dir();
    crate::state::create_private_dir(&dir)?;
    let note = dir.join(token);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&note)?;
    let mut text = probe_dir.as_os_str().as_bytes().to_vec();
    text.push(b'\n');
    text.extend_from_slice(uri.as_bytes());
    f.write_all(&text)?;
    Ok(note)
}

/// Remove what killed probes of this host left, from their notes in the state directory:
/// their directories, wherever they were, and their transient pools when they were made
/// on `conn` (a note of another connection waits for a run there, or for
/// [`STALE_AFTER`]). What was removed, for the caller to say. A note acts only on a
/// directory of the probes' own shape whose name carries the note's token, on the two
/// files a probe writes there, and on the pool of that token: the notes are no list of
/// files to delete. What was noted in another state directory (a user of its own, a
/// test of its own) is that one's to remove.
pub fn sweep_dead(conn: &Connect) -> Vec<String> {
    let now = epoch();
    let uri = conn.uri().unwrap_or_default();
    let mut removed = Vec::new();
    for e in fs::read_dir(probes_dir()).into_iter().flatten().flatten() {
        let name = e.file_name();
        let Some(token) = name.to_str().filter(|t| dead_or_stale(t, now)) else {
            continue;
        };
        if crate::state::untrusted(&e.path()).is_some() {
            continue;
        }
        let text = fs::read(e.path()).unwrap_or_default();
        let mut lines = text.split(|&b| b == b'\n');
        let dir = PathBuf::from(std::ffi::OsStr::from_bytes(
            lines.next().unwrap_or_default(),
        ));
        let note_uri = String::from_utf8_lossy(lines.next().unwrap_or_default()).into_owned();
        let ours = dir
            .file_name()
            .is_some_and(|f| f.as_bytes() == format!(".{PREFIX}{token}").as_bytes());
        if ours && dir.is_absolute() && dir.is_dir() {
            remove_probe_dir(&dir);
            removed.push(format!("the locality probe directory {}", dir.display()));
        }
        if note_uri == uri {
            let pool = format!("{PREFIX}{token}");
            if let Ok(p) = conn.lookup_storage_pool_by_name(&pool) {
                if !p.is_persistent().unwrap_or(true) && p.destroy().is_ok() {
                    removed.push(format!(
                        "the transient storage pool {pool} of a locality probe"
                    ));
                }
            }
        } else if !stale(token, now) {
            continue; // its pool is on another connection: a run there removes it
        }
        let _ = fs::remove_file(e.path());
    }
    removed
}

/// Removes a probe directory and the two files a probe puts there, nothing else.
fn remove_probe_dir(dir: &Path) {
    let _ = fs::remove_file(dir.join(MARKER));
    let _ = fs::remove_file(dir.join(REPLY));
    let _ = fs::remove_dir(dir);
}

/// A probe token's epoch, host and pid (`<epoch>-<host>-<pid>-<32 hex>`; an older
/// release's have no host). None for anything that is not a token.
fn parse_token(token: &str) -> Option<(u64, &str, u32)> {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let (t, rest) = token.split_once('-')?;
    let (rest, h) = rest.rsplit_once('-')?;
    if !digits(t) || h.len() != 32 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let (host, pid) = rest.rsplit_once('-').unwrap_or(("", rest));
    if !digits(pid) || host.contains('/') {
        return None;
    }
    Some((t.parse().ok()?, host, pid.parse().ok()?))
}

/// Whether a probe token is older than [`STALE_AFTER`]: whoever made it, it is over.
fn stale(token: &str, now: u64) -> bool {
    parse_token(token).is_some_and(|(t, _, _)| now.saturating_sub(t) > STALE_AFTER.as_secs())
}

/// Whether a probe token is a killed probe's: this host's and its pid no longer runs, or
/// [`stale`] (another host's, an older release's, or a pid in use again).
fn dead_or_stale(token: &str, now: u64) -> bool {
    let dead = parse_token(token).is_some_and(|(_, host, pid)| {
        host == host_tag() && pid != std::process::id() && !pid_exists(pid)
    });
    dead || stale(token, now)
}

fn sweep_local(dir: &Path, now: u64) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    let dot_prefix = format!(".{PREFIX}");
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(token) = name.to_str().and_then(|n| n.strip_prefix(&dot_prefix)) else {
            continue;
        };
        // a real directory (file_type does not follow symlinks), and ours
        if e.file_type().is_ok_and(|t| t.is_dir()) && dead_or_stale(token, now) {
            remove_probe_dir(&e.path());
        }
    }
}

/// Destroy the transient probe pools on `conn` older than [`STALE_AFTER`]: a killed
/// probe's whose note is gone or in another state directory (another host's, another
/// user's). A younger one may be a live probe's, or a dead one's that its own notes
/// account for ([`sweep_dead`]).
fn sweep_remote(conn: &Connect, now: u64) {
    let flags = virt::sys::VIR_CONNECT_LIST_STORAGE_POOLS_TRANSIENT;
    let Ok(pools) = conn.list_all_storage_pools(flags) else {
        return;
    };
    for p in pools {
        let stale = p
            .name()
            .is_ok_and(|n| n.strip_prefix(PREFIX).is_some_and(|t| stale(t, now)));
        if stale {
            let _ = p.destroy();
        }
    }
}

fn write_marker(path: &Path, token: &str, len: u64) -> io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)?;
    f.set_permissions(fs::Permissions::from_mode(0o644))?;
    // text, so no image format is probed; the size is what is compared
    let mut body = format!("tpl-locality probe {token}\n").into_bytes();
    body.resize(len as usize, b'.');
    body[len as usize - 1] = b'\n';
    f.write_all(&body)?;
    f.flush()
}

fn epoch() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn random(buf: &mut [u8]) -> io::Result<()> {
    fs::File::open("/dev/urandom")?.read_exact(buf)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn xml_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '\'' => o.push_str("&apos;"),
            '"' => o.push_str("&quot;"),
            c => o.push(c),
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_or_stale_tokens() {
        let h = "0123456789abcdef0123456789abcdef";
        let other = "another-host.example";
        // another host's, or an older release's without a host: by age only
        for host in [format!("{other}-"), String::new()] {
            assert!(dead_or_stale(&format!("1000-{host}42-{h}"), 1000 + 601));
            assert!(!dead_or_stale(&format!("1000-{host}42-{h}"), 1000 + 600));
            assert!(!dead_or_stale(&format!("1000-{host}42-{h}"), 999)); // clock went back
        }
        // this host's: at once when its pid no longer runs, never while it does
        let dead = {
            let mut c = std::process::Command::new("true").spawn().unwrap();
            let pid = c.id();
            c.wait().unwrap();
            pid
        };
        let me = std::process::id();
        assert!(dead_or_stale(
            &format!("1000-{}-{dead}-{h}", host_tag()),
            1000
        ));
        assert!(!dead_or_stale(
            &format!("1000-{}-{me}-{h}", host_tag()),
            1000
        ));
        assert!(!dead_or_stale(&format!("1000-{other}-{dead}-{h}"), 1000));
        // not tokens
        assert!(!dead_or_stale("1000-42-short", 99_999));
        assert!(!dead_or_stale(&format!("1000-42-{h}-x"), 99_999));
        assert!(!dead_or_stale(&format!("10a0-42-{h}"), 99_999));
        assert!(!dead_or_stale(&format!("-42-{h}"), 99_999));
        assert!(!dead_or_stale(&format!("1000-a/b-{dead}-{h}"), 99_999));
        assert!(!dead_or_stale("foo", 99_999));
    }

    #[test]
    fn escapes_xml() {
        assert_eq!(
            xml_escape("/a&b/<c>/'d\"/é"),
            "/a&amp;b/&lt;c&gt;/&apos;d&quot;/é"
        );
    }

    #[test]
    fn marker_has_the_asked_length() {
        let d = std::env::temp_dir().join(format!("tpl-locality-unit-{}", std::process::id()));
        fs::create_dir_all(&d).unwrap();
        let p = d.join(MARKER);
        let _ = fs::remove_file(&p);
        write_marker(&p, "1-2-x", 777).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().len(), 777);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn relative_and_missing_paths_are_local_errors() {
        // no connection needed: these fail before any call to libvirt
        let c = Connect::open(Some("test:///default")).unwrap();
        assert!(matches!(
            probe(&c, Path::new("relative/dir")),
            Err(Error::Local { .. })
        ));
        assert!(matches!(
            probe(&c, Path::new("/nonexistent/tpl-locality-unit")),
            Err(Error::Local { .. })
        ));
        assert!(matches!(
            probe(&c, Path::new("/etc/hostname")),
            Err(Error::Local { .. })
        ));
    }
}
