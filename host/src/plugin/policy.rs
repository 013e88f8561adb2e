//! The operator's grants to plugins (`--policy FILE`, or `FMHOST_POLICY`).
//!
//! ```json
//! {"plugins": {"stripe": {"hosts": ["api.stripe.com"], "secrets": ["STRIPE_SECRET_KEY"]},
//!              "intercom": {"hosts": ["declared"]}}}
//! ```
//! A plugin's `describe().allowed_hosts` is only what it asks for; it reaches a host
//! when the pipeline's stage or this policy grants it. `"declared"` in `hosts` approves
//! what the loaded version declares (a hot swap that declares more is refused unless
//! the same call approves it). Secrets listed here are bound to this entry's hosts.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// In `hosts`: whatever the plugin's own `describe()` lists.
pub const DECLARED: &str = "declared";

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// What each plugin, by the name it describes itself with, is granted in every stage.
    #[serde(default)]
    pub plugins: BTreeMap<String, PluginGrant>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PluginGrant {
    /// `host`, `*.domain`, `host:port`, or `"declared"`.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Secret names the plugin may have substituted, bound to `hosts`.
    #[serde(default)]
    pub secrets: Vec<String>,
}

impl Policy {
    pub fn load(path: &Path) -> Result<Policy, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("policy file {}: {e}", path.display()))?;
        let policy: Policy = serde_json::from_str(&text)
            .map_err(|e| format!("policy file {}: {e}", path.display()))?;
        for (name, g) in &policy.plugins {
            for (i, h) in g.hosts.iter().enumerate() {
                if h != DECLARED && super::HostPattern::parse(h).is_none() {
                    return Err(format!(
                        "policy file {}: plugins.{name}.hosts[{i}]: {h:?} is not a host, *.domain, host:port or \"declared\"",
                        path.display()
                    ));
                }
            }
        }
        Ok(policy)
    }

    /// Adds hosts approved at a hot swap to a plugin's grant.
    pub fn approve_hosts(&mut self, plugin: &str, hosts: &[String]) {
        let g = self.plugins.entry(plugin.to_string()).or_default();
        for h in hosts {
            if !g.hosts.contains(h) {
                g.hosts.push(h.clone());
            }
        }
    }
}
