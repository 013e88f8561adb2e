//! fmhost: a host for declarative API-integration pipelines.
//!
//! A pipeline ([`pipeline`]) is a DAG of stages; the [`engine`] runs it, rendering each
//! stage's config ([`template`]) and invoking its [`component`]. Components are built-ins
//! or sandboxed WebAssembly plugins behind one trait. All outbound HTTP goes through
//! [`http`]; secrets live in [`secrets`] and are redacted from everything we print.
//!
//! Only `main`/[`cli`] turns errors into exit codes.

pub mod cli;
pub mod component;
pub mod draw;
pub mod engine;
pub mod error;
pub mod http;
pub mod journal;
pub mod logging;
pub mod metrics;
pub mod nats;
pub mod otel;
pub mod pipeline;
pub mod plugin;
pub mod schema;
pub mod secrets;
pub mod serve;
pub mod shadow;
pub mod template;
pub mod testing;
pub mod time;
pub mod trace;

pub use engine::{Engine, RunOptions, RunReport, RunStatus};
pub use error::{ErrorKind, StageError};

/// The process allocator of everything linking fmhost (the binary, its tests and
/// benchmarks), unless the `mimalloc` feature is off.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
