//! Host patterns: what an egress grant or an `allowed_hosts` list names.

/// `host`, `*.domain` or `host:port` (no port means any port).
#[derive(Debug, Clone, PartialEq)]
pub struct HostPattern {
    host: String,
    port: Option<u16>,
}

impl HostPattern {
    pub fn parse(s: &str) -> Option<HostPattern> {
        let s = s.trim().to_ascii_lowercase();
        let s = s.split("://").last()?.trim_end_matches('/');
        if s.contains('/') || s.contains('@') || s.contains(char::is_whitespace) {
            return None;
        }
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) if !h.contains(']') || h.ends_with(']') => match p.parse() {
                Ok(port) => (h.to_string(), Some(port)),
                Err(_) if p == "*" => (h.to_string(), None),
                Err(_) => return None,
            },
            _ => (s.to_string(), None),
        };
        (!host.is_empty()).then_some(HostPattern { host, port })
    }

    /// The host and port of a URL, as a pattern that matches exactly them.
    pub fn of_url(url: &str) -> Option<HostPattern> {
        let u = reqwest::Url::parse(url).ok()?;
        Some(HostPattern {
            host: u.host_str()?.to_ascii_lowercase(),
            port: u.port_or_known_default(),
        })
    }

    pub fn matches(&self, host: &str, port: Option<u16>) -> bool {
        let host = host.to_ascii_lowercase();
        let host_ok = match self.host.strip_prefix("*.") {
            Some(domain) => host.ends_with(&format!(".{domain}")),
            None => host == self.host,
        };
        host_ok && (self.port.is_none() || self.port == port)
    }

    pub fn matches_url(&self, url: &reqwest::Url) -> bool {
        self.matches(
            url.host_str().unwrap_or_default(),
            url.port_or_known_default(),
        )
    }

    /// Names exactly one host and port (not a wildcard, not any port).
    pub fn is_exact(&self) -> bool {
        self.port.is_some() && !self.host.starts_with("*.")
    }
}

impl std::fmt::Display for HostPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}:{p}", self.host),
            None => f.write_str(&self.host),
        }
    }
}
