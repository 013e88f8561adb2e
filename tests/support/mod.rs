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
    if let Some(url) = postgres_journal() {
        cmd.env("FMHOST_JOURNAL", url);
    }
    cmd.current_dir(root());
    cmd
}

/// With `FMHOST_TEST_POSTGRES` (a server URL; `.ci/run` starts one), every `fmhost` a
/// test starts keeps its journal in PostgreSQL instead of SQLite, in a database of the
/// test's own (named after the test's thread, dropped and created again at its first
/// use), so the journal suite runs against both backends.
pub fn postgres_journal() -> Option<String> {
    let base = std::env::var("FMHOST_TEST_POSTGRES")
        .ok()
        .filter(|u| !u.is_empty())?;
    let test = std::thread::current().name().unwrap_or("main").to_string();
    let db = format!("fmhost_t_{:016x}", fnv1a(test.as_bytes()));
    let mut url = url::Url::parse(&base).expect("FMHOST_TEST_POSTGRES is a URL");
    url.set_path(&db);
    static CREATED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut created = CREATED.lock().unwrap_or_else(|p| p.into_inner());
    if !created.contains(&db) {
        let name = db.clone();
        // The synchronous client may not run on a tokio test's thread.
        std::thread::spawn(move || {
            let mut admin = postgres::Client::connect(&base, postgres::NoTls)
                .expect("connect to FMHOST_TEST_POSTGRES");
            for sql in [
                format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
                format!("CREATE DATABASE {name}"),
            ] {
                admin
                    .batch_execute(&sql)
                    .expect("create the test's database");
            }
        })
        .join()
        .expect("create the test's database");
        created.push(db);
    }
    Some(url.to_string())
}

/// Everything the test's journal holds, as text: the SQLite files under `state`, or
/// every row of the PostgreSQL journal (see [`postgres_journal`]).
pub fn journal_text(state: &Path) -> Vec<u8> {
    let Some(url) = postgres_journal() else {
        let mut all = Vec::new();
        for f in ["journal.db", "journal.db-wal"] {
            all.extend(std::fs::read(state.join(f)).unwrap_or_default());
        }
        return all;
    };
    std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
        let mut all = Vec::new();
        for table in [
            "runs",
            "stages",
            "attempts",
            "deliveries",
            "dead_letters",
            "pipelines",
            "fires",
            "cursors",
        ] {
            for row in c
                .query(&format!("SELECT t::text FROM {table} t"), &[])
                .expect("read the journal")
            {
                all.extend(row.get::<_, String>(0).into_bytes());
            }
        }
        all
    })
    .join()
    .expect("read the journal")
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
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
