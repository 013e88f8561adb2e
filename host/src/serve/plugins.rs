//! Hot-swappable plugins: each name maps to a slot holding its current version.
//!
//! A new version is compiled and validated (world, `describe()`, config schema, name)
//! before it is switched in atomically; runs pin the version they start with, so runs
//! in flight finish on it. The previous versions are kept for rollback.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use serde_json::{Value, json};

use crate::component::{Component, ConfigProblem, Registry, StageContext};
use crate::error::StageError;
use crate::plugin::{Plugin, PluginRuntime, WasmComponent};

/// One version of a plugin and how many runs it has served.
pub struct Version {
    pub plugin: Arc<Plugin>,
    pub runs_served: AtomicU64,
}

pub struct Slot {
    pub name: String,
    current: ArcSwap<Version>,
    previous: Mutex<Vec<Arc<Version>>>,
}

impl Slot {
    pub fn current(&self) -> Arc<Version> {
        self.current.load_full()
    }
}

/// The component pipelines see for a swappable plugin.
pub struct SwappableComponent {
    slot: Arc<Slot>,
}

#[async_trait::async_trait]
impl Component for SwappableComponent {
    fn name(&self) -> &str {
        &self.slot.name
    }
    fn version(&self) -> Option<String> {
        Some(self.slot.current().plugin.version.clone())
    }
    fn check_config(&self, config: &Value) -> Vec<ConfigProblem> {
        WasmComponent::new(self.slot.current().plugin.clone()).check_config(config)
    }
    fn sees_secrets(&self) -> bool {
        false
    }
    fn pin(&self) -> Option<Arc<dyn Component>> {
        let v = self.slot.current();
        v.runs_served.fetch_add(1, Ordering::Relaxed);
        Some(Arc::new(WasmComponent::new(v.plugin.clone())))
    }
    async fn invoke(
        &self,
        ctx: &StageContext,
        config: Value,
        upstream: Arc<Value>,
    ) -> Result<Value, StageError> {
        // Only reached when a caller did not pin; use the current version.
        WasmComponent::new(self.slot.current().plugin.clone())
            .invoke(ctx, config, upstream)
            .await
    }
}

/// Why a swap was refused; the old version keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    #[error("{0}")]
    Invalid(String),
    #[error("no plugin named \"{0}\"")]
    Unknown(String),
    #[error("plugin \"{0}\" has no previous version to roll back to")]
    NothingToRollBack(String),
}

pub struct PluginRegistry {
    runtime: Arc<PluginRuntime>,
    slots: RwLock<BTreeMap<String, Arc<Slot>>>,
    /// Where uploaded versions are kept, so a restart serves what was last swapped in.
    pub upload_dir: Option<PathBuf>,
}

impl PluginRegistry {
    pub fn new(
        runtime: Arc<PluginRuntime>,
        plugins: Vec<Arc<Plugin>>,
        upload_dir: Option<PathBuf>,
    ) -> PluginRegistry {
        let slots = plugins
            .into_iter()
            .map(|p| {
                let name = p.name.clone();
                let version = Arc::new(Version {
                    plugin: p,
                    runs_served: AtomicU64::new(0),
                });
                (
                    name.clone(),
                    Arc::new(Slot {
                        name,
                        current: ArcSwap::new(version),
                        previous: Mutex::new(Vec::new()),
                    }),
                )
            })
            .collect();
        PluginRegistry {
            runtime,
            slots: RwLock::new(slots),
            upload_dir,
        }
    }

    /// The built-ins plus a swappable component per plugin, for compiling pipelines.
    pub fn registry(&self) -> Registry {
        let mut r = Registry::builtins();
        for slot in self.slots.read().expect("slots lock").values() {
            r.register(Arc::new(SwappableComponent { slot: slot.clone() }));
        }
        r
    }

    pub fn list(&self) -> Vec<Value> {
        self.slots
            .read()
            .expect("slots lock")
            .values()
            .map(|slot| {
                let v = slot.current();
                let p = &v.plugin;
                json!({
                    "name": slot.name,
                    "version": p.version,
                    "world": p.kind,
                    "sha256": p.hash,
                    "loaded_at": humantime::format_rfc3339_seconds(p.loaded_at).to_string(),
                    "runs_served": v.runs_served.load(Ordering::Relaxed),
                    "file": p.path.display().to_string(),
                    "previous_versions": slot.previous.lock().expect("previous lock").iter().map(|v| json!({"version": v.plugin.version, "sha256": v.plugin.hash})).collect::<Vec<_>>(),
                })
            })
            .collect()
    }

    /// Compiles and validates `bytes`, then switches `name` to it. Returns (old, new) versions.
    pub async fn swap(
        &self,
        name: &str,
        bytes: &[u8],
        origin: &str,
    ) -> Result<(Option<String>, Arc<Plugin>), SwapError> {
        let started = Instant::now();
        let shown = PathBuf::from(origin);
        let plugin = self
            .runtime
            .load_bytes(&shown, bytes)
            .await
            .map_err(|e| SwapError::Invalid(e.to_string()))?;
        if plugin.name != name {
            return Err(SwapError::Invalid(format!(
                "the component names itself \"{}\", not \"{name}\"",
                plugin.name
            )));
        }
        let slot = self.slots.read().expect("slots lock").get(name).cloned();
        let Some(slot) = slot else {
            return Err(SwapError::Unknown(name.to_string()));
        };
        let old = slot.current();
        if old.plugin.kind != plugin.kind {
            return Err(SwapError::Invalid(
                format!(
                    "\"{name}\" is a {:?} but the upload is a {:?}",
                    old.plugin.kind, plugin.kind
                )
                .to_lowercase(),
            ));
        }
        if old.plugin.hash == plugin.hash {
            return Ok((Some(old.plugin.version.clone()), old.plugin.clone()));
        }
        let plugin = Arc::new(plugin);
        if let Some(dir) = &self.upload_dir {
            if let Err(e) = persist(dir, name, bytes) {
                tracing::warn!(target: "fmhost::serve", plugin = name, "cannot keep the uploaded version on disk: {e}");
            }
        }
        let new = Arc::new(Version {
            plugin: plugin.clone(),
            runs_served: AtomicU64::new(0),
        });
        let previous = slot.current.swap(new);
        slot.previous.lock().expect("previous lock").push(previous);
        tracing::info!(
            target: "fmhost::serve",
            plugin = name,
            old_version = %old.plugin.version,
            old_sha256 = %&old.plugin.hash[..12],
            new_version = %plugin.version,
            new_sha256 = %&plugin.hash[..12],
            origin,
            swap_ms = started.elapsed().as_millis() as u64,
            "swapped plugin {name}: {} ({}) -> {} ({}) from {origin} in {} ms",
            old.plugin.version,
            &old.plugin.hash[..12],
            plugin.version,
            &plugin.hash[..12],
            started.elapsed().as_millis()
        );
        Ok((Some(old.plugin.version.clone()), plugin))
    }

    /// Goes back to the version before the current one.
    pub fn rollback(&self, name: &str) -> Result<(String, String), SwapError> {
        let slot = self
            .slots
            .read()
            .expect("slots lock")
            .get(name)
            .cloned()
            .ok_or_else(|| SwapError::Unknown(name.to_string()))?;
        let previous = slot
            .previous
            .lock()
            .expect("previous lock")
            .pop()
            .ok_or_else(|| SwapError::NothingToRollBack(name.to_string()))?;
        let to = previous.plugin.version.clone();
        let from = slot.current.swap(previous);
        tracing::info!(target: "fmhost::serve", plugin = name, old_version = %from.plugin.version, new_version = %to, "rolled back plugin {name}: {} -> {to}", from.plugin.version);
        Ok((from.plugin.version.clone(), to))
    }

    /// Swaps in a component file dropped into a watched directory.
    pub async fn swap_file(&self, path: &Path) {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(target: "fmhost::serve", file = %path.display(), "cannot read plugin file: {e}");
                return;
            }
        };
        let name = match self.runtime.load_bytes(path, &bytes).await {
            Ok(p) => p.name.clone(),
            Err(e) => {
                tracing::warn!(target: "fmhost::serve", file = %path.display(), "refused plugin file; the current version keeps serving: {e}");
                return;
            }
        };
        if let Err(e) = self.swap(&name, &bytes, &path.display().to_string()).await {
            tracing::warn!(target: "fmhost::serve", file = %path.display(), "refused plugin file; the current version keeps serving: {e}");
        }
    }
}

fn persist(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let stamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    std::fs::write(dir.join(format!("{name}-{stamp}.wasm")), bytes)
}

/// Watches plugin directories and swaps in complete `.wasm` files: an event starts a
/// quiet period, and a file is acted on once it has stopped changing.
pub fn watch(
    registry: Arc<PluginRegistry>,
    dirs: Vec<PathBuf>,
) -> notify::Result<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<PathBuf>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            if matches!(
                event.kind,
                notify::EventKind::Create(_)
                    | notify::EventKind::Modify(_)
                    | notify::EventKind::Access(notify::event::AccessKind::Close(_))
            ) {
                for p in event.paths {
                    if p.extension().is_some_and(|e| e == "wasm") {
                        let _ = tx.send(p);
                    }
                }
            }
        }
    })?;
    for d in &dirs {
        watcher.watch(d, RecursiveMode::NonRecursive)?;
    }
    tokio::spawn(async move {
        let quiet = Duration::from_millis(300);
        let mut pending: BTreeMap<PathBuf, Instant> = BTreeMap::new();
        loop {
            let next = pending.values().min().map(|t| *t + quiet);
            tokio::select! {
                got = rx.recv() => match got {
                    Some(p) => { pending.insert(p, Instant::now()); }
                    None => break,
                },
                _ = async { match next { Some(t) => tokio::time::sleep_until(t.into()).await, None => std::future::pending().await } } => {
                    let now = Instant::now();
                    let ready: Vec<PathBuf> = pending.iter().filter(|(_, t)| now.duration_since(**t) >= quiet).map(|(p, _)| p.clone()).collect();
                    for p in ready {
                        pending.remove(&p);
                        if p.exists() {
                            registry.swap_file(&p).await;
                        }
                    }
                }
            }
        }
    });
    Ok(watcher)
}
