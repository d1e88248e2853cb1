fn main() -> std::process::ExitCode {
    tpl_lock::main()
}
