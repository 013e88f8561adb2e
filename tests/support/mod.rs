//! Shared test support: the fake vendor, and running the real `fmhost` binary.

pub mod fake;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub use fake::{Fake, Reply};

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ has a parent")
        .to_path_buf()
}

/// A scratch directory unique to one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = root().join("target").join("test-scratch").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// `fmhost` with a clean environment: no inherited FMHOST_* settings, and a journal
/// shared by the tests (under target/) rather than the user's own; a test that looks
/// at the journal passes its own `--state`.
pub fn fmhost() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fmhost"));
    for (k, _) in std::env::vars() {
        if k.starts_with("FMHOST_") {
            cmd.env_remove(k);
        }
    }
    cmd.env(
        "FMHOST_STATE",
        root().join("target/test-scratch/shared-state"),
    );
    cmd.current_dir(root());
    cmd
}

/// The admin token test servers are started with (`FMHOST_API_TOKEN`).
pub const API_TOKEN: &str = "test-admin-token-0123456789";

/// A client that sends [`API_TOKEN`] with every request.
pub fn api_client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        reqwest::header::HeaderValue::from_str(&format!("Bearer {API_TOKEN}")).unwrap(),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap()
}

/// Runs a command to completion off the async runtime (the fakes live on it).
pub async fn output(mut cmd: Command) -> Output {
    tokio::task::spawn_blocking(move || cmd.stdin(Stdio::null()).output().expect("spawn fmhost"))
        .await
        .expect("join")
}

/// Writes `value` as pretty JSON into `dir/name` and returns the path.
pub fn write_json(dir: &Path, name: &str, value: &serde_json::Value) -> PathBuf {
    let path = dir.join(name);
    let mut f = std::fs::File::create(&path).expect("create file");
    f.write_all(serde_json::to_string_pretty(value).unwrap().as_bytes())
        .expect("write file");
    path
}

pub struct Ran {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }
}

impl From<Output> for Ran {
    fn from(o: Output) -> Ran {
        Ran {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// `fmhost run PIPELINE --input-json INPUT` plus extra args.
pub async fn run_pipeline(pipeline: &Path, input: &serde_json::Value, extra: &[&str]) -> Ran {
    let mut cmd = fmhost();
    cmd.arg("run")
        .arg(pipeline)
        .arg("--input-json")
        .arg(input.to_string())
        .args(extra);
    output(cmd).await.into()
}
