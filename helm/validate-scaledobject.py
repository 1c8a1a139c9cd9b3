"""Validates the KEDA ScaledObjects in rendered manifests (kubernetes-validate has no schema for CRDs).

    python validate-scaledobject.py MANIFEST.yaml...   (needs jsonschema and pyyaml: the
                                                        kubernetes-validate venv has both)

Each ScaledObject is checked against the CRD's own schema (schemas/keda-scaledobject-v1alpha1.json, from
KEDA v2.20.2), with unknown fields refused as kubectl's strict field validation does, and the metadata of
the triggers the chart renders against what those KEDA scalers parse (pkg/scalers/nats_jetstream_scaler.go,
prometheus_scaler.go at that version): required keys present, no unknown key, numbers and booleans that
parse. Prints one line per object; exits 1 if any is invalid.
"""

import json
import pathlib
import re
import sys

import jsonschema
import yaml

SCHEMA = pathlib.Path(__file__).parent / "schemas" / "keda-scaledobject-v1alpha1.json"

INT = re.compile(r"^-?[0-9]+$")
FLOAT = re.compile(r"^-?[0-9]+(\.[0-9]+)?$")
BOOL = {"true", "false"}

# The trigger metadata each scaler reads: key -> value pattern (None: any string), and the required keys.
SCALERS = {
    "nats-jetstream": {
        "keys": {
            "natsServerMonitoringEndpoint": re.compile(r"^[^/\s:]+(:[0-9]+)?$"),
            "account": None,
            "accountID": None,
            "stream": re.compile(r"^[^.\s*>]+$"),
            "consumer": re.compile(r"^[^.\s*>]+$"),
            "lagThreshold": INT,
            "activationLagThreshold": INT,
            "useHttps": BOOL,
        },
        "required": ["natsServerMonitoringEndpoint", "stream", "consumer"],
        "one_of": ["account", "accountID"],
    },
    "prometheus": {
        "keys": {
            "serverAddress": re.compile(r"^https?://\S+$"),
            "query": None,
            "queryParameters": None,
            "threshold": FLOAT,
            "activationThreshold": FLOAT,
            "namespace": None,
            "customHeaders": None,
            "ignoreNullValues": BOOL,
            "unsafeSsl": BOOL,
            "awsRegion": None,
            "timeout": None,
            "identityOwner": None,
        },
        "required": ["serverAddress", "query", "threshold"],
        "one_of": [],
    },
}


def strict(schema):
    """The schema with additionalProperties: false wherever an object lists its properties."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def trigger_errors(trigger):
    kind = trigger.get("type")
    scaler = SCALERS.get(kind)
    if scaler is None:
        return [f"trigger type {kind!r} is not one the chart renders"]
    meta = trigger.get("metadata", {})
    errors = []
    for key, value in meta.items():
        if key not in scaler["keys"]:
            errors.append(f"{kind}: unknown metadata key {key!r}")
            continue
        pattern = scaler["keys"][key]
        if isinstance(pattern, set) and value not in pattern:
            errors.append(f"{kind}: {key}={value!r} is not true/false")
        elif isinstance(pattern, re.Pattern) and not pattern.match(value):
            errors.append(f"{kind}: {key}={value!r} does not match {pattern.pattern}")
        elif value == "":
            errors.append(f"{kind}: {key} is empty")
    for key in scaler["required"]:
        if not meta.get(key):
            errors.append(f"{kind}: metadata {key} is missing")
    if scaler["one_of"] and not any(meta.get(k) for k in scaler["one_of"]):
        errors.append(f"{kind}: one of {scaler['one_of']} is needed")
    return errors


def main(paths):
    schema = strict(json.loads(SCHEMA.read_text()))
    schema.pop("$comment", None)
    validator = jsonschema.Draft7Validator(schema)
    seen = 0
    bad = 0
    for path in paths:
        for doc in yaml.safe_load_all(pathlib.Path(path).read_text()):
            if not doc or doc.get("kind") != "ScaledObject":
                continue
            seen += 1
            name = f"{path}: ScaledObject {doc.get('metadata', {}).get('name')}"
            errors = [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in validator.iter_errors(doc)]
            if doc.get("apiVersion") != "keda.sh/v1alpha1":
                errors.append(f"apiVersion {doc.get('apiVersion')!r} is not keda.sh/v1alpha1")
            for i, trigger in enumerate(doc.get("spec", {}).get("triggers") or []):
                errors += [f"spec.triggers.{i}: {e}" for e in trigger_errors(trigger)]
            if errors:
                bad += 1
                print(f"INVALID {name}")
                for e in errors:
                    print(f"  {e}")
            else:
                print(f"valid {name}")
    if seen == 0:
        print("no ScaledObject found")
        return 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
