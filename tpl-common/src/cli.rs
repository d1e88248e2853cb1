//! The command-line harness every tool runs in: common options, the connection, input records, output, messages, locks, signals and exit codes.
//!
//! Process behaviour lives here and nowhere else:
//! - stdout carries only records; a closed stdout stops the tool quietly, which then dies
//!   by SIGPIPE like any filter in a pipe;
//! - stderr is for people, through [`say`] only, which escapes what it writes and never
//!   fails (a closed stderr never kills a tool: SIGPIPE stays ignored while steps run);
//! - SIGINT, SIGTERM and SIGHUP stop the tool at the next safe point, what was unfinished
//!   is undone, and then the tool dies by the same signal ([`crate::signals`]);
//! - only [`run`], that is `main`, ends the process.

use std::io::{self, IsTerminal, Write};
use std::process::ExitCode;
use std::rc::Rc;
use std::time::Duration;

use clap::Parser;

use crate::dom::Dom;
use crate::error::{Error, Result};
use crate::journal;
use crate::lock::DomainLock;
use crate::record::{read_records, DomainRef, Record};
use crate::session::Session;
use crate::signals::{die_by_sigpipe, Interrupt};
use crate::state;
use crate::text::shown;
use crate::uri::resolve_uri;

/// How long a tool waits by default for another one to let go of a domain's lock.
pub const DEFAULT_WAIT_SECS: u64 = 300;

/// Options every tool takes, named as virsh names them.
#[derive(clap::Args, Debug, Clone)]
pub struct Common {
    /// Hypervisor connection URI, as for virsh [default: $LIBVIRT_DEFAULT_URI, else qemu:///system for root, qemu:///session for other users]
    #[arg(short = 'c', long = "connect", value_name = "URI")]
    pub connect: Option<String>,

    /// Print only errors and warnings on stderr
    #[arg(short, long)]
    pub quiet: bool,

    /// While another tpl tool works on the same domain, wait up to SECONDS for it (saying
    /// which tool it is), then give up with exit status 3
    #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_WAIT_SECS)]
    pub wait: u64,

    /// For RBD disks: the Ceph configuration file (with the keyring it names)
    /// [default: $CEPH_CONF, else /etc/ceph/ceph.conf]
    #[arg(long, value_name = "FILE")]
    pub ceph_conf: Option<std::path::PathBuf>,

    /// For RBD disks: the cephx user, without "client." [default: the disk's
    /// <auth username>, else admin]
    #[arg(long, value_name = "NAME")]
    pub ceph_id: Option<String>,
}

impl Default for Common {
    fn default() -> Self {
        Common {
            connect: None,
            quiet: false,
            wait: DEFAULT_WAIT_SECS,
            ceph_conf: None,
            ceph_id: None,
        }
    }
}

/// What a tool's step sees of the run: messages, the connection, output, locks, the
/// stop flag, and the failures so far.
pub struct Ctx {
    pub tool: &'static str,
    pub common: Common,
    pub intr: Interrupt,
    session: Option<Rc<Session>>,
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
    pub fn new(tool: &'static str, common: Common, intr: Interrupt) -> Ctx {
        Ctx {
            tool,
            common,
            intr,
            session: None,
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

    /// The URI of this run's connection: `-c`, else `LIBVIRT_DEFAULT_URI`, else virsh's
    /// default for this user. Never a record's: the input does not choose what to connect to.
    pub fn uri(&self) -> String {
        resolve_uri(self.common.connect.as_deref())
    }

    /// This run's one connection, opened at the first call. What killed runs left on it
    /// (an unfinished clone, a rename half done) is finished or undone first.
    pub fn session(&mut self) -> Result<Rc<Session>> {
        if let Some(s) = &self.session {
            return Ok(s.clone());
        }
        let ceph = crate::rbd::CephOptions {
            conf: self.common.ceph_conf.clone(),
            user: self.common.ceph_id.clone(),
        };
        state::require()?;
        let s = Rc::new(Session::open_with(&self.uri(), ceph)?);
        self.session = Some(s.clone());
        self.recover(&s, None);
        self.sweep_probes(&s);
        Ok(s)
    }

    /// Another connection of the run (tpl-clone --to): opened with the same Ceph options,
    /// and what dead runs left on it is finished or undone as for the main one.
    pub fn open_other(&self, uri: &str) -> Result<Rc<Session>> {
        let ceph = crate::rbd::CephOptions {
            conf: self.common.ceph_conf.clone(),
            user: self.common.ceph_id.clone(),
        };
        let s = Rc::new(Session::open_with(uri, ceph)?);
        self.recover(&s, None);
        self.sweep_probes(&s);
        Ok(s)
    }

    /// Remove what killed locality probes left for this connection (once, when it is
    /// opened: unlike the journals, nothing here waits for a domain's lock).
    fn sweep_probes(&self, s: &Session) {
        for what in crate::locality::sweep_dead(&s.conn) {
            self.info(format!("removed {what}, left by a killed tpl tool"));
        }
    }

    /// Finish or undo what dead runs left on this connection: their unfinished clones'
    /// files, their half-done renames and removals (of domain `held` only, whose lock the
    /// caller holds, or of any domain whose lock is free).
    pub fn recover(&self, s: &Session, held: Option<&str>) {
        let cleaned = journal::clone::clean_dead_releasing(
            &state::clone_journal_dir(),
            &s.uri,
            |uuid| s.domain_exists(uuid),
            &mut |image, id, client| {
                let cluster = s.ceph.cluster().map_err(|e| e.to_string())?;
                crate::rbd::remove_leftover(cluster, image, id, client)
            },
            &mut |network, mac, ip| {
                crate::dhcp::release(&s.conn, &s.uri, network, mac, ip).map_err(|e| e.to_string())
            },
        );
        for what in cleaned.removed {
            self.info(format!("removed {what}, left by a killed tpl-clone"));
        }
        for why in cleaned.kept {
            self.warn(why);
        }
        let lockdir = state::lock_dir();
        // the held lock stands for its domain; any other domain's lock is taken if free
        let lock = |uuid: &str| match held {
            Some(h) if h.eq_ignore_ascii_case(uuid) => Some(None),
            _ => DomainLock::try_acquire(&lockdir, uuid, self.tool)
                .ok()
                .flatten()
                .map(Some),
        };
        let mut notes = journal::rename::recover_dead(s, &state::rename_journal_dir(), held, lock);
        notes.extend(journal::remove::recover_dead(
            s,
            &state::remove_journal_dir(),
            held,
            lock,
        ));
        for (warning, text) in notes {
            if warning {
                self.warn(text);
            } else {
                self.info(text);
            }
        }
    }

    /// Take the lock of `dom` (see [`crate::lock`]), waiting up to `--wait` for the tool
    /// that holds it and saying so; then finish or undo a rename of it that a killed run
    /// left, and re-read its name (it may have changed while we waited). Everything a
    /// tool decides from a domain's state and then changes happens under this lock.
    pub fn lock(&self, dom: &mut Dom) -> Result<DomainLock> {
        let name = dom.name.clone();
        let lock = DomainLock::acquire(
            &state::lock_dir(),
            &dom.uuid,
            self.tool,
            Duration::from_secs(self.common.wait),
            &self.intr,
            |who| {
                self.info(format!(
                    "domain '{}' is busy: {who} is working on it; waiting up to {} s (--wait)",
                    shown(&name),
                    self.common.wait
                ))
            },
        )
        .map_err(|e| match e {
            Error::Refused { why, .. } => {
                Error::refused(format!("cannot work on domain '{}'", shown(&name)), why)
            }
            e => e,
        })?;
        self.recover(dom.session, Some(&dom.uuid));
        dom.refresh_name()?;
        Ok(lock)
    }

    /// Write one record as a JSON line on stdout, flushed so pipes stream. A closed stdout
    /// is [`Error::StdoutClosed`]: the caller stops, and [`run`] ends the tool quietly.
    pub fn emit(&self, rec: &Record) -> Result<()> {
        let line = serde_json::to_string(rec).expect("a record always serializes");
        let mut out = io::stdout().lock();
        match writeln!(out, "{line}").and_then(|_| out.flush()) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Err(Error::StdoutClosed),
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
    /// record is reported and not passed on; the others carry on. A stopping signal or a
    /// closed stdout ends the loop.
    pub fn for_each_input(
        &mut self,
        arg: Option<&str>,
        mut step: impl FnMut(&mut Ctx, &Session, &DomainRef) -> Result<Record>,
    ) -> Result<()> {
        for r in self.inputs(arg)? {
            self.intr.check()?;
            let res = r.and_then(|r| {
                let s = self.session()?;
                r.check_uri(&s.uri)?;
                step(self, &s, &r)
            });
            match res.and_then(|rec| self.emit(&rec)) {
                Ok(()) => {}
                Err(e @ (Error::StdoutClosed | Error::Interrupted { .. })) => return Err(e),
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

/// Parse the arguments, run the tool's body, and end the way the module says.
pub fn run<A: Parser>(
    tool: &'static str,
    common: fn(&A) -> &Common,
    body: impl FnOnce(&A, &mut Ctx) -> Result<()>,
) -> ExitCode {
    virt::error::clear_error_callback();
    let args = A::parse();
    let intr = match Interrupt::install() {
        Ok(i) => i,
        Err(e) => {
            say(format_args!("{tool}: error: {e}"));
            return ExitCode::from(e.exit_code());
        }
    };
    let mut ctx = Ctx::new(tool, common(&args).clone(), intr.clone());
    match body(&args, &mut ctx) {
        Ok(()) => {}
        Err(Error::StdoutClosed) => {
            drop(ctx);
            die_by_sigpipe();
            return ExitCode::from(Error::StdoutClosed.exit_code());
        }
        Err(e) => ctx.fail(&e),
    }
    let code = ctx.exit_code();
    // The connection is closed before the process ends by the signal.
    drop(ctx);
    intr.reraise();
    ExitCode::from(code)
}

/// One line for people on stderr, with every hidden character escaped (see
/// [`crate::text`]): nothing a message quotes can break a line or reach the terminal as a
/// control sequence. A closed stderr must not stop a step halfway, so a line that cannot
/// be written is dropped.
pub fn say(line: std::fmt::Arguments) {
    let text = line.to_string();
    let mut err = io::stderr().lock();
    let _ = writeln!(err, "{}", crate::text::escape(&text));
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
            Interrupt::default(),
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
        let c = Ctx::new("tpl-test", Common::default(), Interrupt::default());
        let got: Vec<_> = c
            .inputs(Some("VM"))
            .unwrap()
            .collect::<Result<_>>()
            .unwrap();
        assert_eq!(got, vec![DomainRef::by_arg("VM")]);
    }
}
