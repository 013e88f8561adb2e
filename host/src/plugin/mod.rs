//! WebAssembly plugins: loading components, sandboxing them, and adapting them to the
//! [`Component`](crate::component::Component) trait so the scheduler cannot tell them
//! from built-ins.
//!
//! Each invocation gets a fresh instance from the pooling allocator (through an
//! `InstancePre`), a locked-down WASI context, a memory cap and an epoch deadline.
//! Plugins never open sockets and never see secret values: their HTTP goes through
//! [`crate::http`] via the `http` import, with secrets substituted here.

mod bindings;
mod cache;
mod component;
mod egress;
mod instance;
pub mod policy;
mod state;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use wasmtime::component::{HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

pub use cache::content_hash;
pub use component::WasmComponent;
pub use egress::{Grant, HostPattern, StageGrants, header_secret, secret_token};
pub use policy::Policy;
use state::PluginState;

/// How often the epoch advances; CPU deadlines are counted in these ticks.
const EPOCH_TICK: Duration = Duration::from_millis(10);
/// CPU deadline for a plugin whose stage has no timeout.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);
/// How long compiling a component may take when it is loaded.
pub const COMPILE_DEADLINE: Duration = Duration::from_secs(120);
/// How long `describe()` may take when a plugin is loaded.
pub const DESCRIBE_DEADLINE: Duration = Duration::from_secs(5);
/// Plugin instances a server's pool holds at once.
pub const SERVER_INSTANCES: u32 = 1000;
/// Plugin instances the pool of a one-run command (`fmhost run`, `validate`, ...) holds.
pub const CLI_INSTANCES: u32 = 256;
/// What one plugin component may hold (its own and its nested components' core
/// instances, linear memories and tables); a component beyond one is refused at load.
pub const MAX_CORE_INSTANCES_PER_COMPONENT: u32 = 64;
pub const MAX_MEMORIES_PER_COMPONENT: u32 = 4;
pub const MAX_TABLES_PER_COMPONENT: u32 = 16;
/// Bytes of each pooled linear memory kept resident between instances.
const KEEP_RESIDENT: usize = 8 << 20;
/// Idle pool slots that keep a plugin's memory image (and their resident pages).
const WARM_SLOTS: u32 = 32;
/// Memory cap per plugin instance unless `FMHOST_PLUGIN_MEMORY_MB` says otherwise.
pub const DEFAULT_MEMORY_LIMIT: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("plugin {path}: {message}")]
    Load { path: String, message: String },
    #[error("two plugins are named \"{name}\": {first} and {second}")]
    Duplicate {
        name: String,
        first: String,
        second: String,
    },
    #[error("plugin directory {path}: {message}")]
    Dir { path: String, message: String },
    #[error(
        "plugins {first} and {second} have names that differ only in case or '-'/'_', which pipelines cannot tell apart"
    )]
    Clash { first: String, second: String },
}

/// Which world a component was built against, judged by its imports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum World {
    Transform,
    Connector,
}

/// Engine, linkers and cache shared by every plugin in the process.
pub struct PluginRuntime {
    engine: Engine,
    transform_linker: Linker<PluginState>,
    connector_linker: Linker<PluginState>,
    cache: cache::CompileCache,
    pub memory_limit: usize,
    /// The operator's grants; a hot swap may add hosts it approves.
    policy: RwLock<Arc<Policy>>,
    /// This process's own server addresses, which no plugin may call ungranted.
    own_addrs: RwLock<Vec<SocketAddr>>,
    /// One permit per instance the pool can hold: an invocation beyond them waits for
    /// one to be freed instead of failing with the pool's "concurrent limit".
    slots: Arc<tokio::sync::Semaphore>,
    /// Compiles run one at a time, so a flood of uploads cannot take every core.
    compiling: Arc<tokio::sync::Semaphore>,
}

/// A loaded, validated plugin version.
pub struct Plugin {
    pub name: String,
    pub version: String,
    pub kind: World,
    pub description: String,
    pub config_schema: Option<Value>,
    validator: Option<crate::schema::Validator>,
    pub allowed_hosts: Vec<String>,
    pub path: PathBuf,
    /// SHA-256 of the component bytes.
    pub hash: String,
    pub loaded_at: SystemTime,
    pre: bindings::ConnectorPre<PluginState>,
    runtime: Arc<PluginRuntime>,
    /// What instantiates this version, built once at load.
    maker: instance::Maker,
    /// Instances made ahead of time for this version's next invocations.
    spares: Arc<instance::Spares>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("path", &self.path)
            .finish()
    }
}

impl PluginRuntime {
    /// Builds the engine: pooling allocator, epoch interruption, no component-model
    /// async (it makes calls about three times dearer), and an epoch ticker thread.
    pub fn new() -> anyhow::Result<Arc<PluginRuntime>> {
        Self::with_instances(SERVER_INSTANCES)
    }

    /// Like [`new`](Self::new) with a pool of `instances` live plugin instances (more
    /// invocations at once wait for a place). Setting the pool up costs about 3 µs per
    /// place (a guarded async stack each), so a one-run process asks for fewer.
    /// `FMHOST_PLUGIN_INSTANCES` overrides either.
    pub fn with_instances(instances: u32) -> anyhow::Result<Arc<PluginRuntime>> {
        let memory_limit = std::env::var("FMHOST_PLUGIN_MEMORY_MB")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .map(|mb| mb << 20)
            .unwrap_or(DEFAULT_MEMORY_LIMIT);
        let instances = std::env::var("FMHOST_PLUGIN_INSTANCES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(instances)
            .max(1);
        // Every total is `instances` times what one component may hold, so any component
        // that loads (wasmtime checks the per-component caps when it compiles one, and
        // the error names its count and the cap) can always be instantiated by a caller
        // holding one of `slots`: a componentize-py component holds a dozen core
        // instances, a Rust one three. Core instances are only counted; memory and
        // table slots are address space, reserved and not touched until used.
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(instances)
            .total_stacks(instances)
            .total_core_instances(instances * MAX_CORE_INSTANCES_PER_COMPONENT)
            .total_memories(instances * MAX_MEMORIES_PER_COMPONENT)
            .total_tables(instances * MAX_TABLES_PER_COMPONENT)
            .max_memories_per_component(MAX_MEMORIES_PER_COMPONENT)
            .max_core_instances_per_component(MAX_CORE_INSTANCES_PER_COMPONENT)
            .max_tables_per_component(MAX_TABLES_PER_COMPONENT)
            .max_component_instance_size(1 << 20)
            .max_core_instance_size(1 << 20)
            .max_memory_size(memory_limit.max(DEFAULT_MEMORY_LIMIT));
        // A slot's memory stays mapped between instances and only the pages the last
        // instance touched are reset (found with the PAGEMAP_SCAN ioctl where the kernel
        // has it, Linux 6.7+): a fresh instance then takes no page faults for what it
        // touches again, instead of one per page (see benchmarks/ANALYSIS.md). Memory
        // held this way is bounded by the warm slots kept times KEEP_RESIDENT. Without
        // the ioctl (kernels before 6.7) wasmtime would `memset` all of KEEP_RESIDENT at
        // every instance's end; there, slots are decommitted as before.
        let scan = PoolingAllocationConfig::is_pagemap_scan_available();
        pool.linear_memory_keep_resident(if scan { KEEP_RESIDENT } else { 0 })
            .table_keep_resident(if scan { 1 << 16 } else { 0 })
            .pagemap_scan(wasmtime::Enabled::Auto)
            .max_unused_warm_slots(WARM_SLOTS);
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .concurrency_support(false)
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config)?;

        let mut transform_linker: Linker<PluginState> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut transform_linker)?;
        bindings::fmhost::plugin::types::add_to_linker::<_, HasSelf<_>>(
            &mut transform_linker,
            |s| s,
        )?;
        bindings::fmhost::plugin::log::add_to_linker::<_, HasSelf<_>>(
            &mut transform_linker,
            |s| s,
        )?;
        let mut connector_linker: Linker<PluginState> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut connector_linker)?;
        bindings::Connector::add_to_linker::<_, HasSelf<_>>(&mut connector_linker, |s| s)?;

        let weak = engine.weak();
        std::thread::Builder::new()
            .name("fmhost-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })?;
        let cache = cache::CompileCache::new(&engine, cache::default_dir());
        Ok(Arc::new(PluginRuntime {
            engine,
            transform_linker,
            connector_linker,
            cache,
            memory_limit,
            policy: RwLock::new(Arc::new(Policy::builtin())),
            own_addrs: RwLock::default(),
            slots: Arc::new(tokio::sync::Semaphore::new(instances as usize)),
            compiling: Arc::new(tokio::sync::Semaphore::new(1)),
        }))
    }

    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_policy(&self, policy: Policy) {
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
    }

    /// Adds hosts the operator approved in a hot-swap call to the plugin's grant.
    pub fn approve_hosts(&self, plugin: &str, hosts: &[String]) {
        let mut guard = self.policy.write().unwrap_or_else(|e| e.into_inner());
        let mut p = (**guard).clone();
        p.approve_hosts(plugin, hosts);
        *guard = Arc::new(p);
    }

    /// Records the address this process serves on, so plugins cannot call it.
    pub fn add_own_addr(&self, addr: SocketAddr) {
        self.own_addrs
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(addr);
    }

    /// Waits for room in the instance pool; the permit is held until the instance is gone.
    pub(crate) async fn instance_slot(&self) -> tokio::sync::OwnedSemaphorePermit {
        self.slots
            .clone()
            .acquire_owned()
            .await
            .expect("the instance semaphore is never closed")
    }

    pub(crate) fn own_addrs(&self) -> Vec<SocketAddr> {
        self.own_addrs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Loads a component file and validates it: the right world, a working
    /// `describe()`, a config schema that parses.
    pub async fn load_file(self: &Arc<Self>, path: &Path) -> Result<Plugin, PluginError> {
        let bytes = std::fs::read(path).map_err(|e| load_err(path, e.to_string()))?;
        self.load_bytes(path, &bytes).await
    }

    pub async fn load_bytes(
        self: &Arc<Self>,
        path: &Path,
        bytes: &[u8],
    ) -> Result<Plugin, PluginError> {
        let hash = content_hash(bytes);
        let described = self.cache.described(&hash);
        self.load_hashed(path, bytes, hash, described).await
    }

    /// Loads a component whose hash is known; `described` is its cached `describe()`,
    /// which saves instantiating it (every check below is made either way).
    async fn load_hashed(
        self: &Arc<Self>,
        path: &Path,
        bytes: &[u8],
        hash: String,
        described: Option<cache::Described>,
    ) -> Result<Plugin, PluginError> {
        // Refuse what fmhost never grants before paying for a compile (seconds for a
        // large component, such as a JavaScript one that bundles an engine).
        if let Some(http) = top_level_imports(bytes)
            .map_err(|e| load_err(path, format!("not a valid WebAssembly component: {e}")))?
            .iter()
            .find(|i| i.starts_with("wasi:http/"))
        {
            return Err(load_err(
                path,
                format!(
                    "imports {http}, which fmhost does not grant; make HTTP calls through fmhost:plugin/http (for componentize-js, build with --disable http fetch-event)"
                ),
            ));
        }
        let component = {
            let (rt, bytes, hash) = (self.clone(), bytes.to_vec(), hash.clone());
            // Compiling is CPU-bound and can take seconds for large components: on a
            // blocking thread, one at a time, and waited for only so long.
            let _one = self.compiling.clone().acquire_owned().await;
            let compile =
                tokio::task::spawn_blocking(move || rt.cache.load(&rt.engine, &bytes, &hash));
            tokio::time::timeout(COMPILE_DEADLINE, compile)
                .await
                .map_err(|_| {
                    load_err(
                        path,
                        format!(
                            "compiling took longer than {} s; refused",
                            COMPILE_DEADLINE.as_secs()
                        ),
                    )
                })?
                .map_err(|e| load_err(path, e.to_string()))?
                .map_err(|e| {
                    load_err(
                        path,
                        format!("not a valid WebAssembly component: {}", chain(&e)),
                    )
                })?
        };
        let imports: Vec<String> = component
            .component_type()
            .imports(&self.engine)
            .map(|(name, _)| name.to_string())
            .collect();
        let world = if imports.iter().any(|i| i.starts_with("fmhost:plugin/http@")) {
            World::Connector
        } else {
            World::Transform
        };
        let linker = match world {
            World::Transform => &self.transform_linker,
            World::Connector => &self.connector_linker,
        };
        let instance_pre = linker.instantiate_pre(&component).map_err(|e| {
            load_err(path, format!("its imports cannot be satisfied (fmhost grants WASI p2 and fmhost:plugin@0.1.0 log/http): {}", chain(&e)))
        })?;
        let pre = bindings::ConnectorPre::new(instance_pre).map_err(|e| {
            load_err(
                path,
                format!("does not export fmhost:plugin/plugin@0.1.0: {}", chain(&e)),
            )
        })?;

        let fresh = described.is_none();
        let d = match described {
            Some(d) => d,
            None => self.describe(path, &pre).await?,
        };
        let kind = d.kind;
        if kind == World::Transform && world == World::Connector {
            return Err(load_err(
                path,
                format!(
                    "\"{}\" describes itself as a transform but imports http; build it against the connector world",
                    d.name
                ),
            ));
        }
        check_name(path, &d.name)?;
        let (config_schema, validator) = if d.config_schema.trim().is_empty() {
            (None, None)
        } else {
            let schema: Value = serde_json::from_str(&d.config_schema).map_err(|e| {
                load_err(
                    path,
                    format!("\"{}\": config schema is not JSON: {e}", d.name),
                )
            })?;
            let validator = crate::schema::compile(&schema)
                .map_err(|e| load_err(path, format!("\"{}\": config schema: {e}", d.name)))?;
            (Some(schema), Some(validator))
        };
        for h in &d.allowed_hosts {
            if HostPattern::parse(h).is_none() {
                return Err(load_err(
                    path,
                    format!(
                        "\"{}\": allowed host {h:?} is not a host, *.domain or host:port",
                        d.name
                    ),
                ));
            }
        }
        if fresh {
            self.cache.store_described(&hash, &d);
        }
        let maker = instance::Maker {
            plugin: Arc::from(d.name.as_str()),
            transform: kind == World::Transform,
            pre: pre.clone(),
            runtime: self.clone(),
        };
        Ok(Plugin {
            maker,
            name: d.name,
            version: d.version,
            kind,
            description: d.description,
            config_schema,
            validator,
            allowed_hosts: d.allowed_hosts,
            path: path.to_path_buf(),
            hash,
            loaded_at: SystemTime::now(),
            pre,
            runtime: self.clone(),
            spares: instance::Spares::new(),
        })
    }

    /// Instantiates a component once to ask it what it is.
    async fn describe(
        &self,
        path: &Path,
        pre: &bindings::ConnectorPre<PluginState>,
    ) -> Result<cache::Described, PluginError> {
        let mut state = PluginState::new(Arc::from("?"), self.memory_limit);
        state.cpu_deadline = Instant::now() + DESCRIBE_DEADLINE;
        let store = self.store(state);
        let describe_pre = pre.clone();
        let mut held = Held {
            _slot: self.instance_slot().await,
            store,
        };
        let task = executor().spawn(async move {
            let store = &mut held.store;
            let instance = describe_pre
                .instantiate_async(&mut *store)
                .await
                .map_err(|e| format!("cannot be instantiated: {}", chain(&e)))?;
            instance
                .fmhost_plugin_plugin()
                .call_describe(&mut *store)
                .await
                .map_err(|e| format!("describe() failed: {}", chain(&e)))
        });
        let d = tokio_util::task::AbortOnDropHandle::new(task)
            .await
            .map_err(|e| load_err(path, format!("describe() did not finish: {e}")))?
            .map_err(|e| load_err(path, e))?;
        Ok(cache::Described {
            name: d.name,
            version: d.version,
            kind: match d.kind {
                bindings::PluginKind::Transform => World::Transform,
                bindings::PluginKind::Connector => World::Connector,
            },
            description: d.description,
            config_schema: d.config_schema,
            allowed_hosts: d.allowed_hosts,
        })
    }

    /// A store whose guest yields to the async runtime at every epoch tick, so a
    /// spinning plugin holds a worker thread for at most one tick at a time and can be
    /// cancelled by any timeout around it, and traps once its wall-clock deadline passes.
    fn store(&self, state: PluginState) -> wasmtime::Store<PluginState> {
        let mut store = wasmtime::Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|ctx| {
            if Instant::now() >= ctx.data().cpu_deadline {
                Ok(wasmtime::UpdateDeadline::Interrupt)
            } else {
                Ok(wasmtime::UpdateDeadline::Yield(1))
            }
        });
        store
    }

    /// Like [`discover`](Self::discover), but when two files name the same plugin the
    /// newer file wins: in `serve`, dropping a new version into a watched directory is
    /// how a plugin is swapped, so both files are expected to be there at the next start.
    pub async fn discover_newest(
        self: &Arc<Self>,
        explicit: &[PathBuf],
    ) -> Result<Vec<Arc<Plugin>>, Vec<PluginError>> {
        self.discover_with(explicit, true, None).await
    }

    /// Finds plugins: each `--plugins` dir, then `FMHOST_PLUGIN_PATH`, then `./target/plugins`.
    /// Directories that do not exist are skipped, except those named explicitly.
    pub async fn discover(
        self: &Arc<Self>,
        explicit: &[PathBuf],
    ) -> Result<Vec<Arc<Plugin>>, Vec<PluginError>> {
        self.discover_with(explicit, false, None).await
    }

    /// Like [`discover`](Self::discover), but loads only the plugins whose names `wanted`
    /// accepts. Every file on the path is still checked against the others (duplicates,
    /// clashes, built-in names): a file whose `describe()` is in the compile cache is
    /// known by it without being deserialised or instantiated.
    pub async fn discover_wanted(
        self: &Arc<Self>,
        explicit: &[PathBuf],
        wanted: &(dyn Fn(&str) -> bool + Sync),
    ) -> Result<Vec<Arc<Plugin>>, Vec<PluginError>> {
        self.discover_with(explicit, false, Some(wanted)).await
    }

    async fn discover_with(
        self: &Arc<Self>,
        explicit: &[PathBuf],
        newest_wins: bool,
        wanted: Option<&(dyn Fn(&str) -> bool + Sync)>,
    ) -> Result<Vec<Arc<Plugin>>, Vec<PluginError>> {
        let mut dirs: Vec<(PathBuf, bool)> = explicit.iter().map(|d| (d.clone(), true)).collect();
        if let Some(path) = std::env::var_os("FMHOST_PLUGIN_PATH") {
            dirs.extend(std::env::split_paths(&path).map(|d| (d, false)));
        }
        dirs.push((PathBuf::from("target/plugins"), false));
        let mut errors = Vec::new();
        let mut seen_dirs = Vec::new();
        let mut found: Vec<Found> = Vec::new();
        for (dir, explicit) in dirs {
            let canonical = dir.canonicalize().unwrap_or_else(|_| dir.clone());
            if seen_dirs.contains(&canonical) {
                continue;
            }
            seen_dirs.push(canonical);
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if explicit => {
                    errors.push(PluginError::Dir {
                        path: dir.display().to_string(),
                        message: e.to_string(),
                    });
                    continue;
                }
                Err(_) => continue,
            };
            let mut files: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "wasm"))
                .collect();
            files.sort();
            for file in files {
                let bytes = match std::fs::read(&file) {
                    Ok(b) => b,
                    Err(e) => {
                        errors.push(load_err(&file, e.to_string()));
                        continue;
                    }
                };
                let hash = content_hash(&bytes);
                let described = self.cache.described(&hash);
                let p = match (wanted, described) {
                    (Some(_), Some(d)) => match check_name(&file, &d.name) {
                        Ok(()) => Found::Described {
                            d,
                            path: file,
                            bytes,
                            hash,
                        },
                        Err(e) => {
                            errors.push(e);
                            continue;
                        }
                    },
                    (_, described) => {
                        match self.load_hashed(&file, &bytes, hash, described).await {
                            Ok(p) => Found::Loaded(Arc::new(p)),
                            Err(e) => {
                                errors.push(e);
                                continue;
                            }
                        }
                    }
                };
                let mtime = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
                let canonical = crate::component::canonical_name(p.name());
                let clash = found.iter().find(|q| {
                    q.name() != p.name() && crate::component::canonical_name(q.name()) == canonical
                });
                if let Some(other) = clash {
                    errors.push(PluginError::Clash {
                        first: format!("\"{}\" ({})", other.name(), other.path().display()),
                        second: format!("\"{}\" ({})", p.name(), p.path().display()),
                    });
                } else if let Some(i) = found
                    .iter()
                    .position(|q| q.name() == p.name())
                    .filter(|_| newest_wins)
                {
                    if mtime(p.path()) > mtime(found[i].path()) {
                        tracing::info!(target: "fmhost::plugin", "{}: {} is newer than {}; using it", p.name(), p.path().display(), found[i].path().display());
                        found[i] = p;
                    }
                } else if let Some(first) = found.iter().find(|q| q.name() == p.name()) {
                    errors.push(PluginError::Duplicate {
                        name: p.name().to_string(),
                        first: first.path().display().to_string(),
                        second: p.path().display().to_string(),
                    });
                } else {
                    found.push(p);
                }
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let mut plugins = Vec::new();
        for p in found {
            if !wanted.is_none_or(|w| w(p.name())) {
                continue;
            }
            match p {
                Found::Loaded(p) => plugins.push(p),
                Found::Described {
                    d,
                    path,
                    bytes,
                    hash,
                } => match self.load_hashed(&path, &bytes, hash, Some(d)).await {
                    Ok(p) => plugins.push(Arc::new(p)),
                    Err(e) => errors.push(e),
                },
            }
        }
        if errors.is_empty() {
            Ok(plugins)
        } else {
            Err(errors)
        }
    }
}

/// A plugin file on the search path: loaded, or known by its cached `describe()` until
/// a command needs it.
enum Found {
    Loaded(Arc<Plugin>),
    Described {
        d: cache::Described,
        path: PathBuf,
        bytes: Vec<u8>,
        hash: String,
    },
}

impl Found {
    fn name(&self) -> &str {
        match self {
            Found::Loaded(p) => &p.name,
            Found::Described { d, .. } => &d.name,
        }
    }

    fn path(&self) -> &Path {
        match self {
            Found::Loaded(p) => &p.path,
            Found::Described { path, .. } => path,
        }
    }
}

/// A plugin instance kept alive across calls. Stages never use one (each invocation
/// gets a fresh instance); it exists to measure what a fresh instance costs.
pub struct WarmInstance {
    store: wasmtime::Store<PluginState>,
    bindings: bindings::Connector,
}

impl Plugin {
    /// Calls `invoke` with these texts in a fresh instance, as a stage does but with no
    /// run, secrets or HTTP grant: what the sandbox's crossing costs, for benchmarks.
    pub async fn invoke_text(&self, config: &str, input: &str) -> Result<String, String> {
        let call = state::Call {
            run_id: Arc::from("bench"),
            stage_id: Arc::from("bench"),
            trace: None,
            secrets: Arc::default(),
            http: None,
            cpu_deadline: Instant::now() + DEFAULT_DEADLINE,
        };
        let outcome = self
            .maker
            .invoke(&self.spares, call, config.to_owned(), input.to_owned())
            .await?;
        match outcome.result {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(e)) => Err(e.message),
            Err(trap) => Err(chain(&trap)),
        }
    }

    pub async fn warm_instance(&self) -> Result<WarmInstance, String> {
        let mut state = PluginState::new(Arc::from(self.name.as_str()), self.runtime.memory_limit);
        state.cpu_deadline = Instant::now() + Duration::from_secs(3600);
        let mut store = self.runtime.store(state);
        let bindings = self
            .pre
            .instantiate_async(&mut store)
            .await
            .map_err(|e| chain(&e))?;
        Ok(WarmInstance { store, bindings })
    }
}

impl WarmInstance {
    pub async fn invoke(&mut self, config: &str, input: &str) -> Result<String, String> {
        let (config, input) = (config.to_owned(), input.to_owned());
        match self
            .bindings
            .fmhost_plugin_plugin()
            .call_invoke(&mut self.store, &config, &input)
            .await
        {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(e)) => Err(e.message),
            Err(trap) => Err(chain(&trap)),
        }
    }
}

/// The names a component imports at its top level, read without compiling it.
fn top_level_imports(bytes: &[u8]) -> Result<Vec<String>, String> {
    let mut depth = 0usize;
    let mut names = Vec::new();
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        match payload.map_err(|e| e.to_string())? {
            wasmparser::Payload::Version { .. } => depth += 1,
            wasmparser::Payload::End(_) => depth = depth.saturating_sub(1),
            wasmparser::Payload::ComponentImportSection(reader) if depth == 1 => {
                for import in reader {
                    names.push(import.map_err(|e| e.to_string())?.name.name.to_string());
                }
            }
            _ => {}
        }
    }
    Ok(names)
}

/// A store and the pool place it occupies. Fields drop in order: the instance goes
/// back to the pool before the place is offered to the next invocation.
pub(crate) struct Held {
    pub store: wasmtime::Store<PluginState>,
    pub _slot: tokio::sync::OwnedSemaphorePermit,
}

/// The threads plugin code runs on: as many as there are cores, apart from the runtime
/// that accepts connections and schedules stages, so guests that spin (each yields
/// every epoch tick) compete with `/healthz` for the CPU through the OS scheduler, not
/// for a place in the same task queue. Built once; lives as long as the process.
pub(crate) fn executor() -> &'static tokio::runtime::Handle {
    static EXEC: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    EXEC.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get()))
            .thread_name("fmhost-plugin")
            .enable_all()
            .build()
            .expect("the plugin threads start")
    })
    .handle()
}

/// A plugin's name must be one pipelines can write and no built-in's.
fn check_name(path: &Path, name: &str) -> Result<(), PluginError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(load_err(
            path,
            format!("describe() gave an invalid name {name:?}: use letters, digits, '-' and '_'"),
        ));
    }
    if crate::component::Registry::builtins().get(name).is_some() {
        return Err(load_err(
            path,
            format!("\"{name}\" is the name of a built-in component; a plugin cannot take it"),
        ));
    }
    Ok(())
}

fn load_err(path: &Path, message: String) -> PluginError {
    PluginError::Load {
        path: path.display().to_string(),
        message,
    }
}

/// An error and its causes on one line.
pub(crate) fn chain(e: &wasmtime::Error) -> String {
    e.chain()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}
