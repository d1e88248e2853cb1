//! Clones defined on another hypervisor (`--to URI`): the libvirt secret their RBD disks authenticate with made there when it is missing, with the same UUID and key, and never overwritten.

use tpl_common::error::{Error, Result};
use tpl_common::record::RbdSource;
use tpl_common::session::Session;
use tpl_common::text::shown;

/// Make sure the target hypervisor has the secret an RBD disk names, holding the same key
/// as here: defined from this side's definition (same UUID and usage) when it is missing;
/// a secret there with another key is refused, never overwritten.
pub fn ensure_secret(src: &Session, dst: &Session, disk: &RbdSource) -> Result<()> {
    let Some(uuid) = disk.secret.as_deref() else {
        return Ok(());
    };
    let key = key_here(src, uuid, disk)?;
    match dst.conn.lookup_secret_by_uuid_string(uuid) {
        Ok(there) => match there.value(0) {
            Ok(v) if v == key => Ok(()),
            Ok(_) => Err(Error::refused(
                format!("cannot use the secret {uuid} on {}", shown(&dst.uri)),
                format!(
                    "it holds another key than the secret of the same UUID on {}; tpl never \
                     overwrites a secret: set it there yourself (virsh secret-set-value)",
                    shown(&src.uri)
                ),
            )),
            // A private secret: its value cannot be read back, nor is it tpl's to change.
            Err(_) => Ok(()),
        },
        Err(_) => {
            let here = src.conn.lookup_secret_by_uuid_string(uuid).map_err(|e| {
                Error::libvirt(
                    format!("cannot read the secret {uuid} on {}", shown(&src.uri)),
                    e,
                )
            })?;
            let xml = here.xml_desc(0).map_err(|e| {
                Error::libvirt(
                    format!("cannot read the secret {uuid} on {}", shown(&src.uri)),
                    e,
                )
            })?;
            let made = dst.conn.define_secret_xml(&xml, 0).map_err(|e| {
                Error::libvirt(
                    format!("cannot define the secret {uuid} on {}", shown(&dst.uri)),
                    e,
                )
            })?;
            made.set_value(&key, 0).map_err(|e| {
                let _ = made.undefine();
                Error::libvirt(
                    format!("cannot set the secret {uuid} on {}", shown(&dst.uri)),
                    e,
                )
            })
        }
    }
}

/// The key the secret holds here; from Ceph (the user's key) when the secret is private.
fn key_here(src: &Session, uuid: &str, disk: &RbdSource) -> Result<Vec<u8>> {
    if let Ok(v) = src
        .conn
        .lookup_secret_by_uuid_string(uuid)
        .and_then(|s| s.value(0))
    {
        return Ok(v);
    }
    src.ceph.user_key(disk)
}
