// rename-keys: an fmhost transform written in JavaScript (componentize-js).
//
// Renames object keys anywhere in `config.data` (or the stage input) by a map, the
// mapping step between two vendors' field names: {"renames": {"email_address": "email"}}.
import { log } from "fmhost:plugin/log@0.1.0";

const SCHEMA = {
  type: "object",
  required: ["renames"],
  properties: {
    renames: { type: "object", additionalProperties: { type: "string" } },
    data: { description: "The document to rewrite; the stage input when absent" },
  },
  additionalProperties: false,
};

function rename(node, renames, counter) {
  if (Array.isArray(node)) return node.map((item) => rename(item, renames, counter));
  if (node === null || typeof node !== "object") return node;
  const out = {};
  for (const [key, value] of Object.entries(node)) {
    const to = Object.hasOwn(renames, key) ? renames[key] : key;
    if (to !== key) counter.n += 1;
    out[to] = rename(value, renames, counter);
  }
  return out;
}

// An `err` of `result<json, plugin-error>` is a thrown plugin-error record.
function fail(kind, message) {
  throw { kind, message, retryable: false };
}

export const plugin = {
  describe() {
    return {
      name: "rename-keys",
      version: "0.1.0",
      kind: "transform",
      description: "Rename keys anywhere in a document (JavaScript)",
      configSchema: JSON.stringify(SCHEMA),
      allowedHosts: [],
    };
  },

  invoke(config, input) {
    let cfg, data;
    try {
      cfg = JSON.parse(config);
      data = "data" in cfg ? cfg.data : JSON.parse(input);
    } catch (e) {
      fail("invalid-config", `config: ${e}`);
    }
    const counter = { n: 0 };
    const out = rename(data, cfg.renames ?? {}, counter);
    log("info", `renamed ${counter.n} key(s)`);
    return JSON.stringify(out);
  },
};
