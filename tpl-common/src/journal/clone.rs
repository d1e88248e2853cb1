//! tpl-clone's journal: what a run creates, so that whatever a run killed with -9 left is removed by the next run of any tool.
//!
//! Each run appends JSON lines to `<state>/clone-journal/tpl-clone-<pid>-<random>.journal`
//! (see [`super`]), each synced before the step it announces:
//!
//! - `clone`: a clone is started (its name, UUID and libvirt URI);
//! - `tmp`: a volume (file or RBD image, see [`crate::volume`]) is about to be made under
//!   a temporary name that carries this host's name and our pid (see [`tmp_name`]);
//! - `made`: a finished temporary volume is about to be renamed to its final name, with
//!   its identity (device and inode, image id), so the final volume is removed only if it
//!   is still that volume (a run that lost a race for a name never removes the winner's);
//! - `reserved`: a fixed address is about to be reserved for the clone's MAC in a libvirt
//!   network's DHCP (released again when the clone is not finished);
//! - `done`: the clone's domain is defined: its volumes are the domain's from now on;
//! - `undone`: a defined clone is being removed again (its start failed, say), so its
//!   volumes are the run's to remove once more.
//!
//! The journals of releases before 0.19 said `tmp`/`rbdtmp` and `file`/`rbdfile`, with
//! `path` or `image`: they read as the same two entries and are recovered the same way.
//!
//! A clone is finished when its domain is defined: that is the commit point. Cleaning a
//! dead run's journal removes the temporary and final volumes of every clone not marked
//! done whose domain (by UUID) does not exist, then the journal. The mark matters once
//! the domain is gone: a user may undefine a finished clone and keep its image, and that
//! image must not be taken for an unfinished clone's. The domain check covers a run
//! killed between the definition and the mark. A normal run removes its journal at the
//! end.
//!
//! Only the journals of the connection a tool uses are cleaned: another's clones are
//! not this connection's to judge.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{foreign_live_pids, host_tag, pid_exists, Journal, Verdict};
use crate::error::{IoContext, Result};
use crate::text::shown_path;
pub use crate::volume::RemoveImage;
use crate::volume::{Identity, Vol};

/// The journal kind, and the start of its file names.
pub const KIND: &str = "tpl-clone";

/// One line of the journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Entry {
    Clone {
        name: String,
        uuid: String,
        uri: String,
    },
    /// A volume is about to be made under this run's temporary name; an RBD image by the
    /// run's Ceph connection `client` (its global id: a watch that outlives the run on the
    /// image is proven this run's by it).
    #[serde(alias = "rbdtmp")]
    Tmp {
        uuid: String,
        #[serde(flatten)]
        vol: Vol,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client: Option<u64>,
    },
    /// A finished volume (`id`, which a same-named volume of another run does not have)
    /// is about to be renamed to its final name `vol`.
    #[serde(alias = "file", alias = "rbdfile")]
    Made {
        uuid: String,
        #[serde(flatten)]
        vol: Vol,
        #[serde(flatten)]
        id: Identity,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client: Option<u64>,
    },
    /// A fixed address is about to be reserved for the clone's MAC in a libvirt network.
    Reserved {
        uuid: String,
        network: String,
        mac: String,
        ip: std::net::Ipv4Addr,
    },
    Done {
        uuid: String,
    },
    Undone {
        uuid: String,
    },
}

/// What cleaning the dead runs' journals did: what it removed, and why it kept a journal
/// for a later run.
#[derive(Debug, Default, PartialEq)]
pub struct Cleaned {
    pub removed: Vec<String>,
    pub kept: Vec<String>,
}

/// Note the file at `tmp` (finished) before renaming it to `final_path`.
pub fn log_file(j: &mut Journal, uuid: &str, tmp: &Path, final_path: &Path) -> Result<()> {
    let m = fs::symlink_metadata(tmp).ctx("cannot stat", tmp)?;
    j.log(&Entry::Made {
        uuid: uuid.into(),
        vol: Vol::File(final_path.to_path_buf()),
        id: Identity::Inode {
            dev: m.dev(),
            ino: m.ino(),
        },
        client: None,
    })
}

/// Releasing a reservation a dead run made: `release(network, mac, ip)` releases it if
/// it is still there, and says whether it did; an error keeps the journal.
pub type Release<'a> =
    &'a mut dyn FnMut(&str, &str, std::net::Ipv4Addr) -> std::result::Result<bool, String>;

/// [`clean_dead_releasing`] of journals that hold no reservation (one that does is kept).
pub fn clean_dead(
    dir: &Path,
    uri: &str,
    domain_exists: impl FnMut(&str) -> Option<bool>,
    remove_image: RemoveImage,
) -> Cleaned {
    clean_dead_releasing(dir, uri, domain_exists, remove_image, &mut |_, _, _| {
        Err("no libvirt connection to release it with".into())
    })
}

/// Clean every journal in `dir` whose run is dead and whose clones are all on `uri`.
/// `domain_exists(uuid)` says whether a clone was finished (`None`: cannot tell, keep the
/// journal for a later run). Returns what was removed and why a journal was kept, for the
/// messages.
pub fn clean_dead_releasing(
    dir: &Path,
    uri: &str,
    mut domain_exists: impl FnMut(&str) -> Option<bool>,
    remove_image: RemoveImage,
    release: Release,
) -> Cleaned {
    let mut done = Cleaned::default();
    let notes = super::recover_each::<Entry>(dir, KIND, |entries, pid, path| {
        let ours = entries
            .iter()
            .all(|e| !matches!(e, Entry::Clone { uri: u, .. } if u != uri));
        if !ours {
            return Verdict::Skip;
        }
        if let Err(why) = check_shape(entries, pid) {
            return Verdict::Kept(vec![(
                true,
                format!("kept the journal {path} of a dead tpl-clone: {why}"),
            )]);
        }
        let mut removed = Vec::new();
        let r = clean_one(
            entries,
            &mut domain_exists,
            remove_image,
            release,
            &mut removed,
        );
        done.removed.extend(removed);
        match r {
            Ok(()) => Verdict::Done(vec![]),
            Err(why) => Verdict::Kept(vec![(
                true,
                format!("kept the journal {path} of a killed tpl-clone for a later run: {why}"),
            )]),
        }
    });
    done.kept.extend(notes.into_iter().map(|(_, t)| t));
    done
}

/// Undo the unfinished clones of one dead journal, noting what it removed in `removed`;
/// an error says why the journal must be kept (libvirt or Ceph cannot tell or refuse).
fn clean_one(
    entries: &[Entry],
    domain_exists: &mut impl FnMut(&str) -> Option<bool>,
    remove_image: RemoveImage,
    release: Release,
    removed: &mut Vec<String>,
) -> Result<(), String> {
    // In journal order: a clone undone after it was done is unfinished again.
    let mut finished = BTreeSet::new();
    for e in entries {
        match e {
            Entry::Done { uuid } => {
                finished.insert(uuid.as_str());
            }
            Entry::Undone { uuid } => {
                finished.remove(uuid.as_str());
            }
            _ => {}
        }
    }
    for e in entries {
        let Entry::Clone { name, uuid, .. } = e else {
            continue;
        };
        if finished.contains(uuid.as_str()) {
            continue;
        }
        match domain_exists(uuid) {
            Some(true) => continue, // finished: its volumes are the domain's now
            Some(false) => {}
            None => {
                return Err(format!(
                    "libvirt cannot tell whether clone '{}' was defined",
                    crate::text::shown(name)
                ))
            }
        }
        for f in entries {
            if let Entry::Reserved {
                uuid: u,
                network,
                mac,
                ip,
            } = f
            {
                if u == uuid {
                    let released = release(network, mac, *ip).map_err(|e| {
                        format!(
                            "cannot release {ip} of unfinished clone '{}' in the network '{}' \
                             yet: {e}",
                            crate::text::shown(name),
                            crate::text::shown(network)
                        )
                    })?;
                    if released {
                        removed.push(format!(
                            "the reservation of {ip} for {mac} in the network '{}' of \
                             unfinished clone '{}'",
                            crate::text::shown(network),
                            crate::text::shown(name)
                        ));
                    }
                }
                continue;
            }
            let (vol, id, client, what) = match f {
                Entry::Tmp {
                    uuid: u,
                    vol,
                    client,
                } if u == uuid => (vol, None, *client, "temporary "),
                Entry::Made {
                    uuid: u,
                    vol,
                    id,
                    client,
                } if u == uuid => (vol, Some(id), *client, ""),
                _ => continue,
            };
            let what = format!("{what}{}", vol.kind());
            let gone = vol.remove_leftover(id, client, remove_image).map_err(|e| {
                format!(
                    "cannot remove {what} '{}' of unfinished clone '{}' yet: {e}",
                    vol.shown(),
                    crate::text::shown(name)
                )
            })?;
            if let Some(notes) = gone {
                let also = notes.iter().map(|n| format!(" ({n})")).collect::<String>();
                removed.push(format!(
                    "{what} '{}' of unfinished clone '{}'{also}",
                    vol.shown(),
                    crate::text::shown(name)
                ));
            }
        }
    }
    Ok(())
}

/// The temporary name of a file this run writes: hidden, in the target's directory (so
/// the final rename stays on one file system), and carrying this host's name and our pid
/// (`.FILE.tpl-tmp-HOST-PID`). The host name because the directory may be shared (an NFS
/// pool): a pid means nothing on another host, whose runs' files are not ours to judge.
pub fn tmp_name(final_path: &Path) -> PathBuf {
    tmp_name_of(final_path, std::process::id())
}

/// The temporary name run `pid` of this host gives a file or image named `leaf`; what
/// [`tmp_pid`] reads back.
fn tmp_leaf(leaf: &str, pid: u32) -> String {
    format!(".{leaf}.tpl-tmp-{}-{pid}", host_tag())
}

/// The temporary name run `pid` of this host gives `final_path`.
fn tmp_name_of(final_path: &Path, pid: u32) -> PathBuf {
    let file = final_path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    final_path.with_file_name(tmp_leaf(&file, pid))
}

/// The temporary name run `pid` of this host gives volume `v` (None: it has no name).
fn tmp_vol_of(v: &Vol, pid: u32) -> Option<Vol> {
    Some(v.sibling(&tmp_leaf(v.leaf()?, pid)))
}

/// Whether the entries of a dead run's journal are of the shape run `pid` writes, and if
/// not the first that is not: a temporary volume must carry this host's name and that
/// pid (`.NAME.tpl-tmp-HOST-PID`), a made one must follow a temporary one of the same
/// clone under its temporary name. Recovery acts on nothing else: a journal is no list
/// of files to delete.
fn check_shape(entries: &[Entry], pid: u32) -> Result<(), String> {
    let is_tmp = |v: &Vol| v.leaf().and_then(|f| tmp_pid(f, host_tag())) == Some(pid);
    let tmp_of = |uuid: &str, made: &Vol| {
        let want = tmp_vol_of(made, pid);
        entries
            .iter()
            .any(|e| matches!(e, Entry::Tmp { uuid: u, vol, .. } if u == uuid && Some(vol) == want.as_ref()))
    };
    for e in entries {
        let ok = match e {
            Entry::Tmp { vol, .. } => vol.is_well_formed() && is_tmp(vol),
            Entry::Made { uuid, vol, id, .. } => {
                let kind_ok = matches!(
                    (vol, id),
                    (Vol::File(_), Identity::Inode { .. }) | (Vol::Rbd(_), Identity::Rbd { .. })
                );
                kind_ok && vol.is_well_formed() && tmp_of(uuid, vol)
            }
            Entry::Reserved { mac, .. } => is_mac(mac),
            Entry::Clone { .. } | Entry::Done { .. } | Entry::Undone { .. } => true,
        };
        if !ok {
            return Err(format!(
                "its entry {} is not one a tpl-clone of this host with pid {pid} writes; \
                 nothing in it was acted on",
                crate::text::shown(&serde_json::to_string(e).unwrap_or_default())
            ));
        }
    }
    Ok(())
}

/// A MAC address as libvirt writes one: six pairs of hex digits, `:`-separated.
fn is_mac(m: &str) -> bool {
    let parts: Vec<&str> = m.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The pid of the run whose temporary file `name` is, if that run is on `host`. None for
/// another host's file or anything that is not a temporary file.
fn tmp_pid(name: &str, host: &str) -> Option<u32> {
    let (_, tag) = name.strip_prefix('.')?.rsplit_once(".tpl-tmp-")?;
    let (h, pid) = tag.rsplit_once('-')?;
    let pid = pid.parse::<u32>().ok()?;
    (h == host).then_some(pid)
}

/// Remove temporary files of dead runs of this host in `dir` that no journal accounted
/// for (a journal directory someone wiped, say): their pid has no live journal in `jdir`
/// and no process. Another host's files are never touched. Returns what was removed.
pub fn sweep_tmp(dir: &Path, jdir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir(dir) else {
        return out;
    };
    let live = foreign_live_pids(jdir, KIND);
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let gone =
            tmp_pid(&name, host_tag()).is_some_and(|pid| !live.contains(&pid) && !pid_exists(pid));
        if gone && e.file_type().is_ok_and(|t| t.is_file()) {
            let p = e.path();
            if fs::remove_file(&p).is_ok() {
                out.push(format!("temporary file '{}'", shown_path(&p)));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pid no process has: a child that has exited and been reaped.
    fn dead_pid() -> u32 {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        assert!(!pid_exists(pid));
        pid
    }

    fn ino(p: &Path) -> (u64, u64) {
        let m = fs::metadata(p).unwrap();
        (m.dev(), m.ino())
    }

    fn write_journal(path: &Path, entries: &[Entry], tail: &str) {
        let mut text: String = entries
            .iter()
            .map(|e| serde_json::to_string(e).unwrap() + "\n")
            .collect();
        text.push_str(tail);
        fs::write(path, text).unwrap();
    }

    #[test]
    fn cleans_unfinished_clones_only_and_never_a_replaced_file() {
        let d = tempfile::tempdir().unwrap();
        let jdir = d.path().join("j");
        fs::create_dir(&jdir).unwrap();
        let pid = dead_pid();
        let tmp = tmp_name_of(&d.path().join("a.qcow2"), pid);
        let a = d.path().join("a.qcow2"); // renamed into place, domain never defined
        let b = d.path().join("b.qcow2"); // another run's file that took the name
        let c = d.path().join("c.qcow2"); // a finished clone's file
        for p in [&tmp, &a, &b, &c] {
            fs::write(p, "x").unwrap();
        }
        let entries = [
            Entry::Clone {
                name: "a".into(),
                uuid: "u1".into(),
                uri: "test:///x".into(),
            },
            Entry::Tmp {
                uuid: "u1".into(),
                vol: Vol::File(tmp.clone()),
                client: None,
            },
            Entry::Made {
                uuid: "u1".into(),
                vol: Vol::File(a.clone()),
                id: Identity::Inode {
                    dev: ino(&a).0,
                    ino: ino(&a).1,
                },
                client: None,
            },
            Entry::Tmp {
                uuid: "u1".into(),
                vol: Vol::File(tmp_name_of(&b, pid)),
                client: None,
            },
            Entry::Made {
                uuid: "u1".into(),
                vol: Vol::File(b.clone()),
                id: Identity::Inode {
                    dev: ino(&b).0,
                    ino: ino(&b).1 + 1_000_000,
                },
                client: None,
            },
            Entry::Clone {
                name: "c".into(),
                uuid: "u2".into(),
                uri: "test:///x".into(),
            },
            Entry::Tmp {
                uuid: "u2".into(),
                vol: Vol::File(tmp_name_of(&c, pid)),
                client: None,
            },
            Entry::Made {
                uuid: "u2".into(),
                vol: Vol::File(c.clone()),
                id: Identity::Inode {
                    dev: ino(&c).0,
                    ino: ino(&c).1,
                },
                client: None,
            },
        ];
        let jpath = jdir.join(format!("tpl-clone-{pid}-0badf00d.journal"));
        // The last line was cut short by kill -9.
        write_journal(&jpath, &entries, "{\"op\":\"tmp\",\"uu");
        // A run killed while creating its journal left it under the new name.
        let new = jdir.join(format!("tpl-clone-{pid}-1234abcd.journal-new"));
        fs::write(&new, "").unwrap();
        // A live run's journal (ours) is left alone.
        let mine = Journal::create(&jdir, KIND).unwrap();
        // A dead run's journal of another connection is not this one's to clean.
        let other = jdir.join(format!("tpl-clone-{pid}-0ddba11a.journal"));
        write_journal(
            &other,
            &[Entry::Clone {
                name: "o".into(),
                uuid: "u9".into(),
                uri: "qemu+ssh://elsewhere/system".into(),
            }],
            "",
        );

        let removed = clean_dead(
            &jdir,
            "test:///x",
            |uuid| Some(uuid == "u2"),
            &mut |_, _, _| Ok(None),
        );
        assert_eq!(removed.removed.len(), 2, "{removed:?}");
        assert!(removed.kept.is_empty(), "{removed:?}");
        assert!(!tmp.exists() && !a.exists() && !new.exists());
        assert!(b.exists(), "a file that is not the one journaled stays");
        assert!(c.exists(), "a finished clone's file stays");
        assert!(!jpath.exists());
        assert!(other.exists());
        assert!(mine.path().exists());
        mine.close();
    }

    #[test]
    fn a_clone_marked_done_keeps_its_files_when_its_domain_is_gone() {
        let d = tempfile::tempdir().unwrap();
        let pid = dead_pid();
        // u1 finished, and the user undefined it since, keeping its image; u2 was defined
        // and then removed again (its start failed) when the run was killed; u3 never got
        // as far as its domain.
        let (a, b) = (d.path().join("a.qcow2"), d.path().join("b.qcow2"));
        let t3 = tmp_name_of(&d.path().join("c.qcow2"), pid);
        for p in [&a, &b, &t3] {
            fs::write(p, "x").unwrap();
        }
        let clone = |n: &str, u: &str| Entry::Clone {
            name: n.into(),
            uuid: u.into(),
            uri: "test:///x".into(),
        };
        let file = |u: &str, p: &Path| Entry::Made {
            uuid: u.into(),
            vol: Vol::File(p.to_path_buf()),
            id: Identity::Inode {
                dev: ino(p).0,
                ino: ino(p).1,
            },
            client: None,
        };
        let tmp = |u: &str, p: &Path| Entry::Tmp {
            uuid: u.into(),
            vol: Vol::File(tmp_name_of(p, pid)),
            client: None,
        };
        let entries = [
            clone("a", "u1"),
            tmp("u1", &a),
            file("u1", &a),
            Entry::Done { uuid: "u1".into() },
            clone("b", "u2"),
            tmp("u2", &b),
            file("u2", &b),
            Entry::Done { uuid: "u2".into() },
            Entry::Undone { uuid: "u2".into() },
            clone("c", "u3"),
            Entry::Tmp {
                uuid: "u3".into(),
                vol: Vol::File(t3.clone()),
                client: None,
            },
        ];
        let jpath = d.path().join(format!("tpl-clone-{pid}-0badf00d.journal"));
        write_journal(&jpath, &entries, "");
        let mut asked = Vec::new();
        let removed = clean_dead(
            d.path(),
            "test:///x",
            |uuid| {
                asked.push(uuid.to_string());
                Some(false)
            },
            &mut |_, _, _| Ok(None),
        );
        assert_eq!(removed.removed.len(), 2, "{removed:?}");
        assert!(removed.kept.is_empty(), "{removed:?}");
        assert!(
            a.exists(),
            "a finished clone's image stays after its domain went"
        );
        assert!(!b.exists() && !t3.exists());
        assert_eq!(asked, ["u2", "u3"], "a clone marked done needs no libvirt");
        assert!(!jpath.exists());
    }

    /// Issue 19: a journal the release before the one-volume shape wrote (`tmp`/`file`
    /// with `path`, `rbdtmp`/`rbdfile` with `image`, text as it wrote it) reads as the
    /// same entries and is recovered the same way; the entries written now say `tmp` and
    /// `made`, with `file` or `rbd`.
    #[test]
    fn a_journal_of_the_last_release_is_still_recovered() {
        let d = tempfile::tempdir().unwrap();
        let pid = dead_pid();
        let a = d.path().join("a.qcow2");
        let tmp = tmp_name_of(&d.path().join("b.qcow2"), pid);
        for p in [&a, &tmp] {
            fs::write(p, "x").unwrap();
        }
        let (dev, ino) = ino(&a);
        let host = host_tag();
        let old = format!(
            r#"{{"op":"clone","name":"a","uuid":"u1","uri":"x"}}
{{"op":"tmp","uuid":"u1","path":"{dir}/.a.qcow2.tpl-tmp-{host}-{pid}"}}
{{"op":"file","uuid":"u1","path":"{a}","dev":{dev},"ino":{ino}}}
{{"op":"tmp","uuid":"u1","path":"{tmp}"}}
{{"op":"rbdtmp","uuid":"u1","image":"p/ns/.a.tpl-tmp-{host}-{pid}","client":7}}
{{"op":"rbdfile","uuid":"u1","image":"p/ns/a","id":"abc","client":7}}
{{"op":"rbdtmp","uuid":"u1","image":"p/.c.tpl-tmp-{host}-{pid}"}}
"#,
            dir = d.path().display(),
            a = a.display(),
            tmp = tmp.display()
        );
        let jpath = d.path().join(format!("tpl-clone-{pid}-0badf00d.journal"));
        fs::write(&jpath, old).unwrap();
        let mut asked = Vec::new();
        let c = clean_dead(d.path(), "x", |_| Some(false), &mut |image, id, client| {
            asked.push((image.to_string(), id.map(str::to_string), client));
            Ok(Some(vec![]))
        });
        assert!(c.kept.is_empty(), "{c:?}");
        assert_eq!(c.removed.len(), 5, "{c:?}");
        assert!(!a.exists() && !tmp.exists() && !jpath.exists());
        assert_eq!(
            asked,
            [
                (format!("p/ns/.a.tpl-tmp-{host}-{pid}"), None, Some(7)),
                ("p/ns/a".into(), Some("abc".into()), Some(7)),
                (format!("p/.c.tpl-tmp-{host}-{pid}"), None, None),
            ]
        );
        let now = |e: &Entry| serde_json::to_value(e).unwrap();
        assert_eq!(
            now(&Entry::Made {
                uuid: "u".into(),
                vol: Vol::Rbd("p/a".into()),
                id: Identity::Rbd { id: "abc".into() },
                client: Some(7)
            }),
            serde_json::json!({"op": "made", "uuid": "u", "rbd": "p/a", "id": "abc", "client": 7})
        );
        assert_eq!(
            now(&Entry::Tmp {
                uuid: "u".into(),
                vol: Vol::File("/i/.a.tpl-tmp-h-1".into()),
                client: None
            }),
            serde_json::json!({"op": "tmp", "uuid": "u", "file": "/i/.a.tpl-tmp-h-1"})
        );
    }

    #[test]
    fn journal_kept_when_libvirt_cannot_tell() {
        let d = tempfile::tempdir().unwrap();
        let pid = dead_pid();
        let jpath = d.path().join(format!("tpl-clone-{pid}-0badf00d.journal"));
        let e = Entry::Clone {
            name: "a".into(),
            uuid: "u".into(),
            uri: "x".into(),
        };
        write_journal(&jpath, &[e], "");
        let c = clean_dead(d.path(), "x", |_| None, &mut |_, _, _| Ok(None));
        assert!(c.removed.is_empty(), "{c:?}");
        assert_eq!(c.kept.len(), 1, "{c:?}");
        assert!(c.kept[0].contains("libvirt cannot tell"), "{c:?}");
        assert!(jpath.exists());
    }

    #[test]
    fn an_image_ceph_will_not_remove_yet_keeps_the_journal_and_says_why() {
        let d = tempfile::tempdir().unwrap();
        let pid = dead_pid();
        let jpath = d.path().join(format!("tpl-clone-{pid}-0badf00d.journal"));
        let mut entries = Vec::new();
        for (n, u) in [("a", "u1"), ("b", "u2")] {
            entries.push(Entry::Clone {
                name: n.into(),
                uuid: u.into(),
                uri: "x".into(),
            });
            entries.push(Entry::Tmp {
                uuid: u.into(),
                vol: Vol::Rbd(
                    tmp_name_of(Path::new(&format!("p/{n}")), pid)
                        .to_string_lossy()
                        .into_owned(),
                ),
                client: Some(7),
            });
        }
        let b_tmp = format!("p/.b.tpl-tmp-{}-{pid}", host_tag());
        write_journal(&jpath, &entries, "");
        let c = clean_dead(d.path(), "x", |_| Some(false), &mut |image, _, client| {
            assert_eq!(
                client,
                Some(7),
                "the dead run's client comes with its image"
            );
            if image == b_tmp {
                Err("it has watchers".into())
            } else {
                Ok(Some(vec![]))
            }
        });
        // what could go went, and is said; the journal stays for what could not
        assert_eq!(c.removed.len(), 1, "{c:?}");
        assert!(c.removed[0].contains("p/.a.tpl-tmp-"), "{c:?}");
        assert_eq!(c.kept.len(), 1, "{c:?}");
        assert!(
            c.kept[0].contains(&format!("'{b_tmp}'")) && c.kept[0].contains("it has watchers"),
            "{c:?}"
        );
        assert!(jpath.exists());
    }

    /// Issue 22: a journal acts only on what it can prove is a dead run's own work. A
    /// planted entry (a file that is not a temporary name of the journal's run, a final
    /// file without its temporary one) makes the journal be kept and reported, with
    /// nothing removed; a journal others may write, or another user's, is not even read.
    #[test]
    fn a_journal_tpl_did_not_write_is_never_obeyed() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let pid = dead_pid();
        let victim = d.path().join("precious");
        let other_run = tmp_name_of(&d.path().join("x.qcow2"), pid + 1);
        for p in [&victim, &other_run] {
            fs::write(p, "x").unwrap();
        }
        let clone = Entry::Clone {
            name: "a".into(),
            uuid: "u1".into(),
            uri: "x".into(),
        };
        let planted = [
            Entry::Tmp {
                uuid: "u1".into(),
                vol: Vol::File(victim.clone()),
                client: None,
            },
            Entry::Tmp {
                uuid: "u1".into(),
                vol: Vol::File(other_run.clone()),
                client: None,
            },
            Entry::Made {
                uuid: "u1".into(),
                vol: Vol::File(victim.clone()),
                id: Identity::Inode {
                    dev: ino(&victim).0,
                    ino: ino(&victim).1,
                },
                client: None,
            },
            Entry::Tmp {
                uuid: "u1".into(),
                vol: Vol::Rbd("rbd/precious".into()),
                client: None,
            },
        ];
        for (i, e) in planted.iter().enumerate() {
            let jpath = d.path().join(format!("tpl-clone-{pid}-0000000{i}.journal"));
            write_journal(&jpath, &[clone.clone(), e.clone()], "");
            let c = clean_dead(d.path(), "x", |_| Some(false), &mut |_, _, _| {
                panic!("an image of a planted journal is never removed")
            });
            assert!(c.removed.is_empty(), "{c:?}");
            assert!(
                c.kept.len() == 1 && c.kept[0].contains("nothing in it was acted on"),
                "{c:?}"
            );
            assert!(victim.exists() && other_run.exists());
            fs::remove_file(&jpath).unwrap();
        }
        // A journal anyone may write is not read at all, however well-formed.
        let tmp = tmp_name_of(&d.path().join("y.qcow2"), pid);
        fs::write(&tmp, "x").unwrap();
        let jpath = d.path().join(format!("tpl-clone-{pid}-0badf00d.journal"));
        let entries = [
            clone.clone(),
            Entry::Tmp {
                uuid: "u1".into(),
                vol: Vol::File(tmp.clone()),
                client: None,
            },
        ];
        write_journal(&jpath, &entries, "");
        fs::set_permissions(&jpath, fs::Permissions::from_mode(0o666)).unwrap();
        let c = clean_dead(d.path(), "x", |_| Some(false), &mut |_, _, _| Ok(None));
        assert!(c.removed.is_empty() && tmp.exists(), "{c:?}");
        assert!(
            c.kept.len() == 1 && c.kept[0].contains("others may write it"),
            "{c:?}"
        );
        // ...until it is this user's own again.
        fs::set_permissions(&jpath, fs::Permissions::from_mode(0o600)).unwrap();
        let c = clean_dead(d.path(), "x", |_| Some(false), &mut |_, _, _| Ok(None));
        assert_eq!(c.removed.len(), 1, "{c:?}");
        assert!(!tmp.exists() && !jpath.exists());
    }

    #[test]
    fn create_never_replaces_a_journal_of_the_same_pid() {
        let d = tempfile::tempdir().unwrap();
        let pid = std::process::id();
        // A journal a cleaner kept under our pid (pid reuse).
        let kept = d.path().join(format!("tpl-clone-{pid}-0badf00d.journal"));
        fs::write(&kept, "kept\n").unwrap();
        let j1 = Journal::create(d.path(), KIND).unwrap();
        let j2 = Journal::create(d.path(), KIND).unwrap();
        assert_ne!(j1.path(), j2.path());
        assert_eq!(fs::read_to_string(&kept).unwrap(), "kept\n");
        for j in [j1.path(), j2.path()] {
            assert_eq!(
                super::super::journal_name(j, KIND),
                Some((pid, false)),
                "{j:?}"
            );
        }
        assert!(fs::read_dir(d.path())
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().ends_with("-new")));
        j1.close();
        j2.close();
        assert!(kept.exists());
    }

    #[test]
    fn temporary_names() {
        let o = |n: &str| tmp_pid(n, "web-01.lan");
        assert_eq!(o(".a.qcow2.tpl-tmp-web-01.lan-42"), Some(42));
        assert_eq!(o(".a.qcow2.tpl-tmp-web-02.lan-42"), None);
        assert_eq!(o(".a.qcow2.tpl-tmp-web-01.lan-x"), None);
        assert_eq!(o("a.qcow2.tpl-tmp-web-01.lan-42"), None);
        let t = tmp_name(Path::new("/d/x.qcow2"));
        let name = t.file_name().unwrap().to_str().unwrap();
        assert_eq!(tmp_pid(name, host_tag()), Some(std::process::id()));
        assert_eq!(t.parent(), Some(Path::new("/d")));
    }

    #[test]
    fn sweeps_only_dead_runs_temporaries_of_this_host() {
        let d = tempfile::tempdir().unwrap();
        let dpid = dead_pid();
        let dead = d
            .path()
            .join(format!(".x.qcow2.tpl-tmp-{}-{dpid}", host_tag()));
        let live = tmp_name(&d.path().join("y.qcow2"));
        let other_host = d
            .path()
            .join(format!(".x.qcow2.tpl-tmp-{}x-{dpid}", host_tag()));
        let garbage = d.path().join(".x.qcow2.tpl-tmp-abc");
        for p in [&dead, &live, &other_host, &garbage] {
            fs::write(p, "x").unwrap();
        }
        let removed = sweep_tmp(d.path(), d.path());
        assert_eq!(removed.len(), 1, "{removed:?}");
        assert!(!dead.exists());
        assert!(live.exists(), "a live run's file stays");
        assert!(other_host.exists(), "another host's file stays");
        assert!(garbage.exists());
    }
}
