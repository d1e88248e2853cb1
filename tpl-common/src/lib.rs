//! tpl-common: everything two or more tpl tools need — the record, the CLI harness, the libvirt session, domain XML, metadata, a domain's own files, locks, journals, names and images.

pub mod child;
pub mod cli;
pub mod dependents;
pub mod dhcp;
pub mod dom;
pub mod domxml;
pub mod error;
pub mod freeze;
pub mod fsutil;
pub mod host;
pub mod hostname;
pub mod image;
pub mod journal;
pub mod locality;
pub mod lock;
pub mod meta;
pub mod names;
pub mod overlays;
pub mod ownfiles;
pub mod rbd;
pub mod rbdclone;
pub mod record;
pub mod seed;
pub mod session;
pub mod signals;
pub mod snapshot;
pub mod state;
pub mod text;
pub mod uri;
pub mod volume;

pub use error::{Error, Result};
pub use record::Record;
pub use session::Session;

/// The current time as RFC 3339 in UTC, to the second: what metadata and history record.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}
