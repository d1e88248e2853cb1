//! The tpl-rm binary: the tool lives in the library (lib.rs), where xtask also finds its clap definition for the man page.
fn main() -> std::process::ExitCode {
    tpl_rm::main()
}
