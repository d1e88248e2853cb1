fn main() -> std::process::ExitCode {
    tpl_common::cli::not_implemented("tpl-clone")
}
