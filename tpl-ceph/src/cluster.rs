//! The connection: one `rados_t` per [`Cluster`], reused for every
//! operation (pools, images, mon commands), and a second one, made on first
//! use, for read-only opens that only look (see [`Cluster::reader`]).

use std::ffi::CString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Op, Result};
use crate::spec::c_name;
use crate::sys;

/// How to reach the cluster. `Default` = the `rbd` CLI's defaults: user
/// `admin`, ceph.conf from `$CEPH_CONF` else /etc/ceph/ceph.conf (then
/// ~/.ceph/config, ./ceph.conf), the keyring that conf names, plus
/// `$CEPH_ARGS`; and a 15 s connect timeout.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// cephx user without `client.` (a leading `client.` is accepted).
    pub user: String,
    /// ceph.conf to read instead of librados' search.
    pub conf: Option<PathBuf>,
    /// keyring to use instead of the one the conf names.
    pub keyring: Option<PathBuf>,
    /// Bound on reaching the monitors and on each monitor command
    /// (`client_mount_timeout`, `rados_mon_op_timeout`). OSD operations
    /// have no timeout (as in qemu and the rbd CLI): a long flatten or
    /// copy is not cut short.
    pub timeout: Duration,
    /// Leave `log_to_stderr`/`err_to_stderr` to the conf. When false (the
    /// default) both are forced off, so librados/librbd never write on the
    /// caller's stderr (tpl reports errors itself); their log still goes to
    /// `log_file` if the conf sets one. (librados prints one line on its
    /// own when no monitor address is configured, whatever this says.)
    pub library_log_to_stderr: bool,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            user: "admin".into(),
            conf: None,
            keyring: None,
            timeout: Duration::from_secs(15),
            library_log_to_stderr: false,
        }
    }
}

impl ConnectOptions {
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = user.into();
        self
    }
    pub fn conf(mut self, path: impl Into<PathBuf>) -> Self {
        self.conf = Some(path.into());
        self
    }
    pub fn keyring(mut self, path: impl Into<PathBuf>) -> Self {
        self.keyring = Some(path.into());
        self
    }
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }
}

/// A monitor address from the cluster's monmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonAddr {
    /// Monitor name (`a`).
    pub name: String,
    /// Messenger protocol: `v1` (port 6789 by default; what libvirt's
    /// `<host port=...>` and qemu use) or `v2` (3300).
    pub protocol: String,
    pub addr: SocketAddr,
}

/// A connected cluster handle, `Send` and `Sync`: several threads may work
/// through one connection at once (each operation makes its own I/O context;
/// an [`crate::Image`] stays with the thread that opened it). Dropping it
/// shuts the connection down; every [`crate::Image`] borrows it and is closed
/// first.
pub struct Cluster {
    pub(crate) rados: sys::Rados,
    /// The second connection read-only looks go through, made on first use: see
    /// [`Cluster::reader`].
    reader: std::sync::OnceLock<sys::Rados>,
    opts: ConnectOptions,
    user: String,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

fn c_path(what: &str, p: &std::path::Path) -> Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(p.as_os_str().as_bytes()).map_err(|_| Error::InvalidArgument {
        op: Op(format!("connect to Ceph: {what} {}", p.display())),
        why: "path contains a NUL byte".into(),
    })
}

impl Cluster {
    /// Connects (reads the conf, authenticates, fetches the maps). Fails
    /// after `opts.timeout` when no monitor answers.
    pub fn connect(opts: &ConnectOptions) -> Result<Cluster> {
        let (rados, user) = connect_rados(opts, None)?;
        Ok(Cluster {
            rados,
            reader: std::sync::OnceLock::new(),
            opts: opts.clone(),
            user,
        })
    }

    /// The connection read-only opens that only look (info, snapshots, clones, watchers,
    /// metadata, allocation, reads) go through: one with a single librados io_context
    /// thread, made on first use.
    ///
    /// librbd 16.2.15 (Debian 12) completes an open (or any image state change) to the
    /// caller and then, on the same io_context thread, locks the image's state again;
    /// a close the caller makes at once can run to its end on librados' other
    /// io_context thread meanwhile and free that state first: the process aborts
    /// ("std::system_error: Invalid argument"). Seen on clones under CPU load, in about
    /// 1 of 20 short tool runs; one io_context thread serialises the two (0 aborts in
    /// 1600 such runs). The main connection keeps librados' two threads: with one,
    /// librbd deadlocks in operations that wait on librados from inside a handler
    /// (`rbd_snap_unprotect` hung that way).
    pub(crate) fn reader(&self) -> Result<&sys::Rados> {
        if let Some(r) = self.reader.get() {
            return Ok(r);
        }
        let (r, _) = connect_rados(&self.opts, Some(1))?;
        // Two threads may connect at once; the first stored wins, the other shuts down.
        Ok(self.reader.get_or_init(|| r))
    }
}

/// A connected `rados_t` for `opts`, with `io_threads` librados io_context threads
/// (librados' default when None); and the cephx user without `client.`.
fn connect_rados(opts: &ConnectOptions, io_threads: Option<u32>) -> Result<(sys::Rados, String)> {
    let user = opts
        .user
        .strip_prefix("client.")
        .unwrap_or(&opts.user)
        .to_string();
    let c_user = c_name("user", &user)?;
    let op0 = format!("connect to Ceph as client.{user}");
    sys::load().map_err(|why| Error::Unavailable { why })?;
    let rados = sys::Rados::create(&c_user).map_err(|e| Error::from_errno(e, op0.clone(), None))?;

    let conf_desc = match &opts.conf {
        Some(p) => {
            let c = c_path("conf", p)?;
            rados.conf_read_file(Some(&c)).map_err(|e| {
                Error::from_errno(e, format!("{op0}: read ceph config {}", p.display()), None)
            })?;
            p.display().to_string()
        }
        None => match rados.conf_read_file(None) {
            Ok(()) => match std::env::var("CEPH_CONF") {
                Ok(c) if !c.is_empty() => c,
                _ => "default search".into(),
            },
            // like the rbd CLI: go on with defaults (+ CEPH_ARGS)
            Err(libc::ENOENT) => match std::env::var("CEPH_CONF") {
                Ok(c) if !c.is_empty() => format!("CEPH_CONF={c} not found"),
                _ => "none found ($CEPH_CONF unset, no /etc/ceph/ceph.conf)".into(),
            },
            Err(e) => {
                return Err(Error::from_errno(
                    e,
                    format!("{op0}: read ceph config"),
                    None,
                ))
            }
        },
    };
    rados
        .conf_parse_env()
        .map_err(|e| Error::from_errno(e, format!("{op0}: parse $CEPH_ARGS"), None))?;

    let set = |k: &str, v: &str| -> Result<()> {
        let (ck, cv) = (
            CString::new(k).unwrap_or_default(),
            CString::new(v).unwrap_or_default(),
        );
        rados
            .conf_set(&ck, &cv)
            .map_err(|e| Error::from_errno(e, format!("{op0}: set {k} = {v}"), None))
    };
    if let Some(k) = &opts.keyring {
        let ck = c_path("keyring", k)?;
        rados.conf_set(c"keyring", &ck).map_err(|e| {
            Error::from_errno(e, format!("{op0}: set keyring = {}", k.display()), None)
        })?;
    }
    let secs = opts.timeout.as_secs().max(1).to_string();
    set("client_mount_timeout", &secs)?;
    set("rados_mon_op_timeout", &secs)?;
    if let Some(n) = io_threads {
        set("librados_thread_count", &n.to_string())?;
    }
    if !opts.library_log_to_stderr {
        set("log_to_stderr", "false")?;
        set("err_to_stderr", "false")?;
    }

    let mon_host = rados.conf_get(c"mon_host").unwrap_or_default();
    let op = format!(
        "{op0} (conf: {conf_desc}; mon_host: {})",
        if mon_host.is_empty() {
            "unset"
        } else {
            &mon_host
        }
    );
    rados.connect().map_err(|e| {
        let hint = match e {
            libc::ETIMEDOUT => {
                Some("no monitor answered in time: is the cluster up and mon_host right?")
            }
            libc::ENOENT if mon_host.is_empty() => Some(
                "no monitor address: set CEPH_CONF to a ceph.conf with mon_host, or pass a conf",
            ),
            libc::ENOENT => {
                Some("no key for this user: the conf names no readable keyring, pass one")
            }
            libc::EACCES | libc::EPERM => Some("cephx refused this user's key"),
            _ => None,
        };
        Error::from_errno(e, op.clone(), hint)
    })?;
    Ok((rados, user))
}

impl Cluster {
    /// The cephx user (without `client.`).
    pub fn user(&self) -> &str {
        &self.user
    }

    /// This connection's global id: the `client.<id>` that Ceph shows for its watches
    /// ([`crate::Watcher::id`]), given by the monitor and never reused. A journal that
    /// notes it lets a later run prove that a watch is a dead run's.
    pub fn client_id(&self) -> u64 {
        self.rados.instance_id()
    }

    /// The cluster's fsid (uuid string).
    pub fn fsid(&self) -> Result<String> {
        self.rados
            .fsid()
            .map_err(|e| Error::from_errno(e, "get cluster fsid", None))
    }

    /// A config value as this client sees it (e.g. `mon_host`).
    pub fn conf_get(&self, option: &str) -> Result<String> {
        let c = c_name("config option", option)?;
        self.rados
            .conf_get(&c)
            .map_err(|e| Error::from_errno(e, format!("get config option {option}"), None))
    }

    /// Runs one monitor command (JSON, as `ceph` sends it); returns its
    /// output. The mon's status text is in the error message on failure.
    pub fn mon_command(&self, cmd: &serde_json::Value) -> Result<Vec<u8>> {
        self.mon_command_as(&format!("mon command {cmd}"), cmd)
    }

    fn mon_command_as(&self, op: &str, cmd: &serde_json::Value) -> Result<Vec<u8>> {
        let c = CString::new(cmd.to_string()).map_err(|_| Error::InvalidArgument {
            op: Op(op.into()),
            why: "command contains a NUL byte".into(),
        })?;
        self.rados
            .mon_command(&c)
            .map(|(out, _)| out)
            .map_err(|(e, status)| {
                let op = if status.trim().is_empty() {
                    op.to_string()
                } else {
                    format!("{op} ({})", status.trim())
                };
                Error::from_errno(e, op, None)
            })
    }

    /// The monitors' addresses from the monmap (`mon dump`), to compare a
    /// domain disk's `<host name= port=>` with this cluster.
    pub fn mon_addrs(&self) -> Result<Vec<MonAddr>> {
        let out = self.mon_command(&serde_json::json!({"prefix": "mon dump", "format": "json"}))?;
        let bad = |why: String| Error::BadReply {
            op: Op("mon dump".into()),
            why,
        };
        let v: serde_json::Value = serde_json::from_slice(&out).map_err(|e| bad(e.to_string()))?;
        let mut addrs = Vec::new();
        for mon in v["mons"]
            .as_array()
            .ok_or_else(|| bad("no \"mons\" array".into()))?
        {
            let name = mon["name"].as_str().unwrap_or_default().to_string();
            for a in mon["public_addrs"]["addrvec"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let (Some(proto), Some(addr)) = (a["type"].as_str(), a["addr"].as_str()) else {
                    continue;
                };
                let addr = addr
                    .parse()
                    .map_err(|_| bad(format!("monitor address {addr:?}")))?;
                addrs.push(MonAddr {
                    name: name.clone(),
                    protocol: proto.to_string(),
                    addr,
                });
            }
        }
        Ok(addrs)
    }

    /// Whether a pool of that name exists.
    pub fn pool_exists(&self, pool: &str) -> Result<bool> {
        let c = c_name("pool", pool)?;
        match self.rados.pool_lookup(&c) {
            Ok(_) => Ok(true),
            Err(libc::ENOENT) => Ok(false),
            Err(e) => Err(Error::from_errno(e, format!("look up pool {pool}"), None)),
        }
    }

    /// Names of all pools.
    pub fn pools(&self) -> Result<Vec<String>> {
        self.rados
            .pool_list()
            .map_err(|e| Error::from_errno(e, "list pools", None))
    }

    /// Creates a replicated pool with `pg_num` placement groups and
    /// initialises it for RBD (`rbd pool init`). `AlreadyExists` if it
    /// exists. For tests and set-up; tpl itself never creates pools.
    pub fn pool_create(&self, pool: &str, pg_num: u32) -> Result<()> {
        let c = c_name("pool", pool)?;
        if self.pool_exists(pool)? {
            return Err(Error::from_errno(
                libc::EEXIST,
                format!("create pool {pool}"),
                None,
            ));
        }
        let cmd = serde_json::json!({
            "prefix": "osd pool create", "pool": pool, "pg_num": pg_num, "pgp_num": pg_num,
        });
        self.mon_command_as(&format!("create pool {pool}"), &cmd)?;
        let io = self
            .rados
            .ioctx(&c, None)
            .map_err(|e| Error::from_errno(e, format!("open pool {pool}"), None))?;
        io.rbd_pool_init()
            .map_err(|e| Error::from_errno(e, format!("rbd pool init {pool}"), None))
    }

    /// Deletes a pool and everything in it. Needs `mon_allow_pool_delete`.
    pub fn pool_delete(&self, pool: &str) -> Result<()> {
        let c = c_name("pool", pool)?;
        self.rados.pool_delete(&c).map_err(|e| {
            let hint = match e {
                libc::EPERM => {
                    Some("the monitors refuse pool deletion: set mon_allow_pool_delete = true")
                }
                _ => None,
            };
            Error::from_errno(e, format!("delete pool {pool}"), hint)
        })
    }

    pub(crate) fn ioctx(&self, pool: &str, namespace: &str) -> Result<sys::IoCtx<'_>> {
        let cp = c_name("pool", pool)?;
        let cn = if namespace.is_empty() {
            None
        } else {
            Some(c_name("namespace", namespace)?)
        };
        self.rados.ioctx(&cp, cn.as_deref()).map_err(|e| {
            let what = if namespace.is_empty() {
                pool.to_string()
            } else {
                format!("{pool}/{namespace}")
            };
            Error::from_errno(e, format!("open pool {what}"), None)
        })
    }
}

/// Versions of the librados and librbd loaded, e.g. `librados 3.0.0,
/// librbd 1.16.0` (Ceph 16.2 pacific), loading them if need be; or why they cannot be.
pub fn library_versions() -> Result<String> {
    let ((a, b, c), (d, e, f)) =
        sys::library_versions().map_err(|why| Error::Unavailable { why })?;
    Ok(format!("librados {a}.{b}.{c}, librbd {d}.{e}.{f}"))
}
