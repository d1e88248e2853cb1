fn main() -> std::process::ExitCode {
    tpl_rename::main()
}
