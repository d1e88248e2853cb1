//! `pool[/namespace]/image[@snap]`, the way the `rbd` CLI names images.

use std::ffi::CString;
use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// One RBD image (at a snapshot when `snap` is set).
///
/// Displays as `pool/image`, `pool/image@snap`, or with a namespace
/// `pool/ns/image@snap`, and parses from the same forms (the pool is not
/// optional: there is no implicit `rbd` pool here).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageSpec {
    pub pool: String,
    /// RADOS namespace inside the pool; empty = the default namespace.
    pub namespace: String,
    pub image: String,
    pub snap: Option<String>,
}

impl ImageSpec {
    /// `pool/image` (no namespace, no snapshot).
    pub fn new(pool: impl Into<String>, image: impl Into<String>) -> ImageSpec {
        ImageSpec {
            pool: pool.into(),
            namespace: String::new(),
            image: image.into(),
            snap: None,
        }
    }

    /// The same image in namespace `ns` of its pool.
    pub fn in_namespace(mut self, ns: impl Into<String>) -> ImageSpec {
        self.namespace = ns.into();
        self
    }

    /// The same image at snapshot `snap`.
    pub fn at(&self, snap: impl Into<String>) -> ImageSpec {
        ImageSpec {
            snap: Some(snap.into()),
            ..self.clone()
        }
    }

    /// The same image without a snapshot (its writable head).
    pub fn head(&self) -> ImageSpec {
        ImageSpec {
            snap: None,
            ..self.clone()
        }
    }

    /// Another image in the same pool and namespace.
    pub fn sibling(&self, image: impl Into<String>) -> ImageSpec {
        ImageSpec {
            pool: self.pool.clone(),
            namespace: self.namespace.clone(),
            image: image.into(),
            snap: None,
        }
    }

    /// Checks every part; the error names the bad part.
    pub fn validate(&self) -> Result<()> {
        check_name("pool", &self.pool)?;
        if !self.namespace.is_empty() {
            check_name("namespace", &self.namespace)?;
        }
        check_name("image", &self.image)?;
        if let Some(s) = &self.snap {
            check_name("snapshot", s)?;
        }
        Ok(())
    }

    /// The snapshot name, or an error saying `op` needs one.
    pub(crate) fn require_snap(&self, op: &str) -> Result<&str> {
        self.snap.as_deref().ok_or_else(|| Error::InvalidArgument {
            op: crate::error::Op(format!("{op} {self}")),
            why: "needs a snapshot (pool/image@snap)".into(),
        })
    }

    pub(crate) fn c_pool(&self) -> Result<CString> {
        c_name("pool", &self.pool)
    }

    pub(crate) fn c_namespace(&self) -> Result<Option<CString>> {
        if self.namespace.is_empty() {
            Ok(None)
        } else {
            c_name("namespace", &self.namespace).map(Some)
        }
    }

    pub(crate) fn c_image(&self) -> Result<CString> {
        c_name("image", &self.image)
    }

    pub(crate) fn c_snap(&self) -> Result<Option<CString>> {
        self.snap
            .as_deref()
            .map(|s| c_name("snapshot", s))
            .transpose()
    }
}

/// Pool, namespace, image and snapshot names: not empty, no NUL, and no
/// `/` or `@` (the separators of `pool/ns/image@snap`, as in the rbd CLI).
pub fn check_name(kind: &'static str, name: &str) -> Result<()> {
    let why = if name.is_empty() {
        "empty"
    } else if name.contains('\0') {
        "contains a NUL byte"
    } else if name.contains('/') {
        "contains '/'"
    } else if name.contains('@') {
        "contains '@'"
    } else {
        return Ok(());
    };
    Err(Error::InvalidName {
        kind,
        name: name.to_string(),
        why,
    })
}

pub(crate) fn c_name(kind: &'static str, name: &str) -> Result<CString> {
    check_name(kind, name)?;
    crate::sys::cstring(name).ok_or(Error::InvalidName {
        kind,
        name: name.to_string(),
        why: "contains a NUL byte",
    })
}

impl fmt::Display for ImageSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/", self.pool)?;
        if !self.namespace.is_empty() {
            write!(f, "{}/", self.namespace)?;
        }
        f.write_str(&self.image)?;
        if let Some(s) = &self.snap {
            write!(f, "@{s}")?;
        }
        Ok(())
    }
}

impl FromStr for ImageSpec {
    type Err = Error;

    /// `pool/image`, `pool/image@snap`, `pool/ns/image[@snap]`.
    fn from_str(s: &str) -> Result<ImageSpec> {
        let (path, snap) = match s.split_once('@') {
            Some((p, snap)) => (p, Some(snap.to_string())),
            None => (s, None),
        };
        let parts: Vec<&str> = path.split('/').collect();
        let spec = match parts.as_slice() {
            [pool, image] => ImageSpec {
                snap,
                ..ImageSpec::new(*pool, *image)
            },
            [_, "", _] => {
                return Err(Error::InvalidName {
                    kind: "namespace",
                    name: s.to_string(),
                    why: "empty (write pool/image for the default namespace)",
                })
            }
            [pool, ns, image] => ImageSpec {
                snap,
                ..ImageSpec::new(*pool, *image).in_namespace(*ns)
            },
            _ => {
                return Err(Error::InvalidName {
                    kind: "image spec",
                    name: s.to_string(),
                    why: "expected pool/image[@snap] or pool/namespace/image[@snap]",
                })
            }
        };
        spec.validate()?;
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_parse_round_trip() {
        for s in [
            "tpl/base",
            "tpl/base@tpl",
            "tpl/ns1/web1",
            "tpl/ns1/web1@s-1",
        ] {
            let spec: ImageSpec = s.parse().unwrap();
            assert_eq!(spec.to_string(), s);
        }
        let spec: ImageSpec = "p/ns/i@s".parse().unwrap();
        assert_eq!(
            spec,
            ImageSpec {
                pool: "p".into(),
                namespace: "ns".into(),
                image: "i".into(),
                snap: Some("s".into())
            }
        );
        assert_eq!(ImageSpec::new("p", "i").at("s").to_string(), "p/i@s");
        assert_eq!(ImageSpec::new("p", "i").at("s").head().to_string(), "p/i");
        assert_eq!(
            ImageSpec::new("p", "i")
                .in_namespace("n")
                .sibling("j")
                .to_string(),
            "p/n/j"
        );
    }

    #[test]
    fn bad_specs_are_refused_with_the_part_named() {
        for s in ["base", "a/b/c/d", "p/", "/i", "p/i@", "p/i@a@b", "p//i"] {
            assert!(s.parse::<ImageSpec>().is_err(), "{s} parsed");
        }
        let e = ImageSpec::new("p", "a\0b").validate().unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid image name \"a\\0b\": contains a NUL byte"
        );
        let e = ImageSpec::new("p", "i").at("x/y").validate().unwrap_err();
        assert!(e.to_string().starts_with("invalid snapshot name"), "{e}");
    }
}
