"""mask-fields: an fmhost transform written in Python (componentize-py).

Masks the values of the named fields anywhere in `config.data` (or the stage input),
e.g. before customer data is sent to an LLM: "billing@acme.com" -> "b******@acme.com".
"""

import json

from wit_world import exports
from wit_world.imports import log, types
from componentize_py_types import Err

SCHEMA = {
    "type": "object",
    "required": ["fields"],
    "properties": {
        "fields": {"type": "array", "items": {"type": "string"}},
        "data": {"description": "The document to mask; the stage input when absent"},
    },
    "additionalProperties": False,
}


def mask(value):
    if not isinstance(value, str):
        return "***"
    if "@" in value:
        user, _, domain = value.partition("@")
        return user[:1] + "*" * max(len(user) - 1, 1) + "@" + domain
    return value[:1] + "*" * max(len(value) - 1, 1)


def walk(node, fields, counter):
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key in fields and value is not None:
                counter[0] += 1
                out[key] = mask(value)
            else:
                out[key] = walk(value, fields, counter)
        return out
    if isinstance(node, list):
        return [walk(item, fields, counter) for item in node]
    return node


class Plugin(exports.Plugin):
    def describe(self) -> types.Descriptor:
        return types.Descriptor(
            name="mask-fields",
            version="0.1.0",
            kind=types.PluginKind.TRANSFORM,
            description="Mask PII fields anywhere in a document (Python)",
            config_schema=json.dumps(SCHEMA),
            allowed_hosts=[],
        )

    def invoke(self, config: str, input: str) -> str:
        try:
            cfg = json.loads(config)
            data = cfg["data"] if "data" in cfg else json.loads(input)
        except (ValueError, KeyError) as e:
            raise Err(types.PluginError(types.ErrorKind.INVALID_CONFIG, f"config: {e}", False))
        fields = set(cfg.get("fields", []))
        counter = [0]
        masked = walk(data, fields, counter)
        log.log(log.Level.INFO, f"masked {counter[0]} value(s)")
        return json.dumps(masked)
