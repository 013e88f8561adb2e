//! `cargo xtask <task>`: repository chores, each echoing the commands it runs.
//!
//! - `test`: build the plugins, then run every test in the workspace.
//! - `plugins`: build every plugin under `plugins/` into `target/plugins/NAME.wasm`,
//!   and the test fixtures under `tests/plugins/` into `target/test-plugins/`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = root();
    match args.first().map(String::as_str) {
        Some("test") => test(&root, &args[1..]),
        Some("plugins") => plugins(&root),
        _ => {
            eprintln!("usage: cargo xtask <test [cargo test args] | plugins>");
            std::process::exit(2);
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask/ has a parent").to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("$ {}", shown(cmd));
    let status = cmd.status().with_context(|| format!("cannot start {}", shown(cmd)))?;
    if !status.success() {
        bail!("{} failed with {status}", shown(cmd));
    }
    Ok(())
}

fn shown(cmd: &Command) -> String {
    std::iter::once(cmd.get_program()).chain(cmd.get_args()).map(|s| s.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ")
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn test(root: &Path, extra: &[String]) -> Result<()> {
    plugins(root)?;
    run(cargo().current_dir(root).args(["test", "--workspace"]).args(extra))
}

/// Builds the nested wasm32-wasip2 workspaces: the plugins and the test fixtures.
fn plugins(root: &Path) -> Result<()> {
    ensure_wasm_target()?;
    build_wasm_workspace(&root.join("plugins"), &root.join("target/plugins"))?;
    build_wasm_workspace(&root.join("tests/plugins"), &root.join("target/test-plugins"))
}

/// Builds one wasm workspace and copies each `cdylib` member to `out/NAME.wasm`.
fn build_wasm_workspace(dir: &Path, out: &Path) -> Result<()> {
    run(cargo().current_dir(dir).args(["build", "--release", "--target", "wasm32-wasip2"]))?;
    std::fs::create_dir_all(out)?;
    // Shared with the host workspace, so plugins are built once per checkout.
    let built = dir.join("target/wasm32-wasip2/release");
    let mut names: Vec<String> = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let manifest = entry?.path().join("Cargo.toml");
        let Ok(text) = std::fs::read_to_string(&manifest) else { continue };
        if !text.contains("cdylib") {
            continue;
        }
        let name = manifest.parent().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        names.push(name);
    }
    names.sort();
    for name in names {
        let artifact = built.join(format!("{}.wasm", name.replace('-', "_")));
        let dest = out.join(format!("{name}.wasm"));
        std::fs::copy(&artifact, &dest).with_context(|| format!("copy {}", artifact.display()))?;
        eprintln!("built {}", dest.display());
    }
    Ok(())
}

fn ensure_wasm_target() -> Result<()> {
    let installed = Command::new("rustup").args(["target", "list", "--installed"]).output();
    match installed {
        Ok(out) if String::from_utf8_lossy(&out.stdout).lines().any(|l| l.trim() == "wasm32-wasip2") => Ok(()),
        Ok(_) => run(Command::new("rustup").args(["target", "add", "wasm32-wasip2"])),
        Err(_) => {
            eprintln!("rustup not found; assuming the wasm32-wasip2 target is installed");
            Ok(())
        }
    }
}
