fn main() -> std::process::ExitCode {
    tpl_clone::main()
}
