//! The one way tools run a helper program (qemu-img, virt-sysprep): its output read line by line, and one policy for when the tool is asked to stop or dies.
//!
//! The policy: the helper never outlives the tool. When a stopping signal comes, the helper
//! gets SIGTERM (virt-sysprep then shuts its appliance down, qemu-img just ends), and
//! SIGKILL if it has not ended after [`GRACE`]; when the tool dies however it dies (kill
//! -9 included), the kernel sends the helper SIGTERM (`PR_SET_PDEATHSIG`). A helper left
//! running would go on writing a file that the next run removes, or a guest disk that the
//! next run generalizes again.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::signals::Interrupt;

/// How long a helper has to end after SIGTERM before it gets SIGKILL.
pub const GRACE: Duration = Duration::from_secs(10);
/// How often a wait looks for a signal.
const TICK: Duration = Duration::from_millis(20);
/// How many of the helper's last stderr lines are kept for an error message.
const TAIL: usize = 12;

/// Which of the helper's streams a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// How a helper ended.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    /// Its last non-empty stderr lines.
    pub tail: Vec<String>,
}

impl Finished {
    /// "exit status 3" or "killed by signal 9".
    pub fn status_text(&self) -> String {
        match (self.status.code(), self.status.signal()) {
            (Some(c), _) => format!("exit status {c}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            _ => self.status.to_string(),
        }
    }

    /// Its last stderr lines, for a message.
    pub fn stderr(&self) -> String {
        let s = self.tail.join(" / ");
        if s.is_empty() {
            "it printed nothing".into()
        } else {
            s
        }
    }
}

/// Have the kernel send the helper SIGTERM when we die.
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and only makes the
    // async-signal-safe calls prctl and getppid.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            // We may have died before the prctl: then nobody waits for this helper.
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::other("the tool that started it has exited"));
            }
            Ok(())
        });
    }
}

/// Run `cmd` to its end, giving `on_line` each line it writes (on stdout too when
/// `stdout_lines`; otherwise the caller has set its stdout). `what` says what it does, for
/// messages, and `hint` what to do when it cannot be started at all. A stopping signal
/// ends the helper as the module says and returns [`Error::Interrupted`].
pub fn run(
    cmd: &mut Command,
    what: &str,
    hint: &str,
    intr: &Interrupt,
    stdout_lines: bool,
    mut on_line: impl FnMut(Stream, &str),
) -> Result<Finished> {
    let prog = cmd.get_program().to_string_lossy().into_owned();
    cmd.stdin(Stdio::null()).stderr(Stdio::piped());
    if stdout_lines {
        cmd.stdout(Stdio::piped());
    }
    die_with_parent(cmd);
    let mut child = cmd.spawn().map_err(|e| {
        Error::failed(
            format!("cannot {what}"),
            format!("cannot run {prog}: {e} ({hint})"),
        )
    })?;
    // The pipes are read on threads so a chatty helper never blocks on a full pipe; the
    // channel closes when both are closed, which is when the helper has exited.
    let (tx, rx) = mpsc::channel::<(Stream, String)>();
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        readers.push(reader(Box::new(out), Stream::Stdout, tx.clone()));
    }
    if let Some(err) = child.stderr.take() {
        readers.push(reader(Box::new(err), Stream::Stderr, tx.clone()));
    }
    drop(tx);
    let mut tail = VecDeque::with_capacity(TAIL);
    let mut stopping: Option<Instant> = None;
    loop {
        match rx.recv_timeout(TICK) {
            Ok((stream, line)) => {
                if stream == Stream::Stderr && !line.trim().is_empty() {
                    if tail.len() == TAIL {
                        tail.pop_front();
                    }
                    tail.push_back(line.clone());
                }
                on_line(stream, &line);
            }
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {}
        }
        if intr.signal().is_some() {
            match stopping {
                None => {
                    // SIGTERM first: virt-sysprep shuts its appliance down on it.
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(child.id() as i32),
                        nix::sys::signal::Signal::SIGTERM,
                    );
                    stopping = Some(Instant::now());
                }
                Some(t) if t.elapsed() > GRACE => {
                    let _ = child.kill();
                }
                Some(_) => {}
            }
        }
    }
    for r in readers {
        let _ = r.join();
    }
    let status = child
        .wait()
        .map_err(|e| Error::failed(format!("cannot {what}"), format!("waiting for {prog}: {e}")))?;
    intr.check()?;
    Ok(Finished {
        status,
        tail: tail.into(),
    })
}

/// Run a helper whose output only matters when it fails: an error naming its last stderr
/// lines unless it exits 0.
pub fn run_quiet(cmd: &mut Command, what: &str, hint: &str, intr: &Interrupt) -> Result<()> {
    let prog = cmd.get_program().to_string_lossy().into_owned();
    let f = run(cmd, what, hint, intr, false, |_, _| {})?;
    if f.status.success() {
        Ok(())
    } else {
        Err(Error::failed(
            format!("cannot {what}"),
            format!("{prog} failed ({}): {}", f.status_text(), f.stderr()),
        ))
    }
}

fn reader(
    r: Box<dyn Read + Send>,
    stream: Stream,
    tx: mpsc::Sender<(Stream, String)>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = BufReader::new(r);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf);
                    let line = line.trim_end_matches(['\n', '\r']).to_string();
                    if tx.send((stream, line)).is_err() {
                        break;
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_status_and_tail() {
        let intr = Interrupt::default();
        let mut lines = Vec::new();
        let f = run(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
            "test",
            "sh",
            &intr,
            true,
            |s, l| lines.push((s, l.to_string())),
        )
        .unwrap();
        assert_eq!(f.status.code(), Some(3));
        assert_eq!(f.tail, ["err"]);
        assert!(lines.contains(&(Stream::Stdout, "out".into())));
        let e = run_quiet(Command::new("false").arg("x"), "do x", "h", &intr).unwrap_err();
        assert!(
            e.to_string().contains("false failed (exit status 1)"),
            "{e}"
        );
        let e = run_quiet(
            &mut Command::new("/no/such/tool"),
            "do y",
            "install it",
            &intr,
        )
        .unwrap_err();
        assert!(e.to_string().contains("install it"), "{e}");
    }

    #[test]
    fn a_stopping_signal_ends_the_helper() {
        let intr = Interrupt::default();
        intr.raise_flag(libc::SIGTERM);
        let t = Instant::now();
        let e = run(
            Command::new("sleep").arg("30"),
            "wait",
            "",
            &intr,
            false,
            |_, _| {},
        )
        .unwrap_err();
        assert!(matches!(e, Error::Interrupted { signal } if signal == libc::SIGTERM));
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }
}
