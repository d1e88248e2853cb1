//! A volume: what a domain's disk or NVRAM lives in (a file, an RBD image), named and identified one way for every journal, with one dispatch for what recovery does to it.
//!
//! A journal stores a volume as where it is ([`Vol`]: `{"file": PATH}` or `{"rbd":
//! "POOL[/NS]/IMAGE"}`) and, once it exists, which volume it is ([`Identity`]: a file's
//! device and inode, an RBD image's id), so that recovery acts only on the very volume
//! the run made or moved, never on one that took its name since. Adding a backend is
//! one variant here and one arm in each method below (see DESIGN.md, "Adding a backend").

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::session::Session;
use crate::text::{shown, shown_path};

/// Where a volume is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Vol {
    /// A file, by its absolute path (`path` in the journals of releases before 0.19).
    #[serde(alias = "path")]
    File(PathBuf),
    /// An RBD image, `POOL[/NS]/IMAGE` (`image` in the journals of releases before 0.19).
    #[serde(alias = "image")]
    Rbd(String),
}

/// Which volume it is, whatever its name now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Identity {
    /// A file's device and inode.
    Inode { dev: u64, ino: u64 },
    /// An RBD image's id, which no other image of its pool has.
    Rbd { id: String },
}

/// Removing an RBD image a dead run left: `remove(image, id, client)` removes it if it
/// exists (and, with an id, only if it is that very image), and says whether it did and
/// what it said on the way (a watch of the dead run's Ceph `client` it ended); an error
/// (why it cannot) keeps the journal for a later run. A parameter rather than a
/// [`Session`] so that recovery's decisions can be tested on files alone.
pub type RemoveImage<'a> = &'a mut dyn FnMut(
    &str,
    Option<&str>,
    Option<u64>,
) -> std::result::Result<Option<Vec<String>>, String>;

impl Vol {
    /// How people see it: the path, or the image's name.
    pub fn shown(&self) -> String {
        match self {
            Vol::File(p) => shown_path(p),
            Vol::Rbd(i) => shown(i),
        }
    }

    /// What kind of volume it is, in a message ("file", "RBD image").
    pub fn kind(&self) -> &'static str {
        match self {
            Vol::File(_) => "file",
            Vol::Rbd(_) => "RBD image",
        }
    }

    /// Whether it is named the way tpl names volumes: an absolute path, a valid image.
    pub fn is_well_formed(&self) -> bool {
        match self {
            Vol::File(p) => p.is_absolute(),
            Vol::Rbd(i) => i.parse::<tpl_ceph::ImageSpec>().is_ok(),
        }
    }

    /// The last part of its name (a file's name, an image's name in its pool): where
    /// the temporary names of the clone journal carry the run's host and pid.
    pub fn leaf(&self) -> Option<&str> {
        match self {
            Vol::File(p) => p.file_name()?.to_str(),
            Vol::Rbd(i) => i.rsplit('/').next(),
        }
    }

    /// The same kind of volume, next to this one (same directory; same pool and
    /// namespace), named `leaf`.
    pub fn sibling(&self, leaf: &str) -> Vol {
        match self {
            Vol::File(p) => Vol::File(p.with_file_name(leaf)),
            Vol::Rbd(i) => Vol::Rbd(match i.rsplit_once('/') {
                Some((dir, _)) => format!("{dir}/{leaf}"),
                None => leaf.to_string(),
            }),
        }
    }

    /// Which volume is here now; None when there is none.
    pub fn identity(&self, s: &Session) -> Result<Option<Identity>> {
        match self {
            Vol::File(p) => match fs::symlink_metadata(p) {
                Ok(m) => Ok(Some(Identity::Inode {
                    dev: m.dev(),
                    ino: m.ino(),
                })),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::io("cannot stat", p, e)),
            },
            Vol::Rbd(i) => {
                let spec = self.spec()?;
                match s.ceph.cluster()?.info(&spec) {
                    Ok(info) => Ok(Some(Identity::Rbd { id: info.id })),
                    Err(tpl_ceph::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(crate::rbd::ceph_error(&format!("read '{}'", shown(i)), e)),
                }
            }
        }
    }

    /// Whether the volume here is `id` (false when it cannot be told).
    pub fn is(&self, s: &Session, id: &Identity) -> bool {
        self.identity(s).is_ok_and(|now| now.as_ref() == Some(id))
    }

    /// Rename it to `to` (a volume of the same kind), never over another.
    pub fn rename_noreplace(&self, s: &Session, to: &Vol) -> Result<()> {
        match (self, to) {
            (Vol::File(from), Vol::File(to)) => crate::fsutil::rename_noreplace(from, to),
            (Vol::Rbd(from), Vol::Rbd(_)) => {
                let spec = self.spec()?;
                let leaf = to.leaf().unwrap_or_default();
                s.ceph
                    .cluster()?
                    .rename(&spec, leaf)
                    .map(drop)
                    .map_err(|e| {
                        crate::rbd::ceph_error(
                            &format!("rename '{}' to '{}'", shown(from), to.shown()),
                            e,
                        )
                    })
            }
            _ => Err(Error::failed(
                format!("cannot rename '{}' to '{}'", self.shown(), to.shown()),
                "they are volumes of different kinds",
            )),
        }
    }

    /// Remove it, if it is there: what this run made and must take back (a clone that
    /// failed halfway). The error says why it cannot.
    pub fn remove(&self, s: &Session) -> std::result::Result<(), String> {
        match self {
            Vol::File(p) => match fs::remove_file(p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.to_string()),
                _ => Ok(()),
            },
            Vol::Rbd(_) => {
                let spec = self.spec().map_err(|e| e.to_string())?;
                match s.ceph.cluster().map_err(|e| e.to_string())?.remove(&spec) {
                    Ok(()) | Err(tpl_ceph::Error::NotFound { .. }) => Ok(()),
                    Err(e) => Err(e.to_string()),
                }
            }
        }
    }

    /// Remove what a dead run left here, if it is there and is `id` (any volume here when
    /// `id` is None: a temporary name only that run used). Returns whether it removed it
    /// and what it said on the way, or why it cannot yet (the journal is then kept). The
    /// dead run's Ceph connection `client`, when journaled, proves a watch its own.
    pub fn remove_leftover(
        &self,
        id: Option<&Identity>,
        client: Option<u64>,
        remove_image: RemoveImage,
    ) -> std::result::Result<Option<Vec<String>>, String> {
        match self {
            Vol::File(p) => {
                let same = match id {
                    None => true,
                    Some(Identity::Inode { dev, ino }) => {
                        fs::symlink_metadata(p).is_ok_and(|m| m.dev() == *dev && m.ino() == *ino)
                    }
                    Some(Identity::Rbd { .. }) => false,
                };
                Ok((same && fs::remove_file(p).is_ok()).then(Vec::new))
            }
            Vol::Rbd(image) => match id {
                None => remove_image(image, None, client),
                Some(Identity::Rbd { id }) => remove_image(image, Some(id), client),
                Some(Identity::Inode { .. }) => Ok(None),
            },
        }
    }

    /// The RBD image it names.
    pub(crate) fn spec(&self) -> Result<tpl_ceph::ImageSpec> {
        match self {
            Vol::Rbd(i) => i.parse().map_err(|e: tpl_ceph::Error| {
                Error::failed(
                    format!("cannot read the RBD image '{}'", shown(i)),
                    e.to_string(),
                )
            }),
            Vol::File(p) => Err(Error::failed(
                format!("cannot read '{}' as an RBD image", shown_path(p)),
                "it is a file",
            )),
        }
    }
}

/// How much a domain's disk `d` takes on its storage: a file's allocated blocks, an
/// RBD image's own objects (not its parent's); None when it is missing, Some(0) when
/// it cannot be told (a cluster that cannot be reached: its space is not counted).
pub fn allocated(s: &Session, d: &crate::record::Disk) -> Option<u64> {
    if let Some(r) = &d.rbd {
        let spec = crate::rbd::spec_of(r);
        return match s.ceph.cluster_for(r).map(|c| c.allocated_bytes(&spec)) {
            Ok(Err(tpl_ceph::Error::NotFound { .. })) => None,
            Ok(Ok(b)) => Some(b),
            _ => Some(0),
        };
    }
    match d.path.as_deref().map(fs::symlink_metadata) {
        Some(Ok(m)) => Some(m.blocks() * 512),
        Some(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => None,
        _ => Some(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(tag = "op", rename_all = "lowercase")]
    enum E {
        #[serde(alias = "file")]
        Made {
            #[serde(flatten)]
            vol: Vol,
            #[serde(flatten)]
            id: Identity,
        },
    }

    /// A volume and its identity read from the shapes of this release and of the last.
    #[test]
    fn volumes_and_identities_round_trip_and_read_the_old_shapes() {
        let file = E::Made {
            vol: Vol::File("/i/a.qcow2".into()),
            id: Identity::Inode { dev: 1, ino: 2 },
        };
        let text = serde_json::to_string(&file).unwrap();
        assert_eq!(text, r#"{"op":"made","file":"/i/a.qcow2","dev":1,"ino":2}"#);
        assert_eq!(serde_json::from_str::<E>(&text).unwrap(), file);
        let old = r#"{"op":"file","path":"/i/a.qcow2","dev":1,"ino":2}"#;
        assert_eq!(serde_json::from_str::<E>(old).unwrap(), file);
        let image = E::Made {
            vol: Vol::Rbd("p/ns/a".into()),
            id: Identity::Rbd { id: "abc".into() },
        };
        let text = serde_json::to_string(&image).unwrap();
        assert_eq!(text, r#"{"op":"made","rbd":"p/ns/a","id":"abc"}"#);
        assert_eq!(serde_json::from_str::<E>(&text).unwrap(), image);
        let old = r#"{"op":"made","image":"p/ns/a","id":"abc"}"#;
        assert_eq!(serde_json::from_str::<E>(old).unwrap(), image);
    }

    #[test]
    fn names_leaves_and_siblings() {
        let f = Vol::File("/i/a.qcow2".into());
        assert_eq!(f.leaf(), Some("a.qcow2"));
        assert_eq!(f.sibling("b"), Vol::File("/i/b".into()));
        let r = Vol::Rbd("p/ns/a".into());
        assert_eq!(r.leaf(), Some("a"));
        assert_eq!(r.sibling("b"), Vol::Rbd("p/ns/b".into()));
        assert!(f.is_well_formed() && r.is_well_formed());
        assert!(!Vol::File("a".into()).is_well_formed());
        assert!(!Vol::Rbd("noslash".into()).is_well_formed());
    }

    /// A file is removed only while it is the journaled one; a temporary one always.
    #[test]
    fn a_file_left_is_removed_only_while_it_is_the_same_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a");
        fs::write(&p, "x").unwrap();
        let m = fs::metadata(&p).unwrap();
        let v = Vol::File(p.clone());
        let other = Identity::Inode {
            dev: m.dev(),
            ino: m.ino() + 1,
        };
        let mut no_rbd = |_: &str,
                          _: Option<&str>,
                          _: Option<u64>|
         -> std::result::Result<_, String> { panic!("not an image") };
        assert_eq!(v.remove_leftover(Some(&other), None, &mut no_rbd), Ok(None));
        assert!(p.exists());
        let same = Identity::Inode {
            dev: m.dev(),
            ino: m.ino(),
        };
        assert_eq!(
            v.remove_leftover(Some(&same), None, &mut no_rbd),
            Ok(Some(vec![]))
        );
        assert!(!p.exists());
        fs::write(&p, "x").unwrap();
        assert_eq!(v.remove_leftover(None, None, &mut no_rbd), Ok(Some(vec![])));
        assert_eq!(v.remove_leftover(None, None, &mut no_rbd), Ok(None));
    }
}
