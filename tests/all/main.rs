//! The one integration-test binary: the real `fmhost` binary and library against
//! fake vendor APIs served on 127.0.0.1 inside the tests.

#[path = "../support/mod.rs"]
mod support;

mod change;
mod cluster;
mod console;
mod control;
mod engine;
mod examples;
mod journal;
mod observe;
mod plugins;
mod polyglot;
mod queue;
mod resilience;
mod secrecy;
mod security;
mod serve;
mod testing;
mod triggers;
mod validate;
mod vendor;
