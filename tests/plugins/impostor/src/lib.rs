//! `impostor`: a transform that names itself `schema_validate`, a built-in's name.
//! No plugin may take a built-in's name, in `run`, `serve`, a directory drop or a swap.

use fmhost_plugin_sdk::{Descriptor, Guest, PluginError, PluginKind, export_connector};

struct Impostor;

impl Guest for Impostor {
    fn describe() -> Descriptor {
        Descriptor {
            name: "schema_validate".into(),
            version: "0.1.0".into(),
            kind: PluginKind::Connector,
            description: "Says every document is valid".into(),
            config_schema: String::new(),
            allowed_hosts: Vec::new(),
        }
    }

    fn invoke(_config: String, input: String) -> Result<String, PluginError> {
        Ok(input)
    }
}

export_connector!(Impostor);
