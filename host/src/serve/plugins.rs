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
    /// The new version asks for more than the current one was granted.
    #[error(
        "{0}; approve it in the same call (PUT ...?approve=true, or fmhost plugins swap --approve) if it should have it"
    )]
    NeedsApproval(String),
    #[error("no plugin named \"{0}\"")]
    Unknown(String),
    #[error("plugin \"{0}\" has no previous version to roll back to")]
    NothingToRollBack(String),
}

/// A served pipeline's stage that uses a plugin, so a swap can check its config first.
pub struct StageUse {
    pub pipeline: String,
    pub stage: String,
    /// Canonical component name.
    pub component: String,
    pub config: Value,
}

pub struct PluginRegistry {
    runtime: Arc<PluginRuntime>,
    slots: RwLock<BTreeMap<String, Arc<Slot>>>,
    uses: RwLock<Vec<StageUse>>,
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
            uses: RwLock::default(),
            upload_dir,
        }
    }

    /// Tells the registry which served stages use which plugin.
    pub fn set_uses(&self, uses: Vec<StageUse>) {
        *self.uses.write().expect("uses lock") = uses;
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
    /// `approve` is the operator approving, in this call, hosts or a world the current
    /// version was not granted.
    pub async fn swap(
        &self,
        name: &str,
        bytes: &[u8],
        origin: &str,
        approve: bool,
    ) -> Result<(Option<String>, Arc<Plugin>), SwapError> {
        let started = Instant::now();
        let shown = PathBuf::from(origin);
        let plugin = self
            .runtime
            .load_bytes(&shown, bytes)
            .await
            .map_err(|e| SwapError::Invalid(e.to_string()))?;
        self.swap_loaded(name, bytes, plugin, origin, approve, started)
    }

    fn swap_loaded(
        &self,
        name: &str,
        bytes: &[u8],
        plugin: Plugin,
        origin: &str,
        approve: bool,
        started: Instant,
    ) -> Result<(Option<String>, Arc<Plugin>), SwapError> {
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
        if old.plugin.hash == plugin.hash {
            return Ok((Some(old.plugin.version.clone()), old.plugin.clone()));
        }
        let mut asks = Vec::new();
        if old.plugin.kind != plugin.kind {
            asks.push(format!(
                "it is a {} where the current version is a {}",
                world_name(plugin.kind),
                world_name(old.plugin.kind)
            ));
        }
        let new_hosts: Vec<String> = plugin
            .allowed_hosts
            .iter()
            .filter(|h| !old.plugin.allowed_hosts.contains(h))
            .cloned()
            .collect();
        if !new_hosts.is_empty() {
            asks.push(format!(
                "it asks for host(s) {} that the current version was not granted",
                new_hosts.join(", ")
            ));
        }
        if !asks.is_empty() && !approve {
            return Err(SwapError::NeedsApproval(format!(
                "the new version of \"{name}\" asks for more: {}",
                asks.join("; ")
            )));
        }
        let problems: Vec<String> = self
            .uses
            .read()
            .expect("uses lock")
            .iter()
            .filter(|u| u.component == crate::component::canonical_name(name))
            .flat_map(|u| {
                plugin.check_config(&u.config).into_iter().map(move |p| {
                    format!(
                        "pipeline {} stage \"{}\": config{}: {}",
                        u.pipeline, u.stage, p.path, p.message
                    )
                })
            })
            .collect();
        if !problems.is_empty() {
            return Err(SwapError::Invalid(format!(
                "the new version's config schema rejects served stages: {}",
                problems.join("; ")
            )));
        }
        if approve && !new_hosts.is_empty() {
            self.runtime.approve_hosts(name, &new_hosts);
        }
        let mut plugin = plugin;
        if let Some(dir) = &self.upload_dir {
            match persist(dir, name, bytes) {
                Ok(path) => plugin.path = path,
                Err(e) => {
                    tracing::warn!(target: "fmhost::serve", plugin = name, "cannot keep the uploaded version on disk: {e}");
                }
            }
        }
        let plugin = Arc::new(plugin);
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
        // The version rolled back from must not come back at the next start.
        if let Some(dir) = &self.upload_dir
            && from.plugin.path.parent() == Some(dir.as_path())
        {
            let _ = std::fs::remove_file(&from.plugin.path);
        }
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
        let plugin = match self.runtime.load_bytes(path, &bytes).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(target: "fmhost::serve", file = %path.display(), "refused plugin file; the current version keeps serving: {e}");
                return;
            }
        };
        let name = plugin.name.clone();
        let origin = path.display().to_string();
        // A file dropped into a watched directory is never approved for more than the current version has.
        if let Err(e) = self.swap_loaded(&name, &bytes, plugin, &origin, false, Instant::now()) {
            tracing::warn!(target: "fmhost::serve", file = %path.display(), "refused plugin file; the current version keeps serving: {e}");
        }
    }
}

fn world_name(w: crate::plugin::World) -> &'static str {
    match w {
        crate::plugin::World::Transform => "transform",
        crate::plugin::World::Connector => "connector",
    }
}

/// Keeps an uploaded version in the state directory, where the next start finds it
/// (the newest file of a name wins). Older uploads of the name beyond the last few go.
fn persist(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let stamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let path = dir.join(format!("{name}-{stamp}.wasm"));
    let tmp = dir.join(format!(".{name}-{stamp}.tmp"));
    std::fs::write(&tmp, bytes)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    let mut older: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|f| f.to_str())
                .and_then(|f| {
                    f.strip_prefix(name)?
                        .strip_prefix('-')?
                        .strip_suffix(".wasm")
                })
                .is_some_and(|stamp| stamp.chars().all(|c| c.is_ascii_digit()))
        })
        .collect();
    older.sort();
    let keep = 5;
    if older.len() > keep {
        for p in &older[..older.len() - keep] {
            let _ = std::fs::remove_file(p);
        }
    }
    Ok(path)
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
        if let Ok(event) = event
            && matches!(
                event.kind,
                notify::EventKind::Create(_)
                    | notify::EventKind::Modify(_)
                    | notify::EventKind::Access(notify::event::AccessKind::Close(_))
            )
        {
            for p in event.paths {
                if p.extension().is_some_and(|e| e == "wasm") {
                    let _ = tx.send(p);
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
