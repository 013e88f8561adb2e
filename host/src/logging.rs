//! Logging setup: human progress lines or JSON events, both on stderr.
//!
//! Stdout is reserved for a command's result (a run's output JSON), so that
//! `fmhost run ... | jq` works.

use std::fmt;
use std::time::Instant;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human line per event.
    Text,
    /// One JSON object per event, with every field.
    Json,
}

/// Installs the global subscriber. `FMHOST_LOG` (EnvFilter syntax) overrides the level.
pub fn init(format: LogFormat) {
    init_with(format, "info")
}

/// [`init`] with another default level (`fmhost test` shows warnings only: its own
/// lines say what happened).
pub fn init_with(format: LogFormat, default: &str) {
    let filter = EnvFilter::try_from_env("FMHOST_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => builder
            .event_format(Human {
                start: Instant::now(),
            })
            .try_init(),
    };
}

/// `  182ms  fetch-stripe: done in 182 ms (1 attempt)`; other targets add their fields.
struct Human {
    start: Instant,
}

#[derive(Default)]
struct Fields {
    message: String,
    rest: String,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            self.rest.push_str(&format!(" {}={value:?}", field.name()));
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        } else if !value.is_empty() {
            self.rest.push_str(&format!(" {}={value}", field.name()));
        }
    }
}

impl<S, N> FormatEvent<S, N> for Human
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut fields = Fields::default();
        event.record(&mut fields);
        let elapsed = self.start.elapsed().as_millis();
        let level = match *meta.level() {
            Level::ERROR => "error: ",
            Level::WARN => "warning: ",
            _ => "",
        };
        match meta.target() {
            "fmhost::progress" => writeln!(w, "{elapsed:>6}ms  {level}{}", fields.message),
            "fmhost::logger" => writeln!(w, "{elapsed:>6}ms  {level}log: {}", fields.message),
            "fmhost::http" => writeln!(w, "{elapsed:>6}ms    {level}{}", fields.message),
            target => writeln!(
                w,
                "{elapsed:>6}ms  {level}{target}: {}{}",
                fields.message, fields.rest
            ),
        }
    }
}
