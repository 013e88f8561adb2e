//! The one `bindgen!` of the host, over the `connector` world (a superset of
//! `transform`: both export the same `plugin` interface).
//!
//! Host imports are `trappable`: the outer `wasmtime::Result` is a trap (a host bug),
//! the inner `Result` is a domain error the guest handles.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "connector",
    imports: { default: async | trappable },
    exports: { default: async },
});

pub use self::fmhost::plugin::http::{HttpError, HttpErrorKind, Request, Response};
pub use self::fmhost::plugin::log::Level;
pub use self::fmhost::plugin::types::ErrorKind as PluginErrorKind;
pub use self::fmhost::plugin::types::PluginKind;
