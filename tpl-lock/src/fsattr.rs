//! The filesystem's immutable attribute (what `chattr +i` sets), read and written through the FS_IOC_GETFLAGS/SETFLAGS ioctls on an open file.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// `FS_IMMUTABLE_FL` from linux/fs.h: no write, rename, unlink or chmod, even by root.
pub const FS_IMMUTABLE_FL: libc::c_int = 0x10;

/// Whether an error means "this filesystem has no such attribute" rather than a failure.
/// Filesystems without the ioctl answer ENOTTY; some answer EOPNOTSUPP or EINVAL.
pub fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOTTY | libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS)
    )
}

/// The inode flags of an open file.
#[allow(unsafe_code)]
pub fn get_flags(f: &File) -> io::Result<libc::c_int> {
    let mut flags: libc::c_int = 0;
    // SAFETY: the fd is open for the lifetime of `f`; the kernel writes one int (the
    // ioctl's `long` in its number is historical: every filesystem reads/writes an int,
    // as e2fsprogs' chattr relies on) into `flags`, which outlives the call.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(flags)
}

/// Set the inode flags of an open file.
#[allow(unsafe_code)]
pub fn set_flags(f: &File, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: as in `get_flags`; the kernel reads one int from `flags`.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), libc::FS_IOC_SETFLAGS, &flags) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the file is immutable.
pub fn is_immutable(f: &File) -> io::Result<bool> {
    Ok(get_flags(f)? & FS_IMMUTABLE_FL != 0)
}

/// Set or clear the immutable attribute; returns whether it changed anything.
/// Setting it needs CAP_LINUX_IMMUTABLE (root).
pub fn set_immutable(f: &File, on: bool) -> io::Result<bool> {
    let flags = get_flags(f)?;
    let new = if on {
        flags | FS_IMMUTABLE_FL
    } else {
        flags & !FS_IMMUTABLE_FL
    };
    if new == flags {
        return Ok(false);
    }
    set_flags(f, new)?;
    Ok(true)
}
