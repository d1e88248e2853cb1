//! The command-line harness every tool runs in: common options, input records, output, messages and exit codes.

use std::collections::HashMap;
use std::io::{self, IsTerminal, Write};
use std::process::ExitCode;
use std::rc::Rc;

use clap::Parser;

use crate::error::{Error, Result};
use crate::record::{read_records, DomainRef, Record};
use crate::session::{resolve_uri, Session};

/// Options every tool takes, named as virsh names them.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Common {
    /// Hypervisor connection URI, as for virsh [default: $LIBVIRT_DEFAULT_URI, else qemu:///system]
    #[arg(short = 'c', long = "connect", value_name = "URI")]
    pub connect: Option<String>,

    /// Print only errors and warnings on stderr
    #[arg(short, long)]
    pub quiet: bool,
}

/// What a tool's step sees of the run: messages, connections, output, and the failures so far.
pub struct Ctx {
    pub tool: &'static str,
    pub common: Common,
    sessions: HashMap<String, Rc<Session>>,
    failures: Vec<u8>,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("tool", &self.tool)
            .field("failures", &self.failures)
            .finish()
    }
}

impl Ctx {
    pub fn new(tool: &'static str, common: Common) -> Ctx {
        Ctx {
            tool,
            common,
            sessions: HashMap::new(),
            failures: Vec::new(),
        }
    }

    /// A progress or status line for people, unless `--quiet`.
    pub fn info(&self, msg: impl std::fmt::Display) {
        if !self.common.quiet {
            say(format_args!("{}: {msg}", self.tool));
        }
    }

    pub fn warn(&self, msg: impl std::fmt::Display) {
        say(format_args!("{}: warning: {msg}", self.tool));
    }

    /// Report a failure and remember its exit code; the run carries on.
    pub fn fail(&mut self, e: &Error) {
        say(format_args!("{}: error: {e}", self.tool));
        self.failures.push(e.exit_code());
    }

    /// Whether progress output makes sense (stderr is a terminal and not `--quiet`).
    pub fn show_progress(&self) -> bool {
        !self.common.quiet && io::stderr().is_terminal()
    }

    /// The connection for a domain reference: `-c` or `LIBVIRT_DEFAULT_URI` when given,
    /// else the URI the record came from, else qemu:///system. Connections are reused.
    pub fn session(&mut self, r: &DomainRef) -> Result<Rc<Session>> {
        let explicit = self.common.connect.is_some()
            || std::env::var_os("LIBVIRT_DEFAULT_URI").is_some_and(|u| !u.is_empty());
        let uri = match (&r.uri, explicit) {
            (Some(u), false) if !u.is_empty() => u.clone(),
            _ => resolve_uri(self.common.connect.as_deref()),
        };
        if let Some(s) = self.sessions.get(&uri) {
            return Ok(s.clone());
        }
        let s = Rc::new(Session::open(&uri)?);
        self.sessions.insert(uri, s.clone());
        Ok(s)
    }

    /// The session for `-c`/the environment/the default, for tools that start from a name.
    pub fn default_session(&mut self) -> Result<Rc<Session>> {
        self.session(&DomainRef::default())
    }

    /// Write one record as a JSON line on stdout, flushed so pipes stream.
    pub fn emit(&self, rec: &Record) -> Result<()> {
        let line = serde_json::to_string(rec).expect("a record always serializes");
        let mut out = io::stdout().lock();
        match writeln!(out, "{line}").and_then(|_| out.flush()) {
            Ok(()) => Ok(()),
            // The reader went away: Unix tools stop quietly (SIGPIPE would have killed us).
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => std::process::exit(141),
            Err(e) => Err(Error::io("cannot write the record to", "stdout", e)),
        }
    }

    /// The domains to work on: the positional argument when given, else the records on
    /// stdin. An interactive stdin is a usage error rather than a silent wait.
    pub fn inputs(&self, arg: Option<&str>) -> Result<Box<dyn Iterator<Item = Result<DomainRef>>>> {
        if let Some(a) = arg {
            return Ok(Box::new(std::iter::once(Ok(DomainRef::by_arg(a)))));
        }
        let stdin = io::stdin();
        if stdin.is_terminal() {
            return Err(Error::usage(
                "no domain given",
                "name one as an argument, or pipe records in from another tpl tool",
            ));
        }
        Ok(Box::new(read_records(stdin.lock())))
    }

    /// Run `step` on every input domain, emitting the record it returns. A failing
    /// record is reported and not passed on; the others carry on.
    pub fn for_each_input(
        &mut self,
        arg: Option<&str>,
        mut step: impl FnMut(&mut Ctx, &Session, &DomainRef) -> Result<Record>,
    ) -> Result<()> {
        for r in self.inputs(arg)? {
            let res = r.and_then(|r| {
                let s = self.session(&r)?;
                step(self, &s, &r)
            });
            match res.and_then(|rec| self.emit(&rec)) {
                Ok(()) => {}
                Err(e) => self.fail(&e),
            }
        }
        Ok(())
    }

    /// The exit code of the run: 0, the code all failures share, or 1 when they differ.
    pub fn exit_code(&self) -> u8 {
        match self.failures.first() {
            None => 0,
            Some(&c) if self.failures.iter().all(|&f| f == c) => c,
            Some(_) => 1,
        }
    }
}

/// Parse the arguments, run the tool's body, and turn the outcome into an exit code.
pub fn run<A: Parser>(
    tool: &'static str,
    common: fn(&A) -> &Common,
    body: impl FnOnce(&A, &mut Ctx) -> Result<()>,
) -> ExitCode {
    restore_sigpipe();
    virt::error::clear_error_callback();
    let args = A::parse();
    let mut ctx = Ctx::new(tool, common(&args).clone());
    if let Err(e) = body(&args, &mut ctx) {
        ctx.fail(&e);
    }
    ExitCode::from(ctx.exit_code())
}

/// Rust ignores SIGPIPE; a Unix filter should die quietly when its reader goes away.
#[allow(unsafe_code)]
fn restore_sigpipe() {
    // SAFETY: setting a signal disposition to the default touches no Rust state.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// One line for people on stderr. A closed stderr must not stop a step halfway (eprintln!
/// panics on EPIPE), so a line that cannot be written is dropped.
pub fn say(line: std::fmt::Arguments) {
    let _ = writeln!(io::stderr(), "{line}");
}

/// Run `f` with SIGINT, SIGTERM, SIGHUP, SIGQUIT and SIGPIPE held back, for a step that must
/// not stop halfway; one that arrived meanwhile takes effect when `f` is done.
pub fn uninterrupted<T>(f: impl FnOnce() -> T) -> T {
    use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow, Signal};
    let mut held = SigSet::empty();
    for s in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGPIPE,
    ] {
        held.add(s);
    }
    let mut before = SigSet::empty();
    // Blocking signals in our own thread cannot fail with a valid set.
    let _ = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&held), Some(&mut before));
    let out = f();
    let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&before), None);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_code_is_the_shared_code_or_1() {
        let mut c = Ctx::new(
            "tpl-test",
            Common {
                quiet: true,
                ..Default::default()
            },
        );
        assert_eq!(c.exit_code(), 0);
        c.fail(&Error::refused("a", "b"));
        c.fail(&Error::refused("c", "d"));
        assert_eq!(c.exit_code(), 3);
        c.fail(&Error::usage("e", "f"));
        assert_eq!(c.exit_code(), 1);
    }

    #[test]
    fn an_argument_wins_over_stdin() {
        let c = Ctx::new("tpl-test", Common::default());
        let got: Vec<_> = c
            .inputs(Some("VM"))
            .unwrap()
            .collect::<Result<_>>()
            .unwrap();
        assert_eq!(got, vec![DomainRef::by_arg("VM")]);
    }

    #[test]
    fn uninterrupted_holds_the_stopping_signals_and_restores_the_mask() {
        use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow, Signal};
        let mask = || {
            let mut m = SigSet::empty();
            pthread_sigmask(SigmaskHow::SIG_BLOCK, None, Some(&mut m)).unwrap();
            m
        };
        assert!(!mask().contains(Signal::SIGINT));
        let inside = uninterrupted(mask);
        for s in [
            Signal::SIGINT,
            Signal::SIGTERM,
            Signal::SIGHUP,
            Signal::SIGPIPE,
        ] {
            assert!(inside.contains(s), "{s} not held");
        }
        assert!(!mask().contains(Signal::SIGINT) && !mask().contains(Signal::SIGPIPE));
    }
}
