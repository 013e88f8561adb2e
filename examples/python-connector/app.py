"""crm-contact: an fmhost connector written in Python (componentize-py).

Fetches one contact from a CRM's REST API through the host and maps it to the
pipeline's shape: {"source", "id", "email", "name"}. It holds no credential: the
pipeline's `services` entry for the CRM carries the auth, and the stage that names the
service (`"service": "crm"`) grants this plugin that service's origin and nothing else.
Config: {"url": "http://crm.example/api/contacts/42"}.

This file is the one docs/writing-a-plugin.md walks through.
"""

import json

from wit_world import exports
from wit_world.imports import http, log, types
from componentize_py_types import Err

VERSION = "0.1.0"
# The CRM's name for each field we output; a vendor rename is a change here.
FIELDS = {"id": "id", "email": "email", "name": "full_name"}

SCHEMA = {
    "type": "object",
    "required": ["url"],
    "properties": {"url": {"type": "string", "description": "The contact's URL"}},
    "additionalProperties": False,
}


def fail(kind, message, retryable=False):
    return Err(types.PluginError(kind, message, retryable))


class Plugin(exports.Plugin):
    def describe(self) -> types.Descriptor:
        return types.Descriptor(
            name="crm-contact",
            version=VERSION,
            kind=types.PluginKind.CONNECTOR,
            description="One CRM contact, mapped to id, email and name (Python)",
            config_schema=json.dumps(SCHEMA),
            allowed_hosts=[],  # a request only; the pipeline grants hosts
        )

    def invoke(self, config: str, input: str) -> str:
        try:
            url = json.loads(config)["url"]
        except (ValueError, KeyError) as e:
            raise fail(types.ErrorKind.INVALID_CONFIG, f"config.url: {e}")
        request = http.Request(method="GET", url=url, headers=[("accept", "application/json")],
                               body=None, timeout_ms=5000, idempotency_key=None, retry=None)
        try:
            response = http.send(request)
        except Err as e:  # refused, timeout, connect, circuit-open, ...
            raise fail(types.ErrorKind.UPSTREAM, f"GET {url}: {e.value.message}", True)
        if response.status != 200:
            raise fail(types.ErrorKind.UPSTREAM, f"GET {url} answered {response.status}",
                       response.status >= 500)
        contact = json.loads(response.body)
        out = {"source": f"crm-contact {VERSION}"}
        for ours, theirs in FIELDS.items():
            if theirs not in contact:
                raise fail(types.ErrorKind.INVALID_INPUT,
                           f"GET {url}: the contact has no field `{theirs}`")
            out[ours] = contact[theirs]
        log.log(log.Level.INFO, f"contact {out['id']} fetched")
        return json.dumps(out)
