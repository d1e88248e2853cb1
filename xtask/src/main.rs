//! xtask: writes the man pages and shell completions of every tool from its clap definition, and the JSON Schema of the record from its Rust types.
//!
//!     cargo run -p xtask -- docs OUTDIR
//!
//! writes OUTDIR/man/man1/tpl-*.1, OUTDIR/completions/{bash,zsh,fish}/… and
//! OUTDIR/tpl-record.schema.json, which `make install` puts where man, bash-completion,
//! zsh and fish look (the schema beside the man pages' share directory).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Command, CommandFactory};
use clap_complete::Shell;

fn commands() -> Vec<Command> {
    vec![
        tpl_generalize::Args::command(),
        tpl_lock::Args::command(),
        tpl_rename::Args::command(),
        tpl_clone::Args::command(),
        tpl_list::Args::command(),
        tpl_rm::Args::command(),
    ]
}

/// The JSON Schema of a record, generated from `tpl_common::record::Record`.
fn record_schema() -> String {
    let schema = schemars::schema_for!(tpl_common::record::Record);
    serde_json::to_string_pretty(&schema).expect("a schema serializes")
}

fn write_docs(out: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("tpl-record.schema.json"), record_schema() + "\n")?;
    let man = out.join("man/man1");
    std::fs::create_dir_all(&man)?;
    for cmd in commands() {
        let name = cmd.get_name().to_string();
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
        std::fs::write(man.join(format!("{name}.1")), page)?;
        for (shell, dir, file) in [
            (Shell::Bash, "bash", name.clone()),
            (Shell::Zsh, "zsh", format!("_{name}")),
            (Shell::Fish, "fish", format!("{name}.fish")),
        ] {
            let d = out.join("completions").join(dir);
            std::fs::create_dir_all(&d)?;
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut cmd.clone(), &name, &mut buf);
            std::fs::write(d.join(file), buf)?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [task, out] if task == "docs" => match write_docs(&PathBuf::from(out)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("xtask: error: cannot write docs to '{out}' ({e})");
                ExitCode::FAILURE
            }
        },
        _ => {
            eprintln!("usage: cargo run -p xtask -- docs OUTDIR");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tool_gets_a_man_page_and_completions() {
        for cmd in commands() {
            cmd.clone().debug_assert();
        }
        let d = std::env::temp_dir().join(format!("tpl-xtask-{}", std::process::id()));
        write_docs(&d).unwrap();
        for t in [
            "tpl-generalize",
            "tpl-lock",
            "tpl-rename",
            "tpl-clone",
            "tpl-list",
            "tpl-rm",
        ] {
            let page = std::fs::read_to_string(d.join(format!("man/man1/{t}.1"))).unwrap();
            assert!(
                page.contains(".TH") && page.contains("connect"),
                "{t}: {page}"
            );
            let bash = std::fs::read_to_string(d.join(format!("completions/bash/{t}"))).unwrap();
            assert!(bash.contains("--connect"), "{t}");
            assert!(d.join(format!("completions/zsh/_{t}")).is_file());
            assert!(d.join(format!("completions/fish/{t}.fish")).is_file());
        }
        let schema: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(d.join("tpl-record.schema.json")).unwrap(),
        )
        .unwrap();
        for field in [
            "schema", "uri", "name", "uuid", "state", "disks", "template", "history",
        ] {
            assert!(
                schema["required"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|f| f == field),
                "{field} is not required in {schema}"
            );
        }
        assert!(schema.to_string().contains("shut off"), "the state names");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
