//! SIGINT, SIGTERM and SIGHUP as a flag the long steps check, and child processes that stop when it is raised.
//!
//! A signal must not kill the run in the middle of a copy: what it created would stay.
//! SIGHUP is among them because a long full clone is often run over ssh, and a dropped
//! session hangs up the terminal; the messages written after that are lost, the cleanup
//! is not.
//! The handler only records which signal came; the copy loops, the waits on qemu-img and
//! the steps between them check it and unwind through the normal error path, which
//! removes the unfinished clone. kill -9 cannot be caught; the journal handles that.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use tpl_common::error::{Error, Result};

/// The signal number that asked the run to stop, 0 while none did.
#[derive(Debug, Clone)]
pub struct Interrupt(Arc<AtomicUsize>);

impl Interrupt {
    /// Catch SIGINT, SIGTERM and SIGHUP from now on.
    pub fn install() -> Result<Interrupt> {
        let flag = Arc::new(AtomicUsize::new(0));
        for sig in [
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGHUP,
        ] {
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
            Some(s) => Err(Error::failed(
                format!("interrupted by {}", signal_name(s)),
                "stopping; what this run created for the unfinished clone is removed",
            )),
        }
    }
}

pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}

/// Have the kernel kill the helper when we die, however we die: after a kill -9 an
/// orphaned qemu-img would go on writing a temporary file the next run removes.
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and only makes the
    // async-signal-safe calls prctl and getppid.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            // We may have died before the prctl: then nobody waits for this helper.
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::other("tpl-clone has exited"));
            }
            Ok(())
        });
    }
}

/// How often a wait on a helper looks for a signal.
const TICK: Duration = Duration::from_millis(20);

/// Run a helper (qemu-img) to completion, or kill it when a signal arrives. Its stderr
/// is collected for the error message; `what` says what it was doing.
pub fn run_child(mut cmd: Command, intr: &Interrupt, what: &str) -> Result<()> {
    let prog = cmd.get_program().to_string_lossy().into_owned();
    cmd.stdin(Stdio::null()).stderr(Stdio::piped());
    die_with_parent(&mut cmd);
    let mut child: Child = cmd.spawn().map_err(|e| {
        Error::failed(
            format!("cannot {what}"),
            format!("cannot run {prog}: {e} (is qemu-utils installed? try 'make deps')"),
        )
    })?;
    // Read stderr on a thread so a chatty child can never block on a full pipe. The
    // thread also says when the pipe closes, which is when the child exits: a linked
    // clone's qemu-img create takes about 15 ms, and sleeping a fixed 20 ms between
    // looks at it doubled the time of each clone (make bench, 100 linked clones).
    let mut err_pipe = child.stderr.take().expect("stderr is piped");
    let (closed, on_close) = mpsc::channel::<()>();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err_pipe.read_to_string(&mut s);
        drop(closed);
        s
    });
    let mut nap = Duration::from_millis(1);
    let status = loop {
        if let Some(st) = child.try_wait().map_err(|e| {
            Error::failed(format!("cannot {what}"), format!("waiting for {prog}: {e}"))
        })? {
            break st;
        }
        if intr.signal().is_some() {
            let _ = child.kill();
            let _ = child.wait();
            let _ = reader.join();
            return intr.check();
        }
        // Until stderr closes, wake on that or for the signal check; after it, the child
        // is exiting: look again soon, then less often.
        match on_close.recv_timeout(TICK) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                std::thread::sleep(nap);
                nap = (nap * 2).min(TICK);
            }
        }
    };
    let stderr = reader.join().unwrap_or_default();
    intr.check()?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::failed(
            format!("cannot {what}"),
            format!("{prog} failed ({status}): {}", stderr.trim()),
        ))
    }
}
