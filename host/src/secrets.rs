//! Secrets: loaded from a file (JSON object or dotenv) and `FMHOST_SECRET_*` variables,
//! resolved by `{{secrets.NAME}}`, and redacted from every log line, error and output.
//!
//! Secret values live only here and in rendered requests; nothing in this module writes them.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

const ENV_PREFIX: &str = "FMHOST_SECRET_";
const MASK: &str = "***";
/// Values shorter than this are masked only where they stand alone (between characters
/// that are not letters or digits), so a secret "42" does not blank every number in a log.
const SHORT: usize = 4;
/// What [`Secrets::store`] puts before `secrets.` in text that already held a
/// literal `{{secrets.`, so a stored value never turns data into a reference on restore.
const ESCAPE: char = '!';

/// The secret's name when `s` is exactly one `{{secrets.NAME}}` and nothing else.
pub fn whole_secret(s: &str) -> Option<&str> {
    secret_token(s).and_then(|(name, len)| (len == s.len()).then_some(name))
}

/// `{{secrets.NAME}}` (spaces allowed inside the braces) at the start of `s`:
/// the name and the length of the token. A fixed pattern, not a template.
pub fn secret_token(s: &str) -> Option<(&str, usize)> {
    let body = s.strip_prefix("{{")?;
    let trimmed = body.trim_start_matches(' ');
    let lead = body.len() - trimmed.len();
    let rest = trimmed.strip_prefix("secrets.")?;
    let name_len = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
        .unwrap_or(rest.len());
    if name_len == 0 {
        return None;
    }
    let after = &rest[name_len..];
    let close = after.trim_start_matches(' ');
    close.strip_prefix("}}")?;
    let len = 2 + lead + "secrets.".len() + name_len + (after.len() - close.len()) + 2;
    Some((&rest[..name_len], len))
}

/// Every secret name a template text reads (`{{secrets.KEY}}`, `{{ secrets.KEY | upper }}`,
/// `{{secrets.A ~ secrets.B}}`), in order.
pub fn names_read(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find("{{") {
        let inner = &rest[open + 2..];
        let Some(close) = inner.find("}}") else { break };
        let expr = &inner[..close];
        let mut from = 0;
        while let Some(i) = expr[from..].find("secrets.") {
            let at = from + i;
            let before = expr[..at].chars().next_back();
            let name_start = at + "secrets.".len();
            let len = expr[name_start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
                .unwrap_or(expr.len() - name_start);
            if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.') && len > 0
            {
                out.push(&expr[name_start..name_start + len]);
            }
            from = name_start;
        }
        rest = &inner[close + 2..];
    }
    out
}

/// Every secret a pipeline document reads, with where: stage configs, retry blocks and
/// `secrets` lists, services and triggers (`stages.fetch.config.headers.Authorization`).
pub fn uses_in_pipeline(doc: &Value) -> std::collections::BTreeMap<String, Vec<String>> {
    type Uses = std::collections::BTreeMap<String, Vec<String>>;
    fn walk(v: &Value, at: String, needs: &mut Uses) {
        match v {
            Value::String(s) => {
                for name in names_read(s) {
                    let places = needs.entry(name.to_string()).or_default();
                    if !places.contains(&at) {
                        places.push(at.clone());
                    }
                }
            }
            Value::Array(a) => {
                for (i, x) in a.iter().enumerate() {
                    walk(x, format!("{at}[{i}]"), needs);
                }
            }
            Value::Object(m) => {
                for (k, x) in m {
                    walk(x, format!("{at}.{k}"), needs);
                }
            }
            _ => {}
        }
    }
    let mut needs = Uses::new();
    for (i, st) in doc["stages"].as_array().into_iter().flatten().enumerate() {
        let at = match st["id"].as_str() {
            Some(id) => format!("stages.{id}"),
            None => format!("stages[{i}]"),
        };
        for key in ["config", "retry"] {
            walk(&st[key], format!("{at}.{key}"), &mut needs);
        }
        for name in st["secrets"].as_array().into_iter().flatten() {
            if let Some(n) = name.as_str() {
                needs
                    .entry(n.to_string())
                    .or_default()
                    .push(format!("{at}.secrets"));
            }
        }
    }
    for key in ["services", "triggers"] {
        walk(&doc[key], key.to_string(), &mut needs);
    }
    needs
}

/// The secret names a text refers to with `{{secrets.NAME}}`, or the first `{{...}}`
/// that is something else (a setting that only takes secrets and literals).
pub fn secret_refs(text: &str) -> Result<Vec<&str>, String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("{{") {
        match secret_token(&rest[i..]) {
            Some((name, len)) => {
                names.push(name);
                rest = &rest[i + len..];
            }
            None => {
                let end = rest[i..].find("}}").map_or(rest.len(), |e| i + e + 2);
                return Err(format!(
                    "{:?} is not a secret reference: only {{{{secrets.NAME}}}} and plain text are allowed here",
                    &rest[i..end]
                ));
            }
        }
    }
    Ok(names)
}

impl Secrets {
    /// `text` with every `{{secrets.NAME}}` replaced by its value.
    pub fn expand(&self, text: &str) -> Result<String, String> {
        if !text.contains("{{") {
            return Ok(text.to_string());
        }
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(i) = rest.find("{{") {
            out.push_str(&rest[..i]);
            let (name, len) = secret_token(&rest[i..])
                .ok_or_else(|| "only {{secrets.NAME}} references are allowed here".to_string())?;
            let value = self
                .get(name)
                .ok_or_else(|| format!("secret {name} is not set"))?;
            out.push_str(value);
            rest = &rest[i + len..];
        }
        out.push_str(rest);
        Ok(out)
    }
}

#[derive(Debug, Default, Clone)]
pub struct Secrets {
    values: HashMap<String, Value>,
    /// `(value, name)`, longest value first, so a secret that contains another is masked whole.
    exact: Vec<(String, String)>,
    /// What redaction masks: every value and its common encodings (URL-encoded, base64,
    /// JSON-escaped), longest first.
    masks: Vec<String>,
    /// `masks` without the values themselves: what storing masks after it wrote the
    /// values as references.
    encodings_only: Vec<String>,
    /// One automaton over all of `masks`: the common case, text holding no secret, is
    /// one pass over it instead of one per value and encoding.
    find_masks: Option<std::sync::Arc<MaskFinder>>,
}

/// Finds whether a text holds any of the masks. It starts as a contiguous NFA, which
/// builds in microseconds (what a one-run command wants), and once it has searched
/// often enough that a long-lived process is plainly using it, builds a DFA (~0.4 ms,
/// once) that searches faster: `fmhost-profile c360 4 --journal`, three pairs in
/// alternation, 1,066 → 1,090 runs/s (a DFA from the start: 1,157 → 1,210).
#[derive(Debug)]
struct MaskFinder {
    nfa: aho_corasick::AhoCorasick,
    needles: Vec<String>,
    searches: std::sync::atomic::AtomicU32,
    dfa: std::sync::OnceLock<Option<aho_corasick::AhoCorasick>>,
}

impl MaskFinder {
    /// Searches before the DFA is built.
    const DFA_AFTER: u32 = 4096;
    /// Needle bytes beyond which the DFA is never built: its table grows with them
    /// (states × byte classes), and a secrets file with thousands of long values would
    /// make it tens of MiB; the NFA stays.
    const DFA_MAX_NEEDLE_BYTES: usize = 64 << 10;

    fn new(needles: &[String]) -> Option<MaskFinder> {
        if needles.is_empty() {
            return None;
        }
        let nfa = aho_corasick::AhoCorasick::builder()
            .kind(Some(aho_corasick::AhoCorasickKind::ContiguousNFA))
            .build(needles)
            .ok()?;
        Some(MaskFinder {
            nfa,
            needles: needles.to_vec(),
            searches: Default::default(),
            dfa: Default::default(),
        })
    }

    fn is_match(&self, text: &[u8]) -> bool {
        if let Some(Some(dfa)) = self.dfa.get() {
            return dfa.is_match(text);
        }
        let searches = self
            .searches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if searches >= Self::DFA_AFTER {
            let dfa = self.dfa.get_or_init(|| {
                let bytes: usize = self.needles.iter().map(String::len).sum();
                (bytes <= Self::DFA_MAX_NEEDLE_BYTES)
                    .then(|| {
                        aho_corasick::AhoCorasick::builder()
                            .kind(Some(aho_corasick::AhoCorasickKind::DFA))
                            .build(&self.needles)
                            .ok()
                    })
                    .flatten()
            });
            if let Some(dfa) = dfa {
                return dfa.is_match(text);
            }
        }
        self.nfa.is_match(text)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("secrets file {path}: {message}")]
    File { path: String, message: String },
}

impl Secrets {
    /// File entries win over `FMHOST_SECRET_*` variables: the file is named on the command line.
    pub fn load(file: Option<&Path>) -> Result<Secrets, SecretsError> {
        let mut pairs: Vec<(String, String)> = std::env::vars()
            .filter_map(|(k, v)| k.strip_prefix(ENV_PREFIX).map(|name| (name.to_string(), v)))
            .collect();
        if let Some(path) = file {
            pairs.extend(read_file(path)?);
        }
        Ok(Self::from_pairs(pairs))
    }

    /// Only what the file holds, without the environment (to say where a value came from).
    pub fn load_file_only(file: &Path) -> Result<Secrets, SecretsError> {
        Ok(Self::from_pairs(read_file(file)?))
    }

    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Secrets {
        let values: HashMap<String, Value> = pairs
            .into_iter()
            .map(|(k, v)| (k.into(), Value::String(v.into())))
            .collect();
        let mut exact: Vec<(String, String)> = values
            .iter()
            .filter_map(|(k, v)| Some((v.as_str()?.to_string(), k.clone())))
            .filter(|(v, _)| !v.is_empty())
            .collect();
        exact.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.cmp(b)));
        exact.dedup_by(|a, b| a.0 == b.0);
        let mut masks: Vec<String> = exact.iter().flat_map(|(v, _)| encodings(v)).collect();
        masks.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        masks.dedup();
        let encodings_only = masks
            .iter()
            .filter(|m| !exact.iter().any(|(v, _)| v == *m))
            .cloned()
            .collect();
        Secrets {
            encodings_only,
            find_masks: MaskFinder::new(&masks).map(std::sync::Arc::new),
            values,
            exact,
            masks,
        }
    }

    /// Whether `text` may hold one of the needles `finder` was built from.
    fn may_hold(finder: &Option<std::sync::Arc<MaskFinder>>, text: &[u8]) -> bool {
        finder.as_ref().is_some_and(|f| f.is_match(text))
    }

    /// The secret as a JSON string, for templates.
    pub fn value(&self, name: &str) -> Option<&Value> {
        self.values.get(name)
    }

    /// The names that have a value, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.values.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).and_then(Value::as_str)
    }

    /// A setting written as a literal or as a whole `{{secrets.NAME}}`: its value now
    /// (`what` names the setting when the secret is not set).
    pub fn resolve(&self, setting: &str, what: &str) -> Result<String, String> {
        match whole_secret(setting) {
            Some(name) => self
                .get(name)
                .map(str::to_string)
                .ok_or_else(|| format!("secret {name} ({what}) is not set")),
            None => Ok(setting.to_string()),
        }
    }

    /// Masks every secret value, and its URL, base64 and JSON encodings, that occurs in `text`.
    pub fn redact<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(text);
        if !Self::may_hold(&self.find_masks, text.as_bytes()) {
            return out;
        }
        for m in &self.masks {
            if let Some(replaced) = replace_standalone(&out, m, MASK) {
                out = Cow::Owned(replaced);
            }
        }
        out
    }

    /// [`Self::redact`] on bytes that may not be text (a response body handed to a plugin).
    pub fn redact_bytes(&self, bytes: &mut Vec<u8>) {
        if !Self::may_hold(&self.find_masks, bytes) {
            return;
        }
        for m in &self.masks {
            if m.len() < SHORT || memchr::memmem::find(bytes, m.as_bytes()).is_none() {
                continue;
            }
            let mut out = Vec::with_capacity(bytes.len());
            let mut rest = &bytes[..];
            while let Some(i) = memchr::memmem::find(rest, m.as_bytes()) {
                out.extend_from_slice(&rest[..i]);
                out.extend_from_slice(MASK.as_bytes());
                rest = &rest[i + m.len()..];
            }
            out.extend_from_slice(rest);
            *bytes = out;
        }
    }

    /// Whether any secret value (or an encoding of one) occurs in `text`.
    pub fn occurs(&self, text: &str) -> bool {
        matches!(self.redact(text), Cow::Owned(_))
    }

    /// `value` as JSON text with every secret value (and encoding of one) masked: what a
    /// plugin is handed as config or input, which may hold what an upstream echoed.
    pub fn masked_json(&self, value: &Value) -> String {
        let text = serde_json::to_string(value).unwrap_or_default();
        if !Self::may_hold(&self.find_masks, text.as_bytes()) {
            return text;
        }
        let mut v = value.clone();
        self.redact_value(&mut v);
        serde_json::to_string(&v).unwrap_or_default()
    }

    /// [`Self::redact_value`] on a shared value: the same `Arc` when it holds no secret.
    pub fn redact_shared(&self, value: &std::sync::Arc<Value>) -> std::sync::Arc<Value> {
        fn holds(s: &Secrets, v: &Value) -> bool {
            match v {
                Value::String(t) => Secrets::may_hold(&s.find_masks, t.as_bytes()),
                Value::Array(items) => items.iter().any(|v| holds(s, v)),
                Value::Object(map) => map
                    .iter()
                    .any(|(k, v)| Secrets::may_hold(&s.find_masks, k.as_bytes()) || holds(s, v)),
                _ => false,
            }
        }
        if self.masks.is_empty() || !holds(self, value) {
            return value.clone();
        }
        let mut v = (**value).clone();
        self.redact_value(&mut v);
        std::sync::Arc::new(v)
    }

    /// Masks secret values anywhere inside a JSON value (strings and keys).
    pub fn redact_value(&self, value: &mut Value) {
        if !self.masks.is_empty() {
            map_strings(value, &|s| self.redact(s));
        }
    }

    /// `value` in the form it is kept in outside a run (the journal): secret values as
    /// `{{secrets.NAME}}`, other encodings of them masked, and text that already held a
    /// literal `{{secrets.` escaped, so [`Self::restore`] gives the same text back and
    /// never a secret: data does not become a reference.
    pub fn store(&self, value: &Value) -> Stored {
        let mut v = value.clone();
        map_strings(&mut v, &|s| self.referenced(s, true));
        Stored(v)
    }

    /// `stored` with the values of these secrets (a rotation since it was stored) written
    /// as references too; what is already a reference or escaped is left as it is.
    pub fn store_more(&self, stored: Stored) -> Stored {
        let mut v = stored.0;
        map_strings(&mut v, &|s| self.referenced(s, false));
        Stored(v)
    }

    /// `s` with secret values written as `{{secrets.NAME}}` (and literal references escaped).
    pub fn reference_text<'a>(&self, s: &'a str) -> Cow<'a, str> {
        self.referenced(s, true)
    }

    /// Secret values as references, then whatever other encoding of one is left masked;
    /// with `escape`, literal `{{secrets.` in the text is escaped first.
    fn referenced<'a>(&self, s: &'a str, escape: bool) -> Cow<'a, str> {
        let mut out = if escape {
            escape_literal_refs(s)
        } else {
            Cow::Borrowed(s)
        };
        if !Self::may_hold(&self.find_masks, s.as_bytes()) {
            return out;
        }
        for (secret, name) in &self.exact {
            if let Some(replaced) =
                replace_standalone(&out, secret, &format!("{{{{secrets.{name}}}}}"))
            {
                out = Cow::Owned(replaced);
            }
        }
        if Self::may_hold(&self.find_masks, out.as_bytes()) {
            for m in &self.encodings_only {
                if let Some(replaced) = replace_standalone(&out, m, MASK) {
                    out = Cow::Owned(replaced);
                }
            }
        }
        out
    }

    /// A stage output in its stored form ([`Self::store`]), sharing the `Arc` when nothing
    /// in it needs rewriting (the usual case), so journaling an output does not copy it.
    pub fn store_shared(&self, value: &std::sync::Arc<Value>) -> std::sync::Arc<Value> {
        self.rewritten(value, true)
    }

    /// [`Self::store_more`] on a shared stored value.
    pub fn store_more_shared(&self, value: &std::sync::Arc<Value>) -> std::sync::Arc<Value> {
        self.rewritten(value, false)
    }

    fn rewritten(&self, value: &std::sync::Arc<Value>, escape: bool) -> std::sync::Arc<Value> {
        if !self.needs_rewrite(value, escape) {
            return value.clone();
        }
        let mut v = (**value).clone();
        map_strings(&mut v, &|s| self.referenced(s, escape));
        std::sync::Arc::new(v)
    }

    fn needs_rewrite(&self, value: &Value, escape: bool) -> bool {
        let hit = |s: &str| matches!(self.referenced(s, escape), Cow::Owned(_));
        match value {
            Value::String(s) => hit(s),
            Value::Array(items) => items.iter().any(|v| self.needs_rewrite(v, escape)),
            Value::Object(map) => map
                .iter()
                .any(|(k, v)| hit(k) || self.needs_rewrite(v, escape)),
            _ => false,
        }
    }

    /// The data a stored value stood for: the current secret values back where
    /// [`Self::store`] left references, and what it escaped unescaped. The only place
    /// that reads `{{` in data, and only this fixed pattern of it.
    pub fn restore(&self, stored: &Stored) -> Value {
        self.restore_raw(stored.0.clone())
    }

    /// [`Self::restore`] on a value read from storage as a plain JSON value (a stage's
    /// output in a journaled report).
    pub fn restore_raw(&self, mut value: Value) -> Value {
        map_strings(&mut value, &|s| {
            if !s.contains("{{") {
                return Cow::Borrowed(s);
            }
            Cow::Owned(restore_text(s, &|name| self.get(name)))
        });
        value
    }
}

/// A JSON value in the form kept outside a run, made by [`Secrets::store`] and turned
/// back into data only by [`Secrets::restore`]: secret values are `{{secrets.NAME}}`
/// references, literal references in the data escaped. Run inputs and webhook payloads
/// are journaled as this type, so no path can write one unmasked or read one back as
/// data without restoring it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Stored(Value);

impl Stored {
    /// The stored form itself, to show (`runs show`) or write to storage.
    pub fn as_value(&self) -> &Value {
        &self.0
    }

    /// A value read back from storage, which holds only what [`Secrets::store`] made.
    pub fn from_storage(value: Value) -> Stored {
        Stored(value)
    }
}

/// The forms a secret may take on the wire or in a log: itself, URL-encoded, base64
/// (standard and URL-safe, padded or not) and JSON-escaped.
fn encodings(v: &str) -> Vec<String> {
    use base64::Engine as _;
    let mut out = vec![v.to_string()];
    let url =
        percent_encoding::utf8_percent_encode(v, percent_encoding::NON_ALPHANUMERIC).to_string();
    out.push(url);
    out.push(v.replace(' ', "+"));
    if v.len() >= SHORT {
        for engine in [
            &base64::engine::general_purpose::STANDARD,
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        ] {
            let b = engine.encode(v);
            out.push(b.trim_end_matches('=').to_string());
            out.push(b);
        }
    }
    let json = Value::String(v.to_string()).to_string();
    out.push(json[1..json.len() - 1].to_string());
    out.retain(|e| !e.is_empty());
    out
}

/// Replaces `needle` in `text`; a short needle only where it stands alone.
/// `None` when nothing was replaced.
fn replace_standalone(text: &str, needle: &str, with: &str) -> Option<String> {
    if !text.contains(needle) {
        return None;
    }
    if needle.len() >= SHORT {
        return Some(text.replace(needle, with));
    }
    let word = |c: Option<char>| c.is_some_and(char::is_alphanumeric);
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    let mut changed = false;
    for (i, _) in text.match_indices(needle) {
        if i < last {
            continue;
        }
        let before = text[..i].chars().next_back();
        let after = text[i + needle.len()..].chars().next();
        if word(before) || word(after) {
            continue;
        }
        out.push_str(&text[last..i]);
        out.push_str(with);
        last = i + needle.len();
        changed = true;
    }
    out.push_str(&text[last..]);
    changed.then_some(out)
}

/// `{{` followed by zero or more `!` and `secrets.` gets one more `!`.
fn escape_literal_refs(s: &str) -> Cow<'_, str> {
    if !s.contains("{{") {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 4);
    let mut rest = s;
    let mut changed = false;
    while let Some(i) = rest.find("{{") {
        out.push_str(&rest[..i + 2]);
        rest = &rest[i + 2..];
        let bangs = rest.len() - rest.trim_start_matches(ESCAPE).len();
        if rest[bangs..].starts_with("secrets.") {
            out.push(ESCAPE);
            changed = true;
        }
    }
    out.push_str(rest);
    if changed {
        Cow::Owned(out)
    } else {
        Cow::Borrowed(s)
    }
}

/// The inverse of [`Secrets::referenced`]: `{{secrets.NAME}}` becomes the value
/// (left as written when the secret is gone), `{{!...secrets.` loses one `!`.
fn restore_text<'v>(s: &str, value: &dyn Fn(&str) -> Option<&'v str>) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("{{") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        if let Some(unbanged) = after.strip_prefix(ESCAPE) {
            let bangs = unbanged.len() - unbanged.trim_start_matches(ESCAPE).len();
            if unbanged[bangs..].starts_with("secrets.") {
                out.push_str("{{");
                rest = unbanged;
                continue;
            }
        }
        if let Some(body) = after.strip_prefix("secrets.") {
            let name_len = body
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
                .unwrap_or(body.len());
            if let Some(v) = body[name_len..]
                .starts_with("}}")
                .then(|| value(&body[..name_len]))
                .flatten()
            {
                out.push_str(v);
                rest = &body[name_len + 2..];
                continue;
            }
        }
        out.push_str("{{");
        rest = after;
    }
    out.push_str(rest);
    out
}

/// Applies `f` to every string and object key in `value`.
fn map_strings(value: &mut Value, f: &dyn Fn(&str) -> Cow<'_, str>) {
    match value {
        Value::String(s) => {
            if let Cow::Owned(changed) = f(s) {
                *s = changed;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| map_strings(v, f)),
        Value::Object(map) => {
            if map.keys().any(|k| matches!(f(k), Cow::Owned(_))) {
                let old = std::mem::take(map);
                for (k, v) in old {
                    map.insert(f(&k).into_owned(), v);
                }
            }
            map.values_mut().for_each(|v| map_strings(v, f));
        }
        _ => {}
    }
}

fn read_file(path: &Path) -> Result<Vec<(String, String)>, SecretsError> {
    let err = |message: String| SecretsError::File {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    if text.trim_start().starts_with('{') {
        let map: serde_json::Map<String, Value> = serde_json::from_str(&text)
            .map_err(|e| err(format!("line {} column {}: {e}", e.line(), e.column())))?;
        return map
            .into_iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k, s)),
                Value::Number(n) => Ok((k, n.to_string())),
                Value::Bool(b) => Ok((k, b.to_string())),
                _ => Err(err(format!("{k}: a secret must be a string"))),
            })
            .collect();
    }
    let mut pairs = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| err(format!("line {}: expected NAME=value", n + 1)))?;
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
            .unwrap_or(v);
        pairs.push((k.trim().to_string(), v.to_string()));
    }
    Ok(pairs)
}

/// Watches a `--secrets` file and calls `apply` with its new contents once it has
/// stopped changing (editors write, rename or truncate it; each is seen). A file that
/// no longer parses is reported and the secrets in use are kept. Keep the returned
/// watcher alive for as long as changes should apply.
pub fn watch_file(
    path: &Path,
    apply: impl Fn(Secrets) + Send + 'static,
) -> notify::Result<notify::RecommendedWatcher> {
    use notify::Watcher;
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| Path::new(".").to_path_buf());
    let name = path.file_name().map(|n| n.to_os_string());
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && !matches!(event.kind, notify::EventKind::Access(_))
            && event.paths.iter().any(|p| p.file_name() == name.as_deref())
        {
            let _ = tx.send(());
        }
    })?;
    watcher.watch(&dir, notify::RecursiveMode::NonRecursive)?;
    std::thread::Builder::new()
        .name("fmhost-secrets-watch".into())
        .spawn(move || {
            let quiet = std::time::Duration::from_millis(200);
            let mut last: Option<Vec<u8>> = std::fs::read(&path).ok();
            while rx.recv().is_ok() {
                // Let a burst of writes settle.
                while rx.recv_timeout(quiet).is_ok() {}
                let Ok(now) = std::fs::read(&path) else {
                    continue;
                };
                if last.as_ref() == Some(&now) {
                    continue;
                }
                match Secrets::load(Some(&path)) {
                    Ok(s) => {
                        tracing::info!(target: "fmhost::secrets", file = %path.display(), "secrets reloaded from {}: {} name(s); stages starting from now use them", path.display(), s.names().len());
                        last = Some(now);
                        apply(s);
                    }
                    Err(e) => {
                        tracing::error!(target: "fmhost::secrets", file = %path.display(), "{e}; the secrets in use are kept");
                    }
                }
            }
        })
        .map_err(|e| notify::Error::generic(&e.to_string()))?;
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn redacts_longest_first_everywhere() {
        let s = Secrets::from_pairs([("A", "token-123"), ("B", "token-123456"), ("C", "ok")]);
        assert_eq!(s.redact("x token-123456 y token-123 ok"), "x *** y *** ***");
        // A short secret is masked where it stands alone, not inside words.
        assert_eq!(s.redact("book ok, ok-1"), "book ***, ***-1");
        let mut v = json!({"k": ["Bearer token-123"], "token-123": 1});
        s.redact_value(&mut v);
        assert_eq!(v, json!({"k": ["Bearer ***"], "***": 1}));
    }

    #[test]
    fn a_long_lived_process_finds_the_same_secrets_after_the_dfa_takes_over() {
        use base64::Engine as _;
        let s = Secrets::from_pairs([("A", "token-123"), ("KEY", "sk live/9+x")]);
        let b64 = base64::engine::general_purpose::STANDARD.encode("sk live/9+x");
        let text = format!("a token-123 b sk%20live%2F9%2Bx c {b64} d");
        let masked = "a *** b *** c *** d";
        assert_eq!(s.redact(&text), masked);
        let finder = s.find_masks.as_ref().unwrap();
        for _ in 0..=MaskFinder::DFA_AFTER {
            assert!(!finder.is_match(b"nothing to see here"));
        }
        assert!(
            matches!(finder.dfa.get(), Some(Some(_))),
            "the DFA is built"
        );
        assert_eq!(s.redact(&text), masked);
        assert_eq!(s.clone().redact(&text), masked, "a clone shares the finder");
    }

    #[test]
    fn references_stand_in_for_values_and_restore_them() {
        let s = Secrets::from_pairs([("URL", "http://10.0.0.7:9000"), ("KEY", "sk-secret-9")]);
        let original = json!({"api": "http://10.0.0.7:9000/v1", "echo": ["Bearer sk-secret-9"]});
        let stored = s.store(&original);
        assert_eq!(
            stored.as_value(),
            &json!({"api": "{{secrets.URL}}/v1", "echo": ["Bearer {{secrets.KEY}}"]})
        );
        assert_eq!(s.restore(&stored), original);
    }

    #[test]
    fn encodings_are_masked_and_literal_references_stay_data() {
        use base64::Engine as _;
        let s = Secrets::from_pairs([("KEY", "sk live/9+x")]);
        let b64 = base64::engine::general_purpose::STANDARD.encode("sk live/9+x");
        let text = format!("q=sk%20live%2F9%2Bx b={b64} j=\"sk live/9+x\"");
        assert!(!s.redact(&text).contains("sk"), "{}", s.redact(&text));
        // Data that looks like a reference comes back as the same text, never a secret.
        let original = json!({"id": "{{secrets.KEY}}", "x": "{{!secrets.KEY}} and sk live/9+x"});
        let stored = s.store(&original);
        assert_eq!(
            stored.as_value(),
            &json!({"id": "{{!secrets.KEY}}", "x": "{{!!secrets.KEY}} and {{secrets.KEY}}"})
        );
        assert_eq!(s.restore(&stored), original);
        // Other encodings of a value cannot be restored, so they are masked.
        let echoed = json!({"b": format!("basic {b64}"), "q": "q=sk%20live%2F9%2Bx"});
        assert_eq!(
            s.store(&echoed).as_value(),
            &json!({"b": "basic ***", "q": "q=***"})
        );
        // A rotation adds its values as references without escaping twice.
        let rotated = Secrets::from_pairs([("KEY", "sk live/9+x"), ("NEW", "new-value-1")]);
        let more = rotated.store_more(s.store(&json!(["{{secrets.KEY}} new-value-1 sk live/9+x"])));
        assert_eq!(
            more.as_value(),
            &json!(["{{!secrets.KEY}} {{secrets.NEW}} {{secrets.KEY}}"])
        );
        assert_eq!(
            rotated.restore(&more),
            json!(["{{secrets.KEY}} new-value-1 sk live/9+x"])
        );
        let mut bytes = b"echo sk live/9+x".to_vec();
        s.redact_bytes(&mut bytes);
        assert_eq!(bytes, b"echo ***");
    }

    #[test]
    fn dotenv_and_json_files() {
        let dir = std::env::temp_dir().join(format!("fmhost-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let env = dir.join("s.env");
        std::fs::write(&env, "# c\nexport A=\"one two\"\nB='x=y'\n").unwrap();
        let s = Secrets::load(Some(&env)).unwrap();
        assert_eq!((s.get("A"), s.get("B")), (Some("one two"), Some("x=y")));
        let js = dir.join("s.json");
        std::fs::write(&js, r#"{"A": "v", "N": 5}"#).unwrap();
        assert_eq!(Secrets::load(Some(&js)).unwrap().get("N"), Some("5"));
        std::fs::write(&js, r#"{"A": "#).unwrap();
        assert!(
            Secrets::load(Some(&js))
                .unwrap_err()
                .to_string()
                .contains("line 1")
        );
    }
}
