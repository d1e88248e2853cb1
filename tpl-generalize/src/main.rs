fn main() -> std::process::ExitCode {
    tpl_generalize::main()
}
