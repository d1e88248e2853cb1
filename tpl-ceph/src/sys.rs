//! The only module that touches librados and librbd.
//!
//! It holds hand-written declarations of exactly the C functions tpl-ceph
//! uses, resolved from librbd when a tool first connects to Ceph ([`load`]: a
//! run that meets no RBD disk never loads librbd and librados), and thin RAII
//! handles whose methods are safe and return `Result<T, Errno>` with a
//! positive errno. Everything above this module is safe code and turns an
//! errno into a typed [`crate::Error`]. The tests below check the
//! declarations against the installed `rados/librados.h` and `rbd/librbd.h`:
//! every function's type (`function_signatures_match_the_c_headers`, by gcc
//! at compile time) and every struct's layout
//! (`abi_layouts_match_the_c_headers`).
//!
//! Lifetimes encode the C ownership rules: an [`IoCtx`] borrows its
//! [`Rados`], an [`Image`] owns the `IoCtx` it was opened with (closed after
//! the image), so no handle can outlive the cluster handle it came from.
//! The cluster handle is `Send` and `Sync` (librados is thread-safe, and every
//! operation makes its own I/O context); the I/O contexts and images are
//! neither (they hold raw pointers): each stays with the thread that made it.
#![allow(unsafe_code)]
#![warn(clippy::undocumented_unsafe_blocks)]
#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::marker::PhantomData;
use std::ops::ControlFlow;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// A positive errno value as returned (negated) by librados/librbd.
pub(crate) type Errno = i32;

type rados_t = *mut c_void;
type rados_ioctx_t = *mut c_void;
type rbd_image_t = *mut c_void;
type rbd_image_options_t = *mut c_void;
type librbd_progress_fn_t = extern "C" fn(offset: u64, total: u64, ptr: *mut c_void) -> c_int;
type diff_cb_t = extern "C" fn(offset: u64, len: usize, exists: c_int, arg: *mut c_void) -> c_int;

/// `rbd_image_info_t`
#[repr(C)]
struct rbd_image_info_t {
    size: u64,
    obj_size: u64,
    num_objs: u64,
    order: c_int,
    block_name_prefix: [c_char; 24],
    parent_pool: i64,
    parent_name: [c_char; 96],
}

/// `rbd_image_spec_t`
#[repr(C)]
struct rbd_image_spec_t {
    id: *mut c_char,
    name: *mut c_char,
}

/// `rbd_linked_image_spec_t`
#[repr(C)]
struct rbd_linked_image_spec_t {
    pool_id: i64,
    pool_name: *mut c_char,
    pool_namespace: *mut c_char,
    image_id: *mut c_char,
    image_name: *mut c_char,
    trash: bool,
}

/// `rbd_snap_spec_t` (`namespace_type` is the C enum `rbd_snap_namespace_type_t`)
#[repr(C)]
struct rbd_snap_spec_t {
    id: u64,
    namespace_type: c_int,
    name: *mut c_char,
}

/// `rbd_snap_info_t`
#[repr(C)]
struct rbd_snap_info_t {
    id: u64,
    size: u64,
    name: *const c_char,
}

/// `rbd_image_watcher_t`
#[repr(C)]
struct rbd_image_watcher_t {
    addr: *mut c_char,
    id: i64,
    cookie: u64,
}

// librados/librbd enum values used here (librbd.h)
const RBD_IMAGE_OPTION_FEATURES: c_int = 1;
const RBD_IMAGE_OPTION_ORDER: c_int = 2;

/// The library loaded at the first connection to Ceph. librbd needs librados (its
/// DT_NEEDED), so the dynamic loader brings both, and every symbol below resolves through
/// this one handle. Loaded, never linked: a tool run that meets no RBD disk does not map
/// them (30 MiB of peak RSS and some 60 shared objects, measured in issue 19).
pub(crate) const LIBRBD: &str = "librbd.so.1";

/// Declares the C functions tpl-ceph calls: a table of pointers resolved from
/// [`LIBRBD`] by [`load`], and for each function an `unsafe fn` of the same name and
/// signature that calls through the table, so the code below reads as it would with an
/// `extern "C"` block.
macro_rules! ceph_api {
    ( $( fn $name:ident ( $( $arg:ident : $ty:ty ),* $(,)? ) $( -> $ret:ty )? ; )* ) => {
        struct Api {
            $( $name: unsafe extern "C" fn( $( $ty ),* ) $( -> $ret )?, )*
        }

        impl Api {
            /// Every function of the table, or the first that is missing.
            ///
            /// # Safety
            /// `lib` is librbd, whose symbols have the prototypes declared here.
            unsafe fn resolve(lib: &libloading::Library) -> Result<Api, String> {
                Ok(Api {
                    $( $name: {
                        let name = concat!(stringify!($name), "\0");
                        // SAFETY: the type is the C prototype from librados.h / librbd.h.
                        let f = unsafe {
                            lib.get::<unsafe extern "C" fn( $( $ty ),* ) $( -> $ret )?>(
                                name.as_bytes(),
                            )
                        }
                        .map_err(|e| format!("{LIBRBD} has no {}: {e}", stringify!($name)))?;
                        *f
                    }, )*
                })
            }
        }

        /// Each function's name, parameter types and return type as declared here, for
        /// the test that checks them against the C headers.
        #[cfg(test)]
        const SIGNATURES: &[(&str, &[&str], &str)] = &[
            $( (
                stringify!($name),
                &[ $( stringify!($ty) ),* ],
                concat!("", $( stringify!($ret) )?),
            ), )*
        ];

        $(
            #[allow(clippy::too_many_arguments)]
            unsafe fn $name( $( $arg : $ty ),* ) $( -> $ret )? {
                // SAFETY: the caller keeps the C function's contract, as with a direct call.
                unsafe { (api().$name)( $( $arg ),* ) }
            }
        )*
    };
}

/// The library and its resolved table, or why they could not be loaded: tried once.
static LOADED: std::sync::OnceLock<Result<(libloading::Library, Api), String>> =
    std::sync::OnceLock::new();

/// Loads librados and librbd, once; the error says what the dynamic loader said.
pub(crate) fn load() -> Result<(), String> {
    LOADED
        .get_or_init(|| {
            // SAFETY: loading runs librbd's and librados' initialisers, which set up their
            // own state only; the handle is kept for the life of the process.
            let lib = unsafe { libloading::Library::new(LIBRBD) }.map_err(|e| e.to_string())?;
            // SAFETY: `lib` is librbd.
            let api = unsafe { Api::resolve(&lib) }?;
            Ok((lib, api))
        })
        .as_ref()
        .map(drop)
        .map_err(Clone::clone)
}

/// The table. Every handle of this module is made after a successful [`load`] (the
/// cluster's by [`Rados::create`]), so a call through it finds the table loaded.
fn api() -> &'static Api {
    match LOADED.get() {
        Some(Ok((_, api))) => api,
        _ => unreachable!("a librbd function was called before tpl_ceph::sys::load succeeded"),
    }
}

ceph_api! {
    fn rados_version(major: *mut c_int, minor: *mut c_int, extra: *mut c_int);
    fn rados_create(cluster: *mut rados_t, id: *const c_char) -> c_int;
    fn rados_conf_read_file(cluster: rados_t, path: *const c_char) -> c_int;
    fn rados_conf_parse_env(cluster: rados_t, var: *const c_char) -> c_int;
    fn rados_conf_set(cluster: rados_t, option: *const c_char, value: *const c_char) -> c_int;
    fn rados_conf_get(
        cluster: rados_t,
        option: *const c_char,
        buf: *mut c_char,
        len: usize,
    ) -> c_int;
    fn rados_connect(cluster: rados_t) -> c_int;
    fn rados_shutdown(cluster: rados_t);
    fn rados_cluster_fsid(cluster: rados_t, buf: *mut c_char, len: usize) -> c_int;
    fn rados_get_instance_id(cluster: rados_t) -> u64;
    fn rados_pool_lookup(cluster: rados_t, pool_name: *const c_char) -> i64;
    fn rados_pool_list(cluster: rados_t, buf: *mut c_char, len: usize) -> c_int;
    fn rados_pool_delete(cluster: rados_t, pool_name: *const c_char) -> c_int;
    fn rados_ioctx_create(
        cluster: rados_t,
        pool_name: *const c_char,
        ioctx: *mut rados_ioctx_t,
    ) -> c_int;
    fn rados_ioctx_destroy(io: rados_ioctx_t);
    fn rados_ioctx_set_namespace(io: rados_ioctx_t, nspace: *const c_char);
    fn rados_mon_command(
        cluster: rados_t,
        cmd: *mut *const c_char,
        cmdlen: usize,
        inbuf: *const c_char,
        inbuflen: usize,
        outbuf: *mut *mut c_char,
        outbuflen: *mut usize,
        outs: *mut *mut c_char,
        outslen: *mut usize,
    ) -> c_int;
    fn rados_buffer_free(buf: *mut c_char);

    fn rbd_version(major: *mut c_int, minor: *mut c_int, extra: *mut c_int);
    fn rbd_pool_init(io: rados_ioctx_t, force: bool) -> c_int;
    fn rbd_list2(io: rados_ioctx_t, images: *mut rbd_image_spec_t, max_images: *mut usize)
        -> c_int;
    fn rbd_image_spec_list_cleanup(images: *mut rbd_image_spec_t, num_images: usize);
    fn rbd_image_options_create(opts: *mut rbd_image_options_t);
    fn rbd_image_options_destroy(opts: rbd_image_options_t);
    fn rbd_image_options_set_uint64(
        opts: rbd_image_options_t,
        optname: c_int,
        optval: u64,
    ) -> c_int;
    fn rbd_create4(
        io: rados_ioctx_t,
        name: *const c_char,
        size: u64,
        opts: rbd_image_options_t,
    ) -> c_int;
    fn rbd_clone3(
        p_ioctx: rados_ioctx_t,
        p_name: *const c_char,
        p_snapname: *const c_char,
        c_ioctx: rados_ioctx_t,
        c_name: *const c_char,
        c_opts: rbd_image_options_t,
    ) -> c_int;
    fn rbd_remove(io: rados_ioctx_t, name: *const c_char) -> c_int;
    fn rbd_rename(
        src_io_ctx: rados_ioctx_t,
        srcname: *const c_char,
        destname: *const c_char,
    ) -> c_int;
    fn rbd_open(
        io: rados_ioctx_t,
        name: *const c_char,
        image: *mut rbd_image_t,
        snap_name: *const c_char,
    ) -> c_int;
    fn rbd_open_read_only(
        io: rados_ioctx_t,
        name: *const c_char,
        image: *mut rbd_image_t,
        snap_name: *const c_char,
    ) -> c_int;
    fn rbd_close(image: rbd_image_t) -> c_int;
    fn rbd_stat(image: rbd_image_t, info: *mut rbd_image_info_t, infosize: usize) -> c_int;
    fn rbd_get_features(image: rbd_image_t, features: *mut u64) -> c_int;
    fn rbd_get_id(image: rbd_image_t, id: *mut c_char, id_len: usize) -> c_int;
    fn rbd_get_parent(
        image: rbd_image_t,
        parent_image: *mut rbd_linked_image_spec_t,
        parent_snap: *mut rbd_snap_spec_t,
    ) -> c_int;
    fn rbd_linked_image_spec_cleanup(image: *mut rbd_linked_image_spec_t);
    fn rbd_snap_spec_cleanup(snap: *mut rbd_snap_spec_t);
    fn rbd_list_children3(
        image: rbd_image_t,
        images: *mut rbd_linked_image_spec_t,
        max_images: *mut usize,
    ) -> c_int;
    fn rbd_linked_image_spec_list_cleanup(images: *mut rbd_linked_image_spec_t, num_images: usize);
    fn rbd_snap_list(
        image: rbd_image_t,
        snaps: *mut rbd_snap_info_t,
        max_snaps: *mut c_int,
    ) -> c_int;
    fn rbd_snap_list_end(snaps: *mut rbd_snap_info_t);
    fn rbd_snap_is_protected(
        image: rbd_image_t,
        snap_name: *const c_char,
        is_protected: *mut c_int,
    ) -> c_int;
    fn rbd_snap_create(image: rbd_image_t, snapname: *const c_char) -> c_int;
    fn rbd_resize(image: rbd_image_t, size: u64) -> c_int;
    fn rbd_snap_remove(image: rbd_image_t, snapname: *const c_char) -> c_int;
    fn rbd_snap_protect(image: rbd_image_t, snap_name: *const c_char) -> c_int;
    fn rbd_snap_unprotect(image: rbd_image_t, snap_name: *const c_char) -> c_int;
    fn rbd_flatten_with_progress(
        image: rbd_image_t,
        cb: librbd_progress_fn_t,
        cbdata: *mut c_void,
    ) -> c_int;
    fn rbd_deep_copy_with_progress(
        image: rbd_image_t,
        dest_io_ctx: rados_ioctx_t,
        destname: *const c_char,
        dest_opts: rbd_image_options_t,
        cb: librbd_progress_fn_t,
        cbdata: *mut c_void,
    ) -> c_int;
    fn rbd_copy_with_progress4(
        image: rbd_image_t,
        dest_p: rados_ioctx_t,
        destname: *const c_char,
        dest_opts: rbd_image_options_t,
        cb: librbd_progress_fn_t,
        cbdata: *mut c_void,
        sparse_size: usize,
    ) -> c_int;
    fn rbd_watchers_list(
        image: rbd_image_t,
        watchers: *mut rbd_image_watcher_t,
        max_watchers: *mut usize,
    ) -> c_int;
    fn rbd_watchers_list_cleanup(watchers: *mut rbd_image_watcher_t, num_watchers: usize);
    fn rbd_list_lockers(
        image: rbd_image_t,
        exclusive: *mut c_int,
        tag: *mut c_char,
        tag_len: *mut usize,
        clients: *mut c_char,
        clients_len: *mut usize,
        cookies: *mut c_char,
        cookies_len: *mut usize,
        addrs: *mut c_char,
        addrs_len: *mut usize,
    ) -> isize;
    fn rbd_break_lock(image: rbd_image_t, client: *const c_char, cookie: *const c_char) -> c_int;
    fn rbd_metadata_get(
        image: rbd_image_t,
        key: *const c_char,
        value: *mut c_char,
        val_len: *mut usize,
    ) -> c_int;
    fn rbd_metadata_set(image: rbd_image_t, key: *const c_char, value: *const c_char) -> c_int;
    fn rbd_metadata_remove(image: rbd_image_t, key: *const c_char) -> c_int;
    fn rbd_metadata_list(
        image: rbd_image_t,
        start: *const c_char,
        max: u64,
        keys: *mut c_char,
        key_len: *mut usize,
        values: *mut c_char,
        vals_len: *mut usize,
    ) -> c_int;
    fn rbd_diff_iterate2(
        image: rbd_image_t,
        fromsnapname: *const c_char,
        ofs: u64,
        len: u64,
        include_parent: u8,
        whole_object: u8,
        cb: diff_cb_t,
        arg: *mut c_void,
    ) -> c_int;
    fn rbd_read(image: rbd_image_t, ofs: u64, len: usize, buf: *mut c_char) -> isize;
    fn rbd_write(image: rbd_image_t, ofs: u64, len: usize, buf: *const c_char) -> isize;
    fn rbd_flush(image: rbd_image_t) -> c_int;
}

/// First buffer size (entries) for the librbd list calls. They do the
/// whole listing before they report ERANGE with the size needed, and
/// listing children opens every child: a first buffer that is too small
/// doubles the cost (measured: 2x for 50 clones).
const FIRST_LIST_CAPACITY: usize = 1024;

/// A librados/librbd return code: negative = -errno.
fn check(rc: c_int) -> Result<c_int, Errno> {
    if rc < 0 {
        Err(-rc)
    } else {
        Ok(rc)
    }
}

/// A C string owned by librados/librbd (may be NULL) as an owned `String`.
///
/// # Safety
/// `p` is NULL or points at a NUL-terminated string valid for this call.
unsafe fn owned(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: non-NULL and NUL-terminated by the caller's contract.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

/// NUL-separated strings in `buf[..len]` (librados/librbd list format).
fn split_nul(buf: &[u8]) -> Vec<String> {
    buf.split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

fn opt_ptr(s: Option<&CStr>) -> *const c_char {
    s.map_or(ptr::null(), CStr::as_ptr)
}

/// A library's `(major, minor, extra)`.
pub(crate) type Version = (i32, i32, i32);

/// The versions of the librados and librbd this process loads ([`load`]).
pub(crate) fn library_versions() -> Result<(Version, Version), String> {
    load()?;
    let (mut a, mut b, mut c) = (0, 0, 0);
    let (mut d, mut e, mut f) = (0, 0, 0);
    // SAFETY: both functions only write three ints through valid pointers.
    unsafe {
        rados_version(&mut a, &mut b, &mut c);
        rbd_version(&mut d, &mut e, &mut f);
    }
    Ok(((a, b, c), (d, e, f)))
}

// ------------------------------------------------------------------ cluster

/// A librados cluster handle (`rados_t`); shut down on drop.
pub(crate) struct Rados {
    ptr: rados_t,
}

// SAFETY: a `rados_t` may be used from several threads at once: librados locks
// its own state (thread-safe since v0.53, Ceph tracker #2525). What librados
// leaves to its callers is changing an I/O context's settings (namespace, snap
// context) from two threads; every operation here creates its own `IoCtx`,
// which is neither `Send` nor `Sync`. Configuration (`conf_set`) happens in
// `Cluster::connect`, before the handle is shared.
unsafe impl Send for Rados {}
// SAFETY: as for `Send` above.
unsafe impl Sync for Rados {}

impl Rados {
    /// `rados_create`: `id` is the user name without `client.`.
    /// Loads the libraries first ([`load`]; ELIBACC when they cannot be).
    pub(crate) fn create(id: &CStr) -> Result<Rados, Errno> {
        load().map_err(|_| libc::ELIBACC)?;
        let mut ptr: rados_t = ptr::null_mut();
        // SAFETY: `ptr` is a valid out-pointer, `id` a valid C string.
        check(unsafe { rados_create(&mut ptr, id.as_ptr()) })?;
        Ok(Rados { ptr })
    }

    /// `rados_conf_read_file`; `None` searches `$CEPH_CONF`, then
    /// /etc/ceph/ceph.conf, ~/.ceph/config, ./ceph.conf.
    pub(crate) fn conf_read_file(&self, path: Option<&CStr>) -> Result<(), Errno> {
        // SAFETY: live handle; path NULL or a valid C string.
        check(unsafe { rados_conf_read_file(self.ptr, opt_ptr(path)) }).map(drop)
    }

    /// `rados_conf_parse_env(NULL)`: options from `$CEPH_ARGS`.
    pub(crate) fn conf_parse_env(&self) -> Result<(), Errno> {
        // SAFETY: live handle; NULL selects CEPH_ARGS.
        check(unsafe { rados_conf_parse_env(self.ptr, ptr::null()) }).map(drop)
    }

    pub(crate) fn conf_set(&self, option: &CStr, value: &CStr) -> Result<(), Errno> {
        // SAFETY: live handle; both valid C strings.
        check(unsafe { rados_conf_set(self.ptr, option.as_ptr(), value.as_ptr()) }).map(drop)
    }

    pub(crate) fn conf_get(&self, option: &CStr) -> Result<String, Errno> {
        let mut buf = vec![0u8; 256];
        loop {
            // SAFETY: live handle; `buf` is writable for `buf.len()` bytes.
            let rc = unsafe {
                rados_conf_get(
                    self.ptr,
                    option.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            match check(rc) {
                Ok(_) => return Ok(cstr_in(&buf)),
                Err(libc::ENAMETOOLONG) if buf.len() < 1 << 20 => buf.resize(buf.len() * 4, 0),
                Err(e) => return Err(e),
            }
        }
    }

    pub(crate) fn connect(&self) -> Result<(), Errno> {
        // SAFETY: live, configured, not yet connected handle.
        check(unsafe { rados_connect(self.ptr) }).map(drop)
    }

    /// This connection's global id (`client.<id>`, as watchers show it).
    pub(crate) fn instance_id(&self) -> u64 {
        // SAFETY: connected handle; the call only reads it.
        unsafe { rados_get_instance_id(self.ptr) }
    }

    pub(crate) fn fsid(&self) -> Result<String, Errno> {
        let mut buf = [0u8; 64];
        // SAFETY: connected handle; `buf` writable for its length.
        let n = check(unsafe { rados_cluster_fsid(self.ptr, buf.as_mut_ptr().cast(), buf.len()) })?;
        let n = usize::try_from(n).unwrap_or(0).min(buf.len());
        Ok(cstr_in(&buf[..n]))
    }

    /// Pool id, or `ENOENT`.
    pub(crate) fn pool_lookup(&self, name: &CStr) -> Result<i64, Errno> {
        // SAFETY: connected handle; valid C string.
        let rc = unsafe { rados_pool_lookup(self.ptr, name.as_ptr()) };
        if rc < 0 {
            Err(i32::try_from(-rc).unwrap_or(libc::EIO))
        } else {
            Ok(rc)
        }
    }

    pub(crate) fn pool_list(&self) -> Result<Vec<String>, Errno> {
        let mut buf = vec![0u8; 4096];
        loop {
            // SAFETY: connected handle; `buf` writable for its length. The
            // return value is the length the full list needs.
            let need =
                check(unsafe { rados_pool_list(self.ptr, buf.as_mut_ptr().cast(), buf.len()) })?;
            let need = usize::try_from(need).unwrap_or(0);
            if need <= buf.len() {
                return Ok(split_nul(&buf[..need]));
            }
            buf.resize(need, 0);
        }
    }

    pub(crate) fn pool_delete(&self, name: &CStr) -> Result<(), Errno> {
        // SAFETY: connected handle; valid C string.
        check(unsafe { rados_pool_delete(self.ptr, name.as_ptr()) }).map(drop)
    }

    /// `rados_mon_command` with one JSON command. Ok: (output, status
    /// string); Err: (errno, status string, which holds the mon's reason).
    pub(crate) fn mon_command(&self, cmd: &CStr) -> Result<(Vec<u8>, String), (Errno, String)> {
        let mut cmds = [cmd.as_ptr()];
        let (mut out, mut outlen): (*mut c_char, usize) = (ptr::null_mut(), 0);
        let (mut outs, mut outslen): (*mut c_char, usize) = (ptr::null_mut(), 0);
        // SAFETY: connected handle; one valid command string; empty input
        // buffer; the four out-pointers are valid. librados allocates the
        // reply buffers, which are copied and freed with rados_buffer_free.
        let rc = unsafe {
            rados_mon_command(
                self.ptr,
                cmds.as_mut_ptr(),
                1,
                ptr::null(),
                0,
                &mut out,
                &mut outlen,
                &mut outs,
                &mut outslen,
            )
        };
        // SAFETY: each buffer is NULL or `len` bytes owned by librados.
        let take = |p: *mut c_char, len: usize| unsafe {
            if p.is_null() {
                Vec::new()
            } else {
                let v = std::slice::from_raw_parts(p.cast::<u8>(), len).to_vec();
                rados_buffer_free(p);
                v
            }
        };
        let out = take(out, outlen);
        let status = String::from_utf8_lossy(&take(outs, outslen)).into_owned();
        match check(rc) {
            Ok(_) => Ok((out, status)),
            Err(e) => Err((e, status)),
        }
    }

    /// An I/O context on `pool`, in `namespace` when given.
    pub(crate) fn ioctx(&self, pool: &CStr, namespace: Option<&CStr>) -> Result<IoCtx<'_>, Errno> {
        let mut io: rados_ioctx_t = ptr::null_mut();
        // SAFETY: connected handle; valid C string; valid out-pointer.
        check(unsafe { rados_ioctx_create(self.ptr, pool.as_ptr(), &mut io) })?;
        if let Some(ns) = namespace {
            // SAFETY: `io` was just created; valid C string.
            unsafe { rados_ioctx_set_namespace(io, ns.as_ptr()) };
        }
        Ok(IoCtx {
            ptr: io,
            _rados: PhantomData,
        })
    }
}

impl Drop for Rados {
    fn drop(&mut self) {
        // SAFETY: the handle came from rados_create and every IoCtx/Image
        // borrowing it is gone (lifetimes); shutdown is valid connected or not.
        unsafe { rados_shutdown(self.ptr) }
    }
}

/// The NUL-terminated prefix of `buf` as a String.
fn cstr_in(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

// ------------------------------------------------------------------ options

/// `rbd_image_options_t`, destroyed on drop.
struct ImageOptions {
    ptr: rbd_image_options_t,
}

impl ImageOptions {
    fn new(features: Option<u64>, order: Option<u8>) -> Result<ImageOptions, Errno> {
        let mut ptr: rbd_image_options_t = ptr::null_mut();
        // SAFETY: valid out-pointer.
        unsafe { rbd_image_options_create(&mut ptr) };
        let opts = ImageOptions { ptr };
        if let Some(f) = features {
            // SAFETY: live options handle.
            check(unsafe { rbd_image_options_set_uint64(opts.ptr, RBD_IMAGE_OPTION_FEATURES, f) })?;
        }
        if let Some(o) = order {
            // SAFETY: live options handle.
            check(unsafe {
                rbd_image_options_set_uint64(opts.ptr, RBD_IMAGE_OPTION_ORDER, u64::from(o))
            })?;
        }
        Ok(opts)
    }
}

impl Drop for ImageOptions {
    fn drop(&mut self) {
        // SAFETY: created by rbd_image_options_create, destroyed once.
        unsafe { rbd_image_options_destroy(self.ptr) }
    }
}

// ------------------------------------------------------------------ progress

/// What a progress callback tells the running operation.
pub(crate) type ProgressFn<'f> = dyn FnMut(u64, u64) -> ControlFlow<()> + Send + 'f;

/// State shared with [`progress_trampoline`]: librbd calls progress
/// callbacks from its own worker threads (flatten does, from the op work
/// queue), while the calling thread blocks in the C call; the Mutex
/// serialises calls, and a panic is caught there and re-raised here.
struct ProgressState<'a, 'f> {
    f: Mutex<&'a mut ProgressFn<'f>>,
    cancelled: Mutex<bool>,
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

extern "C" fn progress_trampoline(offset: u64, total: u64, data: *mut c_void) -> c_int {
    // SAFETY: `data` is the &ProgressState that `with_progress` passed to
    // librbd and keeps alive until the C call returned.
    let st = unsafe { &*data.cast::<ProgressState<'_, '_>>() };
    let mut cancelled = st.cancelled.lock().unwrap_or_else(|p| p.into_inner());
    if *cancelled {
        return -libc::ECANCELED;
    }
    let r = catch_unwind(AssertUnwindSafe(|| {
        let mut f = st.f.lock().unwrap_or_else(|p| p.into_inner());
        (*f)(offset, total)
    }));
    match r {
        Ok(ControlFlow::Continue(())) => 0,
        Ok(ControlFlow::Break(())) => {
            *cancelled = true;
            -libc::ECANCELED
        }
        Err(payload) => {
            *cancelled = true;
            *st.panic.lock().unwrap_or_else(|p| p.into_inner()) = Some(payload);
            -libc::ECANCELED
        }
    }
}

/// Runs `call(trampoline, data)` with `f` behind the trampoline; re-raises a
/// panic of `f`. Returns the C call's return code.
fn with_progress(
    f: &mut ProgressFn<'_>,
    call: impl FnOnce(librbd_progress_fn_t, *mut c_void) -> c_int,
) -> c_int {
    let st = ProgressState {
        f: Mutex::new(f),
        cancelled: Mutex::new(false),
        panic: Mutex::new(None),
    };
    let rc = call(progress_trampoline, ptr::from_ref(&st).cast_mut().cast());
    if let Some(p) = st.panic.into_inner().unwrap_or_else(|p| p.into_inner()) {
        resume_unwind(p);
    }
    rc
}

// ------------------------------------------------------------------ ioctx

/// A `rados_ioctx_t` on one pool (and namespace); destroyed on drop.
pub(crate) struct IoCtx<'r> {
    ptr: rados_ioctx_t,
    _rados: PhantomData<&'r Rados>,
}

impl Drop for IoCtx<'_> {
    fn drop(&mut self) {
        // SAFETY: created by rados_ioctx_create, destroyed once; images
        // opened on it own it and are closed first.
        unsafe { rados_ioctx_destroy(self.ptr) }
    }
}

/// One entry of `rbd_list_children3` / the parent of `rbd_get_parent`.
pub(crate) struct LinkedImage {
    pub pool_id: i64,
    pub pool_name: String,
    pub pool_namespace: String,
    pub image_id: String,
    pub image_name: String,
    pub trash: bool,
}

impl LinkedImage {
    /// # Safety
    /// The pointers in `s` are NULL or valid C strings.
    unsafe fn from_c(s: &rbd_linked_image_spec_t) -> LinkedImage {
        // SAFETY: forwarded contract.
        unsafe {
            LinkedImage {
                pool_id: s.pool_id,
                pool_name: owned(s.pool_name),
                pool_namespace: owned(s.pool_namespace),
                image_id: owned(s.image_id),
                image_name: owned(s.image_name),
                trash: s.trash,
            }
        }
    }
}

impl<'r> IoCtx<'r> {
    /// `rbd_pool_init(io, force=false)`: enables the rbd application.
    pub(crate) fn rbd_pool_init(&self) -> Result<(), Errno> {
        // SAFETY: live ioctx.
        check(unsafe { rbd_pool_init(self.ptr, false) }).map(drop)
    }

    /// Image names (`rbd_list2`).
    pub(crate) fn list(&self) -> Result<Vec<String>, Errno> {
        let mut max: usize = FIRST_LIST_CAPACITY;
        loop {
            let mut v: Vec<rbd_image_spec_t> = Vec::with_capacity(max);
            let mut n = max;
            // SAFETY: `v` has room for `n` entries; librbd fills at most `n`
            // and sets `n` to the count (or the needed count with ERANGE).
            let rc = unsafe { rbd_list2(self.ptr, v.as_mut_ptr(), &mut n) };
            match check(rc) {
                Ok(_) => {
                    // SAFETY: librbd initialised the first `n` entries.
                    unsafe { v.set_len(n) };
                    let out = v
                        .iter()
                        // SAFETY: strings librbd allocated for these entries.
                        .map(|s| unsafe { owned(s.name) })
                        .collect();
                    // SAFETY: frees exactly the `n` entries librbd filled.
                    unsafe { rbd_image_spec_list_cleanup(v.as_mut_ptr(), n) };
                    return Ok(out);
                }
                Err(libc::ERANGE) if n > max => max = n,
                Err(libc::ERANGE) => max *= 2,
                Err(e) => return Err(e),
            }
        }
    }

    /// `rbd_create4` with the given features/order, else librbd's defaults.
    pub(crate) fn create(
        &self,
        name: &CStr,
        size: u64,
        features: Option<u64>,
        order: Option<u8>,
    ) -> Result<(), Errno> {
        let opts = ImageOptions::new(features, order)?;
        // SAFETY: live ioctx; valid C string; live options.
        check(unsafe { rbd_create4(self.ptr, name.as_ptr(), size, opts.ptr) }).map(drop)
    }

    /// `rbd_clone3`: `self` holds the parent, `child_io` the child.
    pub(crate) fn clone_image(
        &self,
        parent: &CStr,
        snap: &CStr,
        child_io: &IoCtx<'_>,
        child: &CStr,
        features: Option<u64>,
        order: Option<u8>,
    ) -> Result<(), Errno> {
        let opts = ImageOptions::new(features, order)?;
        // SAFETY: both ioctxs live; all strings valid; live options.
        check(unsafe {
            rbd_clone3(
                self.ptr,
                parent.as_ptr(),
                snap.as_ptr(),
                child_io.ptr,
                child.as_ptr(),
                opts.ptr,
            )
        })
        .map(drop)
    }

    pub(crate) fn remove(&self, name: &CStr) -> Result<(), Errno> {
        // SAFETY: live ioctx; valid C string.
        check(unsafe { rbd_remove(self.ptr, name.as_ptr()) }).map(drop)
    }

    pub(crate) fn rename(&self, from: &CStr, to: &CStr) -> Result<(), Errno> {
        // SAFETY: live ioctx; valid C strings.
        check(unsafe { rbd_rename(self.ptr, from.as_ptr(), to.as_ptr()) }).map(drop)
    }
}

// ------------------------------------------------------------------ image

/// An open `rbd_image_t`; closed on drop, before its IoCtx.
pub(crate) struct Image<'r> {
    ptr: rbd_image_t,
    // dropped after `Drop::drop` closed the image
    _io: IoCtx<'r>,
}

/// `rbd_stat` + features.
pub(crate) struct Stat {
    pub size: u64,
    pub obj_size: u64,
    pub num_objs: u64,
    pub order: i32,
    pub block_name_prefix: String,
}

pub(crate) struct Snap {
    pub id: u64,
    pub size: u64,
    pub name: String,
}

pub(crate) struct Watcher {
    pub addr: String,
    pub id: i64,
    pub cookie: u64,
}

impl<'r> Image<'r> {
    /// `rbd_open` / `rbd_open_read_only`, at `snap` if given. The image
    /// takes the IoCtx (closed after the image).
    pub(crate) fn open(
        io: IoCtx<'r>,
        name: &CStr,
        snap: Option<&CStr>,
        read_only: bool,
    ) -> Result<Image<'r>, Errno> {
        let mut ptr: rbd_image_t = ptr::null_mut();
        // SAFETY: live ioctx; valid C strings (snap may be NULL = head);
        // valid out-pointer.
        let rc = unsafe {
            if read_only {
                rbd_open_read_only(io.ptr, name.as_ptr(), &mut ptr, opt_ptr(snap))
            } else {
                rbd_open(io.ptr, name.as_ptr(), &mut ptr, opt_ptr(snap))
            }
        };
        check(rc)?;
        Ok(Image { ptr, _io: io })
    }

    pub(crate) fn stat(&self) -> Result<Stat, Errno> {
        // SAFETY: rbd_image_info_t is plain data; all-zero is a valid value.
        let mut info: rbd_image_info_t = unsafe { std::mem::zeroed() };
        // SAFETY: open image; `info` valid for its size.
        check(unsafe { rbd_stat(self.ptr, &mut info, std::mem::size_of::<rbd_image_info_t>()) })?;
        let prefix: Vec<u8> = info.block_name_prefix.iter().map(|&c| c as u8).collect();
        Ok(Stat {
            size: info.size,
            obj_size: info.obj_size,
            num_objs: info.num_objs,
            order: info.order,
            block_name_prefix: cstr_in(&prefix),
        })
    }

    pub(crate) fn features(&self) -> Result<u64, Errno> {
        let mut f = 0u64;
        // SAFETY: open image; valid out-pointer.
        check(unsafe { rbd_get_features(self.ptr, &mut f) })?;
        Ok(f)
    }

    pub(crate) fn id(&self) -> Result<String, Errno> {
        let mut buf = vec![0u8; 64];
        loop {
            // SAFETY: open image; `buf` writable for its length.
            match check(unsafe { rbd_get_id(self.ptr, buf.as_mut_ptr().cast(), buf.len()) }) {
                Ok(_) => return Ok(cstr_in(&buf)),
                Err(libc::ERANGE) if buf.len() < 1 << 16 => buf.resize(buf.len() * 4, 0),
                Err(e) => return Err(e),
            }
        }
    }

    /// The parent (image, snapshot id, snapshot name), `None` if not a clone.
    pub(crate) fn parent(&self) -> Result<Option<(LinkedImage, u64, String)>, Errno> {
        // SAFETY: both structs are plain data; all-zero (NULL pointers) is valid.
        let mut img: rbd_linked_image_spec_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut snap: rbd_snap_spec_t = unsafe { std::mem::zeroed() };
        // SAFETY: open image; valid out-pointers.
        match check(unsafe { rbd_get_parent(self.ptr, &mut img, &mut snap) }) {
            Ok(_) => {}
            Err(libc::ENOENT) => return Ok(None),
            Err(e) => return Err(e),
        }
        // SAFETY: librbd filled both structs with allocated strings, copied
        // here and then freed by the matching cleanup functions.
        let out = unsafe {
            let parent = LinkedImage::from_c(&img);
            let r = (parent, snap.id, owned(snap.name));
            rbd_linked_image_spec_cleanup(&mut img);
            rbd_snap_spec_cleanup(&mut snap);
            r
        };
        Ok(Some(out))
    }

    /// `rbd_list_children3` of the snapshot this image is open at.
    pub(crate) fn children(&self) -> Result<Vec<LinkedImage>, Errno> {
        let mut max: usize = FIRST_LIST_CAPACITY;
        loop {
            let mut v: Vec<rbd_linked_image_spec_t> = Vec::with_capacity(max);
            let mut n = max;
            // SAFETY: `v` has room for `n` entries; librbd fills at most `n`.
            let rc = unsafe { rbd_list_children3(self.ptr, v.as_mut_ptr(), &mut n) };
            match check(rc) {
                Ok(_) => {
                    // SAFETY: librbd initialised the first `n` entries.
                    unsafe { v.set_len(n) };
                    // SAFETY: entries hold librbd-allocated strings.
                    let out = v
                        .iter()
                        .map(|s| unsafe { LinkedImage::from_c(s) })
                        .collect();
                    // SAFETY: frees exactly the `n` filled entries.
                    unsafe { rbd_linked_image_spec_list_cleanup(v.as_mut_ptr(), n) };
                    return Ok(out);
                }
                Err(libc::ERANGE) if n > max => max = n,
                Err(libc::ERANGE) => max *= 2,
                Err(e) => return Err(e),
            }
        }
    }

    pub(crate) fn snaps(&self) -> Result<Vec<Snap>, Errno> {
        let mut max: c_int = FIRST_LIST_CAPACITY as c_int;
        loop {
            // one extra slot: librbd writes a terminating entry after the last
            let cap = usize::try_from(max).unwrap_or(0) + 1;
            let mut v: Vec<rbd_snap_info_t> = Vec::with_capacity(cap);
            let mut n = max;
            // SAFETY: `v` has room for `max + 1` entries (the list plus its
            // NULL-name terminator); librbd fills at most that.
            let rc = unsafe { rbd_snap_list(self.ptr, v.as_mut_ptr(), &mut n) };
            match check(rc) {
                Ok(count) => {
                    let count = usize::try_from(count).unwrap_or(0);
                    // SAFETY: librbd initialised the first `count` entries.
                    unsafe { v.set_len(count) };
                    let out = v
                        .iter()
                        .map(|s| Snap {
                            id: s.id,
                            size: s.size,
                            // SAFETY: a name librbd allocated for this entry.
                            name: unsafe { owned(s.name) },
                        })
                        .collect();
                    // SAFETY: frees the names of the list librbd filled
                    // (it stops at the terminating NULL-name entry).
                    unsafe { rbd_snap_list_end(v.as_mut_ptr()) };
                    return Ok(out);
                }
                Err(libc::ERANGE) if n > max => max = n,
                Err(libc::ERANGE) => max *= 2,
                Err(e) => return Err(e),
            }
        }
    }

    pub(crate) fn snap_is_protected(&self, snap: &CStr) -> Result<bool, Errno> {
        let mut p: c_int = 0;
        // SAFETY: open image; valid C string and out-pointer.
        check(unsafe { rbd_snap_is_protected(self.ptr, snap.as_ptr(), &mut p) })?;
        Ok(p != 0)
    }

    pub(crate) fn resize(&self, size: u64) -> Result<(), Errno> {
        // SAFETY: open image.
        check(unsafe { rbd_resize(self.ptr, size) }).map(drop)
    }

    pub(crate) fn snap_create(&self, snap: &CStr) -> Result<(), Errno> {
        // SAFETY: open image; valid C string.
        check(unsafe { rbd_snap_create(self.ptr, snap.as_ptr()) }).map(drop)
    }

    pub(crate) fn snap_remove(&self, snap: &CStr) -> Result<(), Errno> {
        // SAFETY: open image; valid C string.
        check(unsafe { rbd_snap_remove(self.ptr, snap.as_ptr()) }).map(drop)
    }

    pub(crate) fn snap_protect(&self, snap: &CStr) -> Result<(), Errno> {
        // SAFETY: open image; valid C string.
        check(unsafe { rbd_snap_protect(self.ptr, snap.as_ptr()) }).map(drop)
    }

    pub(crate) fn snap_unprotect(&self, snap: &CStr) -> Result<(), Errno> {
        // SAFETY: open image; valid C string.
        check(unsafe { rbd_snap_unprotect(self.ptr, snap.as_ptr()) }).map(drop)
    }

    pub(crate) fn flatten(&self, progress: &mut ProgressFn<'_>) -> Result<(), Errno> {
        let rc = with_progress(progress, |cb, data| {
            // SAFETY: open image; `cb`/`data` stay valid for the whole call
            // (with_progress owns the state until this returns).
            unsafe { rbd_flatten_with_progress(self.ptr, cb, data) }
        });
        check(rc).map(drop)
    }

    /// `rbd_deep_copy_with_progress` of this image (at its open snapshot,
    /// with the snapshots up to it) to `dest` in `dest_io`.
    pub(crate) fn deep_copy(
        &self,
        dest_io: &IoCtx<'_>,
        dest: &CStr,
        features: Option<u64>,
        progress: &mut ProgressFn<'_>,
    ) -> Result<(), Errno> {
        let opts = ImageOptions::new(features, None)?;
        let rc = with_progress(progress, |cb, data| {
            // SAFETY: open image, live ioctx and options, valid C string;
            // `cb`/`data` valid for the whole call.
            unsafe {
                rbd_deep_copy_with_progress(
                    self.ptr,
                    dest_io.ptr,
                    dest.as_ptr(),
                    opts.ptr,
                    cb,
                    data,
                )
            }
        });
        check(rc).map(drop)
    }

    /// `rbd_copy_with_progress4`: the data at the open snapshot (or head),
    /// no snapshots; runs of zeros of `sparse_size` bytes are not written.
    pub(crate) fn copy(
        &self,
        dest_io: &IoCtx<'_>,
        dest: &CStr,
        features: Option<u64>,
        sparse_size: usize,
        progress: &mut ProgressFn<'_>,
    ) -> Result<(), Errno> {
        let opts = ImageOptions::new(features, None)?;
        let rc = with_progress(progress, |cb, data| {
            // SAFETY: open image, live ioctx and options, valid C string;
            // `cb`/`data` valid for the whole call.
            unsafe {
                rbd_copy_with_progress4(
                    self.ptr,
                    dest_io.ptr,
                    dest.as_ptr(),
                    opts.ptr,
                    cb,
                    data,
                    sparse_size,
                )
            }
        });
        check(rc).map(drop)
    }

    pub(crate) fn watchers(&self) -> Result<Vec<Watcher>, Errno> {
        let mut max: usize = 64;
        loop {
            let mut v: Vec<rbd_image_watcher_t> = Vec::with_capacity(max);
            let mut n = max;
            // SAFETY: `v` has room for `n` entries; librbd fills at most `n`.
            let rc = unsafe { rbd_watchers_list(self.ptr, v.as_mut_ptr(), &mut n) };
            match check(rc) {
                Ok(_) => {
                    // SAFETY: librbd initialised the first `n` entries.
                    unsafe { v.set_len(n) };
                    let out = v
                        .iter()
                        .map(|w| Watcher {
                            // SAFETY: `addr` allocated by librbd for this entry.
                            addr: unsafe { owned(w.addr) },
                            id: w.id,
                            cookie: w.cookie,
                        })
                        .collect();
                    // SAFETY: frees exactly the `n` filled entries.
                    unsafe { rbd_watchers_list_cleanup(v.as_mut_ptr(), n) };
                    return Ok(out);
                }
                Err(libc::ERANGE) if n > max => max = n,
                Err(libc::ERANGE) => max *= 2,
                Err(e) => return Err(e),
            }
        }
    }

    pub(crate) fn metadata_get(&self, key: &CStr) -> Result<String, Errno> {
        let mut buf = vec![0u8; 256];
        loop {
            let mut len = buf.len();
            // SAFETY: open image; `buf` writable for `len` bytes; librbd sets
            // `len` to the needed size (with the NUL) on ERANGE.
            let rc = unsafe {
                rbd_metadata_get(self.ptr, key.as_ptr(), buf.as_mut_ptr().cast(), &mut len)
            };
            match check(rc) {
                Ok(_) => return Ok(cstr_in(&buf[..len.min(buf.len())])),
                Err(libc::ERANGE) if len > buf.len() => buf.resize(len, 0),
                Err(e) => return Err(e),
            }
        }
    }

    pub(crate) fn metadata_set(&self, key: &CStr, value: &CStr) -> Result<(), Errno> {
        // SAFETY: open image; valid C strings.
        check(unsafe { rbd_metadata_set(self.ptr, key.as_ptr(), value.as_ptr()) }).map(drop)
    }

    pub(crate) fn metadata_remove(&self, key: &CStr) -> Result<(), Errno> {
        // SAFETY: open image; valid C string.
        check(unsafe { rbd_metadata_remove(self.ptr, key.as_ptr()) }).map(drop)
    }

    /// All metadata pairs (`max` 0 = no limit).
    /// The lockers of the image (`rbd lock ls`: an exclusive-lock owner shows as one, its
    /// cookie `auto N`): (client entity, cookie, address) each.
    pub(crate) fn lockers(&self) -> Result<Vec<(String, String, String)>, Errno> {
        let mut cap = 1024usize;
        loop {
            let mut bufs = [
                vec![0u8; cap],
                vec![0u8; cap],
                vec![0u8; cap],
                vec![0u8; cap],
            ];
            let mut lens = [cap; 4];
            let mut exclusive: c_int = 0;
            let [tag, clients, cookies, addrs] = &mut bufs;
            let [tl, cl, kl, al] = &mut lens;
            // SAFETY: open image; the four buffers are writable for their lengths, and
            // librbd sets the lengths used (or needed, with ERANGE).
            let rc = unsafe {
                rbd_list_lockers(
                    self.ptr,
                    &mut exclusive,
                    tag.as_mut_ptr().cast(),
                    tl,
                    clients.as_mut_ptr().cast(),
                    cl,
                    cookies.as_mut_ptr().cast(),
                    kl,
                    addrs.as_mut_ptr().cast(),
                    al,
                )
            };
            if rc >= 0 {
                let part = |b: &Vec<u8>, l: usize| split_nul(&b[..l.min(cap)]);
                let (c, k, a) = (
                    part(&bufs[1], lens[1]),
                    part(&bufs[2], lens[2]),
                    part(&bufs[3], lens[3]),
                );
                return Ok(c
                    .into_iter()
                    .zip(k)
                    .zip(a)
                    .map(|((c, k), a)| (c, k, a))
                    .collect());
            }
            let e = -(rc as c_int);
            match e {
                libc::ERANGE if lens.iter().any(|&l| l > cap) => {
                    cap = lens.into_iter().max().unwrap_or(cap);
                }
                libc::ERANGE => cap *= 2,
                e => return Err(e),
            }
        }
    }

    /// Break the lock `cookie` that `client` holds (`rbd lock rm`).
    pub(crate) fn break_lock(&self, client: &CStr, cookie: &CStr) -> Result<(), Errno> {
        // SAFETY: open image; valid C strings.
        check(unsafe { rbd_break_lock(self.ptr, client.as_ptr(), cookie.as_ptr()) }).map(drop)
    }

    pub(crate) fn metadata_list(&self) -> Result<Vec<(String, String)>, Errno> {
        let (mut kcap, mut vcap) = (1024usize, 4096usize);
        loop {
            let mut keys = vec![0u8; kcap];
            let mut vals = vec![0u8; vcap];
            let (mut klen, mut vlen) = (kcap, vcap);
            let empty = c"";
            // SAFETY: open image; both buffers writable for their lengths;
            // librbd sets the lengths used (or needed, with ERANGE).
            let rc = unsafe {
                rbd_metadata_list(
                    self.ptr,
                    empty.as_ptr(),
                    0,
                    keys.as_mut_ptr().cast(),
                    &mut klen,
                    vals.as_mut_ptr().cast(),
                    &mut vlen,
                )
            };
            match check(rc) {
                Ok(_) => {
                    let k = split_nul(&keys[..klen.min(kcap)]);
                    // values may be empty strings: split without filtering
                    let v: Vec<String> = vals[..vlen.min(vcap)]
                        .split(|&b| b == 0)
                        .map(|s| String::from_utf8_lossy(s).into_owned())
                        .collect();
                    return Ok(k.into_iter().zip(v).collect());
                }
                Err(libc::ERANGE) if klen > kcap || vlen > vcap => {
                    kcap = kcap.max(klen);
                    vcap = vcap.max(vlen);
                }
                Err(libc::ERANGE) => {
                    kcap *= 2;
                    vcap *= 2;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Bytes in objects that exist in this image (at its open snapshot),
    /// not counting the parent: `rbd_diff_iterate2(NULL, 0, size,
    /// include_parent=0, whole_object=1)`, as `rbd du` does.
    pub(crate) fn allocated_bytes(&self, size: u64) -> Result<u64, Errno> {
        // librbd 16.2.15 calls back on the caller's thread, with fast-diff or without
        // (tests/rbd.rs, 40 objects of an image with layering only: every call on the
        // caller's thread); librbd does not promise it, so the sum is an atomic, sound
        // from any thread, and diff_iterate2 returns only after its last callback.
        extern "C" fn add(_ofs: u64, len: usize, exists: c_int, arg: *mut c_void) -> c_int {
            // SAFETY: `arg` is the AtomicU64 below, alive until diff_iterate2 returns.
            let sum = unsafe { &*arg.cast::<AtomicU64>() };
            if exists != 0 {
                sum.fetch_add(len as u64, Ordering::SeqCst);
            }
            0
        }
        let sum = AtomicU64::new(0);
        // SAFETY: open image; callback and its argument valid for the call.
        check(unsafe {
            rbd_diff_iterate2(
                self.ptr,
                ptr::null(),
                0,
                size,
                0,
                1,
                add,
                ptr::from_ref(&sum).cast_mut().cast(),
            )
        })?;
        Ok(sum.into_inner())
    }

    pub(crate) fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize, Errno> {
        // SAFETY: open image; `buf` writable for its length.
        let n = unsafe { rbd_read(self.ptr, offset, buf.len(), buf.as_mut_ptr().cast()) };
        if n < 0 {
            Err(i32::try_from(-n).unwrap_or(libc::EIO))
        } else {
            Ok(n.unsigned_abs())
        }
    }

    pub(crate) fn write_at(&self, offset: u64, buf: &[u8]) -> Result<usize, Errno> {
        // SAFETY: open image; `buf` readable for its length.
        let n = unsafe { rbd_write(self.ptr, offset, buf.len(), buf.as_ptr().cast()) };
        if n < 0 {
            Err(i32::try_from(-n).unwrap_or(libc::EIO))
        } else {
            Ok(n.unsigned_abs())
        }
    }

    pub(crate) fn flush(&self) -> Result<(), Errno> {
        // SAFETY: open image.
        check(unsafe { rbd_flush(self.ptr) }).map(drop)
    }
}

impl Drop for Image<'_> {
    fn drop(&mut self) {
        // SAFETY: opened by rbd_open*, closed once; the IoCtx field is
        // dropped after this.
        unsafe { rbd_close(self.ptr) };
    }
}

/// Interior NUL check for strings passed to C.
pub(crate) fn cstring(s: &str) -> Option<CString> {
    CString::new(s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};
    use std::process::Command;

    /// Compiles a C program against the installed headers that prints the
    /// size and field offsets of every struct declared above, and compares
    /// them with the Rust declarations. Needs `cc` and librbd-dev (both
    /// are needed to build this crate anyway).
    #[test]
    fn abi_layouts_match_the_c_headers() {
        let dir = std::env::temp_dir().join(format!("tpl-ceph-abi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("abi.c");
        let exe = dir.join("abi");
        let fields: &[(&str, &[&str])] = &[
            (
                "rbd_image_info_t",
                &[
                    "size",
                    "obj_size",
                    "num_objs",
                    "order",
                    "block_name_prefix",
                    "parent_pool",
                    "parent_name",
                ],
            ),
            ("rbd_image_spec_t", &["id", "name"]),
            (
                "rbd_linked_image_spec_t",
                &[
                    "pool_id",
                    "pool_name",
                    "pool_namespace",
                    "image_id",
                    "image_name",
                    "trash",
                ],
            ),
            ("rbd_snap_spec_t", &["id", "namespace_type", "name"]),
            ("rbd_snap_info_t", &["id", "size", "name"]),
            ("rbd_image_watcher_t", &["addr", "id", "cookie"]),
        ];
        let mut c = String::from(
            "#include <stdio.h>\n#include <stddef.h>\n#include <rbd/librbd.h>\nint main(void){\n\
             printf(\"enum %zu\\n\", sizeof(rbd_snap_namespace_type_t));\n\
             printf(\"opt %d %d\\n\", RBD_IMAGE_OPTION_FEATURES, RBD_IMAGE_OPTION_ORDER);\n",
        );
        for (ty, fs) in fields {
            c += &format!("printf(\"{ty} %zu\", sizeof({ty}));\n");
            for f in *fs {
                c += &format!("printf(\" %zu\", offsetof({ty}, {f}));\n");
            }
            c += "printf(\"\\n\");\n";
        }
        c += "return 0;}\n";
        std::fs::write(&src, c).unwrap();
        let st = Command::new("cc")
            .arg("-o")
            .arg(&exe)
            .arg(&src)
            .status()
            .expect("run cc");
        assert!(st.success(), "cc failed on {}", src.display());
        let out = Command::new(&exe).output().expect("run abi probe");
        let out = String::from_utf8(out.stdout).unwrap();
        let _ = std::fs::remove_dir_all(&dir);

        macro_rules! layout {
            ($t:ty; $($f:ident),*) => {{
                let mut s = format!("{} {}", stringify!($t), size_of::<$t>());
                $( s += &format!(" {}", offset_of!($t, $f)); )*
                s
            }};
        }
        let rust = [
            format!("enum {}", size_of::<c_int>()),
            format!("opt {RBD_IMAGE_OPTION_FEATURES} {RBD_IMAGE_OPTION_ORDER}"),
            layout!(rbd_image_info_t; size, obj_size, num_objs, order, block_name_prefix, parent_pool, parent_name),
            layout!(rbd_image_spec_t; id, name),
            layout!(rbd_linked_image_spec_t; pool_id, pool_name, pool_namespace, image_id, image_name, trash),
            layout!(rbd_snap_spec_t; id, namespace_type, name),
            layout!(rbd_snap_info_t; id, size, name),
            layout!(rbd_image_watcher_t; addr, id, cookie),
        ];
        let c_lines: Vec<&str> = out.lines().collect();
        assert_eq!(c_lines, rust.iter().map(String::as_str).collect::<Vec<_>>());
    }

    /// A Rust FFI type as C spells it (only the types declared in this module).
    fn c_type(t: &str) -> String {
        let t = t.trim();
        if let Some(r) = t.strip_prefix("*mut ") {
            return format!("{} *", c_type(r));
        }
        if let Some(r) = t.strip_prefix("*const ") {
            return format!("{} const *", c_type(r));
        }
        match t {
            "" | "()" => "void",
            "c_int" => "int",
            "c_char" => "char",
            "c_void" => "void",
            "u8" => "uint8_t",
            "u64" => "uint64_t",
            "i64" => "int64_t",
            "usize" => "size_t",
            "isize" => "ssize_t",
            "bool" => "bool",
            "diff_cb_t" => "int (*)(uint64_t, size_t, int, void *)",
            typedef => typedef,
        }
        .to_string()
    }

    /// Every declared function has exactly the type the installed librados.h and
    /// librbd.h give it: gcc compares the two function pointer types, qualifiers and
    /// widths included (`__builtin_types_compatible_p`), at compile time.
    #[test]
    fn function_signatures_match_the_c_headers() {
        assert_eq!(c_type("*mut *const c_char"), "char const * *");
        assert_eq!(c_type("*mut rbd_image_t"), "rbd_image_t *");
        let dir = std::env::temp_dir().join(format!("tpl-ceph-sig-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("sig.c");
        let mut c = String::from(
            "#include <stdbool.h>\n#include <stdint.h>\n#include <sys/types.h>\n\
             #include <rados/librados.h>\n#include <rbd/librbd.h>\n",
        );
        for (name, args, ret) in SIGNATURES {
            let args: Vec<String> = args.iter().map(|a| c_type(a)).collect();
            let args = if args.is_empty() {
                "void".to_string()
            } else {
                args.join(", ")
            };
            c += &format!(
                "_Static_assert(__builtin_types_compatible_p(__typeof__(&{name}), \
                 {ret} (*)({args})), \"{name}: declared as {ret} (*)({args})\");\n",
                ret = c_type(ret)
            );
        }
        std::fs::write(&src, &c).unwrap();
        let out = Command::new("cc")
            .args(["-std=gnu11", "-fsyntax-only"])
            .arg(&src)
            .output()
            .expect("run cc");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            out.status.success(),
            "the declarations differ from the C headers:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(SIGNATURES.len(), c.matches("_Static_assert").count());
        assert!(SIGNATURES.len() > 50, "{}", SIGNATURES.len());
    }
}
