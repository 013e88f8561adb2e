//! What starts a pipeline's runs from outside (`triggers`) and whom to tell when
//! something goes wrong (`alerts`): parsed and checked whole, every problem with its
//! place (`triggers[2].cron`). `fmhost serve` runs them (`serve/triggers.rs`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::Diagnostic;
use super::validate::parse_duration;

/// One entry of `triggers`, with its name: unique in the pipeline, the key its fires,
/// cursor and files are journaled under. Defaults to its type (`schedule`), then
/// `schedule-2` for the second of a type.
#[derive(Debug, Clone)]
pub struct Trigger {
    pub name: String,
    pub kind: TriggerKind,
}

#[derive(Debug, Clone)]
pub enum TriggerKind {
    Webhook(Webhook),
    Schedule(Box<Schedule>),
    Poll(Poll),
    File(FileDrop),
    Nats(Box<Nats>),
}

impl Trigger {
    pub fn type_name(&self) -> &'static str {
        match self.kind {
            TriggerKind::Webhook(_) => "webhook",
            TriggerKind::Schedule(_) => "schedule",
            TriggerKind::Poll(_) => "poll",
            TriggerKind::File(_) => "file",
            TriggerKind::Nats(_) => "nats",
        }
    }
}

/// How a webhook trigger's deliveries are signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Signature {
    /// `Stripe-Signature: t=...,v1=...`, HMAC-SHA256 over `t.body`, with a timestamp tolerance.
    Stripe,
    /// `X-Hub-Signature-256: sha256=...`, HMAC-SHA256 over the raw body.
    Github,
}

/// `{"type": "webhook", "path": "/hooks/stripe", "secret": "{{secrets.X}}", "signature": "stripe"}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    /// The URL path `fmhost serve` receives deliveries on.
    pub path: String,
    /// The signing secret, normally `{{secrets.NAME}}`.
    pub secret: String,
    pub signature: Signature,
    /// How far a Stripe signature's timestamp may be from now.
    #[serde(default = "default_tolerance")]
    pub tolerance_seconds: u64,
}

fn default_tolerance() -> u64 {
    300
}

/// What a fire does when the previous run of its schedule is still running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    /// The fire does not run; it is journaled and counted as skipped.
    Skip,
    /// One fire waits for the running one; any more are skipped.
    BufferOne,
    /// Runs side by side.
    Allow,
}

/// Which fires missed while the server was down run when it starts again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CatchUp {
    None,
    /// The latest missed fire inside the window.
    Last,
    /// Every missed fire inside the window, oldest first.
    All,
}

/// `{"type": "schedule", "cron": "*/15 * * * *", "timezone": "Europe/Berlin", ...}`.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub cron_text: String,
    pub cron: croner::Cron,
    pub timezone: chrono_tz::Tz,
    pub input: Value,
    pub overlap: Overlap,
    pub catch_up: CatchUp,
    pub catch_up_window: Duration,
}

/// Most fires looked at when counting what a stopped server missed (a day of a
/// once-a-second schedule); beyond it, the count says "or more".
pub const MAX_FIRES_COUNTED: usize = 100_000;

impl Schedule {
    /// The first fire strictly after `after` (Unix ms), in Unix ms.
    pub fn next_after(&self, after_ms: i64) -> Option<i64> {
        use chrono::TimeZone;
        let start = self.timezone.timestamp_millis_opt(after_ms).single()?;
        let next = self.cron.find_next_occurrence(&start, false).ok()?;
        Some(next.timestamp_millis())
    }

    /// Every fire in `(after, until]`, at most `limit`, and whether there were more.
    pub fn fires_between(&self, after_ms: i64, until_ms: i64, limit: usize) -> (Vec<i64>, bool) {
        let mut out = Vec::new();
        let mut at = after_ms;
        while let Some(next) = self.next_after(at) {
            if next > until_ms {
                return (out, false);
            }
            if out.len() == limit {
                return (out, true);
            }
            out.push(next);
            at = next;
        }
        (out, false)
    }
}

/// `{"type": "poll", "every": "5m", "cursor": {"initial": "...", "from_output": "next_cursor"}}`.
#[derive(Debug, Clone)]
pub struct Poll {
    pub every: Duration,
    pub input: Value,
    pub cursor: Option<CursorSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CursorSpec {
    /// The cursor before any run has committed one.
    #[serde(default)]
    pub initial: Value,
    /// Where in the run's output the next cursor is (a dotted path).
    pub from_output: String,
}

impl CursorSpec {
    /// The next cursor in a run's output, if it has one.
    pub fn read<'a>(&self, output: &'a Value) -> Option<&'a Value> {
        self.from_output
            .split('.')
            .try_fold(output, |v, key| match v {
                Value::Array(items) => key.parse::<usize>().ok().and_then(|i| items.get(i)),
                v => v.get(key),
            })
            .filter(|v| !v.is_null())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    Csv,
    Json,
    Ndjson,
}

/// `{"type": "file", "dir": "...", "pattern": "*.csv", "format": "csv", "expect_every": "24h"}`.
#[derive(Debug, Clone)]
pub struct FileDrop {
    /// Resolved against the pipeline file's directory.
    pub dir: PathBuf,
    pub pattern: String,
    pub matcher: globset::GlobMatcher,
    pub format: FileFormat,
    /// Alert (`no_file`) when no file arrived for this long.
    pub expect_every: Option<Duration>,
    /// A file is read once its size and modification time have not changed for this long.
    pub settle: Duration,
    /// Larger files are moved to `failed/` unread.
    pub max_bytes: u64,
}

/// `{"type": "nats", "url": "nats://...", "stream": "ORDERS", "subject": "orders.>", ...}`:
/// a JetStream durable pull consumer.
#[derive(Debug, Clone)]
pub struct Nats {
    /// `nats://host:port` (a comma-separated list for a cluster), or `{{secrets.NAME}}`
    /// holding it (credentials in the URL stay out of the pipeline file).
    pub url: String,
    /// A token for the server, normally `{{secrets.NAME}}`.
    pub token: Option<String>,
    /// The stream read; created (file storage, taking `subject`) when it does not exist.
    pub stream: String,
    /// The consumer's filter subject (wildcards allowed).
    pub subject: String,
    /// The durable consumer's name; `fmhost-PIPELINE-TRIGGER` by default.
    pub durable: Option<String>,
    /// Deliveries of one message before it stays dead-lettered (terminated).
    pub max_deliver: u32,
    /// How long the server waits for an ack before it redelivers; the host extends it
    /// while the message's run goes on.
    pub ack_wait: Duration,
    /// The first redelivery delay after a retryable failure; doubled each time, at most 5 min.
    pub backoff: Duration,
    /// Messages run at once.
    pub max_in_flight: usize,
}

/// When an alert is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertOn {
    RunFailed,
    DeadLettered,
    BreakerOpen,
    NoFile,
    ScheduleMissed,
}

impl AlertOn {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertOn::RunFailed => "run_failed",
            AlertOn::DeadLettered => "dead_lettered",
            AlertOn::BreakerOpen => "breaker_open",
            AlertOn::NoFile => "no_file",
            AlertOn::ScheduleMissed => "schedule_missed",
        }
    }
}

/// `{"on": "breaker_open", "webhook": "{{secrets.SLACK_WEBHOOK}}", "cooldown": "15m"}`.
#[derive(Debug, Clone)]
pub struct Alert {
    pub on: AlertOn,
    /// A URL, or `{{secrets.NAME}}` (resolved when the alert is sent).
    pub webhook: String,
    /// At most one alert per condition (pipeline, and stage, service or trigger) per cool-down.
    pub cooldown: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScheduleDoc {
    cron: String,
    #[serde(default)]
    timezone: Option<String>,
    #[serde(default)]
    input: Option<Value>,
    #[serde(default)]
    overlap: Option<Overlap>,
    #[serde(default)]
    catch_up: Option<CatchUp>,
    #[serde(default)]
    catch_up_window: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PollDoc {
    every: Value,
    #[serde(default)]
    input: Option<Value>,
    #[serde(default)]
    cursor: Option<CursorSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    dir: String,
    #[serde(default)]
    pattern: Option<String>,
    #[serde(default)]
    format: Option<FileFormat>,
    #[serde(default)]
    expect_every: Option<Value>,
    #[serde(default)]
    settle: Option<Value>,
    #[serde(default)]
    max_bytes: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NatsDoc {
    url: String,
    #[serde(default)]
    token: Option<String>,
    stream: String,
    subject: String,
    #[serde(default)]
    durable: Option<String>,
    #[serde(default)]
    max_deliver: Option<u32>,
    #[serde(default)]
    ack_wait: Option<Value>,
    #[serde(default)]
    backoff: Option<Value>,
    #[serde(default)]
    max_in_flight: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AlertDoc {
    on: AlertOn,
    webhook: String,
    #[serde(default)]
    cooldown: Option<Value>,
}

const TYPES: &str = "webhook, schedule, poll, file or nats";

/// Parses `triggers`; `dir` is the pipeline file's directory (for a file trigger's `dir`).
pub fn parse(raw: &[Value], dir: Option<&Path>, diags: &mut Vec<Diagnostic>) -> Vec<Trigger> {
    let mut out: Vec<Trigger> = Vec::new();
    let mut counts: std::collections::HashMap<String, usize> = Default::default();
    for (i, raw) in raw.iter().enumerate() {
        let at = format!("triggers[{i}]");
        let Some(obj) = raw.as_object() else {
            diags.push(Diagnostic::new(at, "expected an object"));
            continue;
        };
        let mut rest: Map<String, Value> = obj.clone();
        let kind = match rest.remove("type") {
            Some(Value::String(s)) => s,
            Some(_) => {
                diags.push(Diagnostic::new(format!("{at}.type"), "expected a string"));
                continue;
            }
            None => {
                diags.push(Diagnostic::new(
                    at,
                    format!("missing field `type` (one of {TYPES})"),
                ));
                continue;
            }
        };
        let name = match rest.remove("name") {
            None => None,
            Some(Value::String(s)) if valid_name(&s) => Some(s),
            Some(_) => {
                diags.push(Diagnostic::new(
                    format!("{at}.name"),
                    "expected 1 to 64 letters, digits, '-' or '_'",
                ));
                continue;
            }
        };
        let rest = Value::Object(rest);
        let parsed = match kind.as_str() {
            "webhook" => typed::<Webhook>(&rest, &at, diags).map(|w| {
                webhook(&w, &at, diags);
                TriggerKind::Webhook(w)
            }),
            "schedule" => typed::<ScheduleDoc>(&rest, &at, diags)
                .and_then(|d| schedule(d, &at, diags))
                .map(|s| TriggerKind::Schedule(Box::new(s))),
            "poll" => typed::<PollDoc>(&rest, &at, diags)
                .and_then(|d| poll(d, &at, diags))
                .map(TriggerKind::Poll),
            "file" => typed::<FileDoc>(&rest, &at, diags)
                .and_then(|d| file(d, dir, &at, diags))
                .map(TriggerKind::File),
            "nats" => typed::<NatsDoc>(&rest, &at, diags)
                .and_then(|d| nats(d, &at, diags))
                .map(|n| TriggerKind::Nats(Box::new(n))),
            other => {
                diags.push(Diagnostic::new(
                    format!("{at}.type"),
                    format!("unknown trigger type \"{other}\" (expected {TYPES})"),
                ));
                None
            }
        };
        let Some(kind_parsed) = parsed else { continue };
        let n = counts.entry(kind.clone()).or_default();
        *n += 1;
        let name = name.unwrap_or_else(|| match *n {
            1 => kind.clone(),
            n => format!("{kind}-{n}"),
        });
        if out.iter().any(|t| t.name == name) {
            diags.push(Diagnostic::new(
                format!("{at}.name"),
                format!("another trigger is named \"{name}\"; give each a distinct `name`"),
            ));
            continue;
        }
        out.push(Trigger {
            name,
            kind: kind_parsed,
        });
    }
    out
}

/// Parses `alerts`.
pub fn parse_alerts(raw: &[Value], diags: &mut Vec<Diagnostic>) -> Vec<Alert> {
    let mut out = Vec::new();
    for (i, raw) in raw.iter().enumerate() {
        let at = format!("alerts[{i}]");
        let Some(doc) = typed::<AlertDoc>(raw, &at, diags) else {
            continue;
        };
        let whole_secret = crate::secrets::whole_secret(&doc.webhook).is_some();
        let url = !doc.webhook.contains("{{")
            && (doc.webhook.starts_with("https://") || doc.webhook.starts_with("http://"));
        let ok = whole_secret || url;
        if !ok {
            diags.push(Diagnostic::new(
                format!("{at}.webhook"),
                "expected an http(s) URL or {{secrets.NAME}} (the URL is a credential: keep it in secrets)",
            ));
        }
        let cooldown = duration(
            doc.cooldown.as_ref(),
            Duration::from_secs(300),
            &format!("{at}.cooldown"),
            diags,
        );
        if ok && let Some(cooldown) = cooldown {
            out.push(Alert {
                on: doc.on,
                webhook: doc.webhook,
                cooldown,
            });
        }
    }
    out
}

/// A pipeline file's name and triggers, read without compiling its stages (for
/// commands that look at schedules and cursors); every problem, each with its place.
pub fn of_file(path: &Path) -> Result<(String, Vec<Trigger>), Vec<String>> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| vec![format!("{shown}: {e}")])?;
    let doc: Value = serde_json::from_str(&text)
        .map_err(|e| vec![format!("{shown}:{}:{}: {e}", e.line(), e.column())])?;
    let name = doc["name"]
        .as_str()
        .ok_or_else(|| vec![format!("{shown}: name: expected a string")])?
        .to_string();
    let raw = match &doc["triggers"] {
        Value::Null => Vec::new(),
        Value::Array(a) => a.clone(),
        _ => return Err(vec![format!("{shown}: triggers: expected an array")]),
    };
    let mut diags = Vec::new();
    let triggers = parse(&raw, path.parent(), &mut diags);
    if diags.is_empty() {
        Ok((name, triggers))
    } else {
        Err(diags.iter().map(|d| d.render(&shown)).collect())
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn typed<T: serde::de::DeserializeOwned>(
    v: &Value,
    at: &str,
    diags: &mut Vec<Diagnostic>,
) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(v) {
        Ok(t) => Some(t),
        Err(e) => {
            let path = e.path().to_string();
            let place = if path == "." {
                at.to_string()
            } else {
                format!("{at}.{path}")
            };
            diags.push(Diagnostic::new(place, e.inner().to_string()));
            None
        }
    }
}

fn duration(
    v: Option<&Value>,
    default: Duration,
    at: &str,
    diags: &mut Vec<Diagnostic>,
) -> Option<Duration> {
    match v {
        None => Some(default),
        Some(v) => match parse_duration(v) {
            Ok(d) if !d.is_zero() => Some(d),
            Ok(_) => {
                diags.push(Diagnostic::new(at, "must be more than zero"));
                None
            }
            Err(e) => {
                diags.push(Diagnostic::new(at, e));
                None
            }
        },
    }
}

fn webhook(t: &Webhook, at: &str, diags: &mut Vec<Diagnostic>) {
    if !t.path.starts_with('/') || t.path.starts_with("/v1/") || t.path == "/metrics" {
        diags.push(Diagnostic::new(
            format!("{at}.path"),
            "must start with / and not clash with /v1/ or /metrics",
        ));
    }
    match crate::template::Template::parse(&t.secret) {
        Ok(Some(tpl)) if tpl.paths().iter().any(|p| p.root != "secrets") => {
            diags.push(Diagnostic::new(
                format!("{at}.secret"),
                "may only reference {{secrets.NAME}}",
            ))
        }
        Err(e) => diags.push(Diagnostic::new(format!("{at}.secret"), e)),
        _ => {}
    }
}

fn schedule(d: ScheduleDoc, at: &str, diags: &mut Vec<Diagnostic>) -> Option<Schedule> {
    let fields = d.cron.split_whitespace().count();
    let cron = if !(fields == 5 || fields == 6 || d.cron.trim_start().starts_with('@')) {
        diags.push(Diagnostic::new(
            format!("{at}.cron"),
            format!(
                "\"{}\" has {fields} field(s); expected five (minute hour day month weekday) or six (seconds first)",
                d.cron
            ),
        ));
        None
    } else {
        let parser = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Optional)
            .year(croner::parser::Year::Disallowed)
            .build();
        match parser.parse(&d.cron) {
            Ok(c) => Some(c),
            Err(e) => {
                diags.push(Diagnostic::new(
                    format!("{at}.cron"),
                    format!("\"{}\": {e}", d.cron),
                ));
                None
            }
        }
    };
    let timezone = match d.timezone.as_deref() {
        None => Some(chrono_tz::UTC),
        Some(name) => match name.parse::<chrono_tz::Tz>() {
            Ok(tz) => Some(tz),
            Err(_) => {
                diags.push(Diagnostic::new(
                    format!("{at}.timezone"),
                    format!("unknown time zone \"{name}\" (an IANA name such as Europe/Berlin)"),
                ));
                None
            }
        },
    };
    let window = duration(
        d.catch_up_window.as_ref(),
        Duration::from_secs(3600),
        &format!("{at}.catch_up_window"),
        diags,
    );
    Some(Schedule {
        cron_text: d.cron,
        cron: cron?,
        timezone: timezone?,
        input: d.input.unwrap_or_else(|| Value::Object(Map::new())),
        overlap: d.overlap.unwrap_or(Overlap::Skip),
        catch_up: d.catch_up.unwrap_or(CatchUp::Last),
        catch_up_window: window?,
    })
}

fn poll(d: PollDoc, at: &str, diags: &mut Vec<Diagnostic>) -> Option<Poll> {
    let every = duration(
        Some(&d.every),
        Duration::ZERO,
        &format!("{at}.every"),
        diags,
    )?;
    if let Some(c) = &d.cursor
        && (c.from_output.is_empty() || c.from_output.split('.').any(str::is_empty))
    {
        diags.push(Diagnostic::new(
            format!("{at}.cursor.from_output"),
            "expected a dotted path into the run's output, such as next_cursor",
        ));
        return None;
    }
    Some(Poll {
        every,
        input: d.input.unwrap_or_else(|| Value::Object(Map::new())),
        cursor: d.cursor,
    })
}

/// A JetStream stream or consumer name: no whitespace, `.`, `*`, `>`, `/` or `\\`.
fn nats_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && !s
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || ".*>/\\".contains(c))
}

/// A NATS subject: dot-separated tokens, `*` a whole token, `>` only the last.
fn nats_subject(s: &str) -> bool {
    let tokens: Vec<&str> = s.split('.').collect();
    !s.is_empty()
        && !s.chars().any(|c| c.is_whitespace() || c.is_control())
        && tokens.iter().enumerate().all(|(i, t)| {
            !t.is_empty()
                && (!t.contains('*') || *t == "*")
                && (!t.contains('>') || (*t == ">" && i == tokens.len() - 1))
        })
}

fn nats(d: NatsDoc, at: &str, diags: &mut Vec<Diagnostic>) -> Option<Nats> {
    let before = diags.len();
    let whole_secret = |v: &str| crate::secrets::whole_secret(v).is_some();
    let url_ok = whole_secret(&d.url)
        || (!d.url.contains("{{")
            && d.url.split(',').all(|u| {
                let u = u.trim();
                ["nats://", "tls://", "ws://", "wss://"]
                    .iter()
                    .any(|scheme| u.len() > scheme.len() && u.starts_with(scheme))
            }));
    if !url_ok {
        diags.push(Diagnostic::new(
            format!("{at}.url"),
            format!(
                "\"{}\": expected nats://host:port (several separated by commas), or {{{{secrets.NAME}}}} holding it",
                d.url
            ),
        ));
    }
    if let Some(t) = &d.token
        && !whole_secret(t)
    {
        diags.push(Diagnostic::new(
            format!("{at}.token"),
            "expected {{secrets.NAME}} (a token is a credential: keep it in secrets)",
        ));
    }
    if !nats_name(&d.stream) {
        diags.push(Diagnostic::new(
            format!("{at}.stream"),
            format!("\"{}\": a stream name cannot be empty or hold whitespace, '.', '*', '>', '/' or '\\'", d.stream),
        ));
    }
    if !nats_subject(&d.subject) {
        diags.push(Diagnostic::new(
            format!("{at}.subject"),
            format!("\"{}\": expected dot-separated tokens, with '*' as a whole token and '>' only last", d.subject),
        ));
    }
    if let Some(name) = &d.durable
        && !nats_name(name)
    {
        diags.push(Diagnostic::new(
            format!("{at}.durable"),
            format!("\"{name}\": a consumer name cannot be empty or hold whitespace, '.', '*', '>', '/' or '\\'"),
        ));
    }
    if d.max_deliver == Some(0) {
        diags.push(Diagnostic::new(
            format!("{at}.max_deliver"),
            "must be at least 1",
        ));
    }
    if matches!(d.max_in_flight, Some(n) if n == 0 || n > 1024) {
        diags.push(Diagnostic::new(
            format!("{at}.max_in_flight"),
            "must be between 1 and 1024",
        ));
    }
    let ack_wait = duration(
        d.ack_wait.as_ref(),
        Duration::from_secs(30),
        &format!("{at}.ack_wait"),
        diags,
    );
    let backoff = duration(
        d.backoff.as_ref(),
        Duration::from_secs(1),
        &format!("{at}.backoff"),
        diags,
    );
    if diags.len() > before {
        return None;
    }
    Some(Nats {
        url: d.url,
        token: d.token,
        stream: d.stream,
        subject: d.subject,
        durable: d.durable,
        max_deliver: d.max_deliver.unwrap_or(5),
        ack_wait: ack_wait?,
        backoff: backoff?,
        max_in_flight: d.max_in_flight.unwrap_or(16),
    })
}

fn file(d: FileDoc, dir: Option<&Path>, at: &str, diags: &mut Vec<Diagnostic>) -> Option<FileDrop> {
    let pattern = d.pattern.unwrap_or_else(|| "*".into());
    let matcher = match globset::Glob::new(&pattern) {
        Ok(g) if !pattern.contains('/') => Some(g.compile_matcher()),
        Ok(_) => {
            diags.push(Diagnostic::new(
                format!("{at}.pattern"),
                "matches file names in `dir`, so it cannot hold '/'",
            ));
            None
        }
        Err(e) => {
            diags.push(Diagnostic::new(format!("{at}.pattern"), e.to_string()));
            None
        }
    };
    let lower = pattern.to_ascii_lowercase();
    let format = d.format.or(if lower.ends_with(".csv") {
        Some(FileFormat::Csv)
    } else if lower.ends_with(".ndjson") || lower.ends_with(".jsonl") {
        Some(FileFormat::Ndjson)
    } else if lower.ends_with(".json") {
        Some(FileFormat::Json)
    } else {
        None
    });
    if format.is_none() {
        diags.push(Diagnostic::new(
            format!("{at}.format"),
            format!("cannot tell from pattern \"{pattern}\"; set csv, json or ndjson"),
        ));
    }
    let base = Path::new(&d.dir);
    let resolved = match dir {
        Some(parent) if base.is_relative() => parent.join(base),
        _ => base.to_path_buf(),
    };
    if d.dir.is_empty() || d.dir.contains("{{") {
        diags.push(Diagnostic::new(
            format!("{at}.dir"),
            "expected a directory path (relative paths are read from the pipeline file's directory)",
        ));
        return None;
    }
    let expect_every = match &d.expect_every {
        None => Some(None),
        Some(v) => duration(
            Some(v),
            Duration::ZERO,
            &format!("{at}.expect_every"),
            diags,
        )
        .map(Some),
    };
    let settle = duration(
        d.settle.as_ref(),
        Duration::from_secs(1),
        &format!("{at}.settle"),
        diags,
    );
    Some(FileDrop {
        dir: resolved,
        pattern,
        matcher: matcher?,
        format: format?,
        expect_every: expect_every?,
        settle: settle?,
        max_bytes: d.max_bytes.unwrap_or(64 << 20),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn problems(raw: Value) -> Vec<String> {
        let mut diags = Vec::new();
        parse(raw.as_array().unwrap(), None, &mut diags);
        diags
            .into_iter()
            .map(|d| format!("{}: {}", d.location, d.message))
            .collect()
    }

    #[test]
    fn every_trigger_problem_is_named_with_its_place() {
        let p = problems(json!([
            {"type": "schedule", "cron": "61 * * * *"},
            {"type": "schedule", "cron": "* * *", "timezone": "Mars/Olympus"},
            {"type": "poll", "every": "soon"},
            {"type": "file", "dir": "in", "pattern": "*.txt"},
            {"type": "ftp"},
            {"type": "schedule", "cron": "* * * * *", "overlap": "queue"},
            {"type": "nats", "url": "http://x", "stream": "A.B", "subject": "a.>.b", "token": "t0ps3cret", "max_deliver": 0, "ack_wait": "0s"},
            {"type": "nats", "url": "{{secrets.NATS_URL}}", "stream": "ORDERS", "subject": "orders.*", "durable": "sync"},
        ]));
        let text = p.join("\n");
        for want in [
            "triggers[0].cron: \"61 * * * *\"",
            "triggers[1].cron: \"* * *\" has 3 field(s)",
            "triggers[1].timezone: unknown time zone \"Mars/Olympus\"",
            "triggers[2].every:",
            "triggers[3].format: cannot tell",
            "triggers[4].type: unknown trigger type \"ftp\"",
            "triggers[5].overlap: unknown variant `queue`",
            "triggers[6].url: \"http://x\": expected nats://",
            "triggers[6].token: expected {{secrets.NAME}}",
            "triggers[6].stream: \"A.B\"",
            "triggers[6].subject: \"a.>.b\"",
            "triggers[6].max_deliver: must be at least 1",
            "triggers[6].ack_wait: must be more than zero",
        ] {
            assert!(text.contains(want), "{want:?} not in:\n{text}");
        }
        assert!(!text.contains("triggers[7]"), "{text}");
    }

    #[test]
    fn names_default_to_the_type_and_are_unique() {
        let mut diags = Vec::new();
        let t = parse(
            json!([
                {"type": "schedule", "cron": "* * * * *"},
                {"type": "schedule", "cron": "*/5 * * * * *"},
                {"type": "poll", "every": "1m", "name": "schedule-2"},
            ])
            .as_array()
            .unwrap(),
            None,
            &mut diags,
        );
        let names: Vec<_> = t.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["schedule", "schedule-2"]);
        assert_eq!(diags.len(), 1, "{:?}", diags[0].message);
        assert_eq!(diags[0].location, "triggers[2].name");
    }

    /// A daily 02:30 job on the day Berlin springs forward runs once, at 03:00 (the
    /// first instant after the gap); on the day it falls back, once, at the first 02:30.
    #[test]
    fn daylight_saving_gaps_and_repeats() {
        let mut diags = Vec::new();
        let t = parse(
            json!([{"type": "schedule", "cron": "30 2 * * *", "timezone": "Europe/Berlin"}])
                .as_array()
                .unwrap(),
            None,
            &mut diags,
        );
        let TriggerKind::Schedule(s) = &t[0].kind else {
            panic!()
        };
        let ms = |rfc: &str| {
            chrono::DateTime::parse_from_rfc3339(rfc)
                .unwrap()
                .timestamp_millis()
        };
        let at = |ms: i64| {
            chrono::DateTime::from_timestamp_millis(ms)
                .unwrap()
                .to_rfc3339()
        };
        // 2026-03-29: 02:00 CET becomes 03:00 CEST.
        let (spring, _) =
            s.fires_between(ms("2026-03-28T12:00:00Z"), ms("2026-03-30T12:00:00Z"), 10);
        assert_eq!(
            spring.iter().map(|&m| at(m)).collect::<Vec<_>>(),
            ["2026-03-29T01:00:00+00:00", "2026-03-30T00:30:00+00:00"]
        );
        // 2026-10-25: 03:00 CEST becomes 02:00 CET; 02:30 happens twice, fires once.
        let (fall, _) = s.fires_between(ms("2026-10-24T12:00:00Z"), ms("2026-10-26T12:00:00Z"), 10);
        assert_eq!(
            fall.iter().map(|&m| at(m)).collect::<Vec<_>>(),
            ["2026-10-25T00:30:00+00:00", "2026-10-26T01:30:00+00:00"]
        );
    }
}
