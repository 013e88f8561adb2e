//! Compiled components cached on disk, keyed by content hash and engine settings,
//! so a second `fmhost run` deserialises instead of compiling; beside each, what the
//! component said of itself in `describe()`, so a command can know every plugin's name
//! on its search path without deserialising or instantiating any of them.

use std::hash::{Hash, Hasher};
use std::path::PathBuf;

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

pub struct CompileCache {
    dir: Option<PathBuf>,
    engine_key: u64,
}

/// `FMHOST_CACHE_DIR`, else `$XDG_CACHE_HOME/fmhost`, else `~/.cache/fmhost`.
pub fn default_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("FMHOST_CACHE_DIR") {
        return Some(PathBuf::from(dir));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("fmhost"))
}

/// The hex SHA-256 of a component's bytes: its identity in the cache, the registry and logs.
pub fn content_hash(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl CompileCache {
    pub fn new(engine: &Engine, dir: Option<PathBuf>) -> CompileCache {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        env!("CARGO_PKG_VERSION").hash(&mut h);
        CompileCache {
            dir: dir.map(|d| d.join("components")),
            engine_key: h.finish(),
        }
    }

    /// Loads the compiled form of `bytes`, compiling (and storing) it on a miss.
    pub fn load(&self, engine: &Engine, bytes: &[u8], hash: &str) -> wasmtime::Result<Component> {
        let Some(dir) = &self.dir else {
            return Component::new(engine, bytes);
        };
        let path = dir.join(format!("{}-{:016x}.cwasm", &hash[..32], self.engine_key));
        if path.exists() {
            // SAFETY: the file was written by `Engine::precompile_component` of an engine
            // with the same compatibility hash, into a directory only fmhost writes;
            // wasmtime also checks the header and refuses incompatible artifacts.
            match unsafe { Component::deserialize_file(engine, &path) } {
                Ok(c) => return Ok(c),
                Err(e) => {
                    tracing::warn!(target: "fmhost::plugin", path = %path.display(), "ignoring unusable compile cache entry: {e}")
                }
            }
        }
        let compiled = engine.precompile_component(bytes)?;
        // A cache we cannot write is a slower run, not a failed one.
        if let Err(e) = write_atomically(dir, &path, &compiled) {
            tracing::warn!(target: "fmhost::plugin", dir = %dir.display(), "cannot write the compile cache: {e}");
        }
        // SAFETY: `compiled` was just produced by this engine.
        unsafe { Component::deserialize(engine, &compiled) }
    }
}

/// A component's `describe()`, as the host accepted it at load (see `load_bytes`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Described {
    pub name: String,
    pub version: String,
    /// What it describes itself as: `transform` or `connector`.
    pub kind: super::World,
    pub description: String,
    /// JSON text; "" for none.
    pub config_schema: String,
    pub allowed_hosts: Vec<String>,
}

impl CompileCache {
    fn described_path(&self, hash: &str) -> Option<PathBuf> {
        let dir = self.dir.as_ref()?;
        Some(dir.join(format!(
            "{}-{:016x}.describe.json",
            &hash[..32],
            self.engine_key
        )))
    }

    /// The descriptor stored for the component with this hash by a load that accepted
    /// it, under this engine and fmhost version; `None` when there is none (or it is
    /// unreadable: the component is then loaded and described again).
    pub fn described(&self, hash: &str) -> Option<Described> {
        let bytes = std::fs::read(self.described_path(hash)?).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn store_described(&self, hash: &str, d: &Described) {
        let (Some(dir), Some(path)) = (&self.dir, self.described_path(hash)) else {
            return;
        };
        let Ok(text) = serde_json::to_vec(d) else {
            return;
        };
        if let Err(e) = write_atomically(dir, &path, &text) {
            tracing::warn!(target: "fmhost::plugin", dir = %dir.display(), "cannot write the compile cache: {e}");
        }
    }
}

fn write_atomically(
    dir: &std::path::Path,
    path: &std::path::Path,
    bytes: &[u8],
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".tmp-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}
