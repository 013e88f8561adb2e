//! The operator's grants to plugins (`--policy FILE`, or `FMHOST_POLICY`).
//!
//! ```json
//! {"plugins": {"stripe": {"hosts": ["api.stripe.com"], "secrets": ["STRIPE_SECRET_KEY"]},
//!              "intercom": {"hosts": ["declared"]}}}
//! ```
//! A plugin's `describe().allowed_hosts` is only what it asks for; it reaches a host
//! when the pipeline's stage or this policy grants it. `"declared"` in `hosts` approves
//! what the loaded version declares (a hot swap that declares more is refused unless
//! the same call approves it); `"{{secrets.NAME}}"` is the host of the URL kept in that
//! secret. Secrets listed here are bound to this entry's hosts.
//!
//! fmhost starts from [`Policy::builtin`] (`default-policy.json`): the shipped
//! connectors' vendor credentials, each bound to its vendor's host and to the host of
//! the base URL the operator keeps beside it, so the seed's pipelines run as written.
//! A policy file replaces the entries of the plugins it names, and
//! `"builtin_defaults": false` starts from nothing.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// In `hosts`: whatever the plugin's own `describe()` lists.
pub const DECLARED: &str = "declared";

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Whether the built-in entries apply beneath this file's (default true).
    #[serde(default = "yes", skip_serializing)]
    pub builtin_defaults: bool,
    /// What each plugin, by the name it describes itself with, is granted in every stage.
    #[serde(default)]
    pub plugins: BTreeMap<String, PluginGrant>,
    /// Hosts approved at a hot swap, per plugin: reachable, but no secret is bound to them.
    #[serde(skip)]
    pub approved: BTreeMap<String, Vec<String>>,
}

fn yes() -> bool {
    true
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
    /// Every secret name granted to some plugin.
    pub fn granted_secrets(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .plugins
            .values()
            .flat_map(|g| g.secrets.iter().cloned())
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

impl Policy {
    /// The grants fmhost ships for its own connectors.
    pub fn builtin() -> Policy {
        serde_json::from_str(include_str!("default-policy.json"))
            .expect("the built-in policy is valid JSON")
    }

    /// A policy file over the built-in one (unless it says `"builtin_defaults": false`).
    pub fn load(path: &Path) -> Result<Policy, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("policy file {}: {e}", path.display()))?;
        let file: Policy = serde_json::from_str(&text)
            .map_err(|e| format!("policy file {}: {e}", path.display()))?;
        let mut policy = if file.builtin_defaults {
            Policy::builtin()
        } else {
            Policy::default()
        };
        policy.plugins.extend(file.plugins);
        for (name, g) in &policy.plugins {
            for (i, h) in g.hosts.iter().enumerate() {
                if h != DECLARED
                    && super::secret_token(h).is_none()
                    && super::HostPattern::parse(h).is_none()
                {
                    return Err(format!(
                        "policy file {}: plugins.{name}.hosts[{i}]: {h:?} is not a host, *.domain, host:port or \"declared\"",
                        path.display()
                    ));
                }
            }
        }
        Ok(policy)
    }

    /// Lets a plugin reach hosts the operator approved at a hot swap. No credential is
    /// bound to them by this: approving a destination is not handing it a secret.
    pub fn approve_hosts(&mut self, plugin: &str, hosts: &[String]) {
        let g = self.approved.entry(plugin.to_string()).or_default();
        for h in hosts {
            if !g.contains(h) {
                g.push(h.clone());
            }
        }
    }
}
