//! SIGINT, SIGTERM and SIGHUP as a flag the steps check at safe points, and dying by the signal once the tool has cleaned up.
//!
//! A signal must not kill a tool in the middle of a step: a clone half made, a rename half
//! done, a virt-sysprep run orphaned. [`Interrupt::install`] (called once by
//! [`crate::cli::run`]) only records which signal came; long steps (copies, waits on a
//! child or on a lock, the loop over input records) check it and unwind through their
//! normal error path, which removes what was unfinished. When the tool is done,
//! [`Interrupt::reraise`] ends the process by the same signal, so a shell loop or make
//! sees it was interrupted, not that it failed (the convention of cp, fd and ripgrep).
//! SIGHUP is among them because long clones run over ssh, and a dropped session hangs up
//! the terminal. kill -9 cannot be caught; the journals handle that.
//!
//! A signal that was ignored when the tool started stays ignored, as it does for every Unix
//! tool: `nohup tpl-clone …` survives the hang-up, and a job a script started in the
//! background (`tpl-clone … &`, which the shell starts with SIGINT ignored) is not stopped
//! by a Ctrl-C meant for the foreground.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use nix::sys::signal::{self, SigHandler, Signal};

use crate::error::{signal_name, Error, Result};

/// The signals that ask a tool to stop.
pub const STOPPING: [i32; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// The signal number that asked the run to stop, 0 while none did.
#[derive(Debug, Clone, Default)]
pub struct Interrupt(Arc<AtomicUsize>);

impl Interrupt {
    /// Catch SIGINT, SIGTERM and SIGHUP from now on, those of them that the process did
    /// not inherit as ignored.
    pub fn install() -> Result<Interrupt> {
        let flag = Arc::new(AtomicUsize::new(0));
        for sig in STOPPING {
            if ignored_at_start(sig) {
                continue;
            }
            signal_hook::flag::register_usize(sig, flag.clone(), sig as usize).map_err(|e| {
                Error::failed(
                    format!("cannot install the {} handler", signal_name(sig)),
                    e.to_string(),
                )
            })?;
        }
        Ok(Interrupt(flag))
    }

    /// The signal received, if any.
    pub fn signal(&self) -> Option<i32> {
        match self.0.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s as i32),
        }
    }

    /// Fail with "interrupted" once a signal came; called between steps and chunks.
    pub fn check(&self) -> Result<()> {
        match self.signal() {
            None => Ok(()),
            Some(s) => Err(Error::Interrupted { signal: s }),
        }
    }

    /// Record a signal as if it had come (tests, and a caller that wants the run stopped).
    pub fn raise_flag(&self, sig: i32) {
        self.0.store(sig as usize, Ordering::SeqCst);
    }

    /// End the process by the signal that came, if one did. Called last, after cleanup.
    pub fn reraise(&self) {
        let Some(sig) = self.signal() else { return };
        let Ok(s) = Signal::try_from(sig) else { return };
        #[allow(unsafe_code)]
        // SAFETY: installing SIG_DFL replaces signal-hook's handler with the kernel's
        // default action; no Rust code runs in it.
        let _ = unsafe { signal::signal(s, SigHandler::SigDfl) };
        let _ = signal::raise(s);
    }
}

/// Whether `sig` is ignored now (SIG_IGN): what a process inherits from `nohup` or from a
/// shell that starts a background job without job control.
fn ignored_at_start(sig: i32) -> bool {
    let mut old = std::mem::MaybeUninit::<libc::sigaction>::zeroed();
    #[allow(unsafe_code)]
    // SAFETY: a null new action only reads the current one into `old`, which is zeroed
    // memory of the right type and lives through the call.
    let rc = unsafe { libc::sigaction(sig, std::ptr::null(), old.as_mut_ptr()) };
    #[allow(unsafe_code)]
    // SAFETY: sigaction filled it (rc 0), or it is still the zeroed value, a valid one.
    let old = unsafe { old.assume_init() };
    rc == 0 && old.sa_sigaction == libc::SIG_IGN
}

/// End the process by SIGPIPE: what a Unix filter does when its reader has gone. Rust
/// ignores SIGPIPE (so that a closed stderr never kills a tool mid-step); a closed stdout
/// is noticed as EPIPE instead, and once the tool has stopped cleanly it dies as the
/// shell expects of a filter in a pipe.
pub fn die_by_sigpipe() {
    #[allow(unsafe_code)]
    // SAFETY: as in `reraise`: the default disposition, no Rust code involved.
    let _ = unsafe { signal::signal(Signal::SIGPIPE, SigHandler::SigDfl) };
    let _ = signal::raise(Signal::SIGPIPE);
}
