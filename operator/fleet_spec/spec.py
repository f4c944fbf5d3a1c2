"""The InferenceFleet spec: parse a manifest into a FleetSpec with the CRD's defaults and rules."""

from __future__ import annotations

import copy
import functools
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import jsonschema
import yaml

from fleet_spec.contract import BUILTIN_PREFIX, BatchSettings, served_model_name

GROUP = "inferencefleet.dev"
VERSION = "v1alpha1"
KIND = "InferenceFleet"
PLURAL = "inferencefleets"
API_VERSION = f"{GROUP}/{VERSION}"

# The CRD is the single source of truth; INFERENCEFLEET_CRD points elsewhere (e.g. in an image).
CRD_PATH = Path(
    os.environ.get(
        "INFERENCEFLEET_CRD", Path(__file__).resolve().parents[2] / "crds" / "inferencefleet.yaml"
    )
)

BUILTIN_MODELS = ("tiny", "resnet18")
MODEL_MOUNT = "/models"


class FleetSpecError(ValueError):
    """An invalid fleet; the message names each bad field, e.g. 'spec.replicas: must be >= 0'."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        self.errors = errors
        self.field = errors[0][0]
        super().__init__("; ".join(f"{path}: {text}" for path, text in errors))


@dataclass(frozen=True)
class ModelSpec:
    source: str
    precision: str = "fp16"
    name: str | None = None
    claim_name: str | None = None

    @property
    def is_builtin(self) -> bool:
        return self.source.startswith(BUILTIN_PREFIX)

    @property
    def served_name(self) -> str:
        """The model name clients use: spec.model.name, else tiny/resnet18, else the file's stem."""
        return served_model_name(self.source, self.name)


@dataclass(frozen=True)
class GpuSpec:
    product: str | None = None
    sharing: str = "none"
    workers_per_gpu: int = 1
    memory_per_worker_mib: int = 2048

    @property
    def shared(self) -> bool:
        return self.sharing != "none"


@dataclass(frozen=True)
class FleetSpec:
    name: str
    namespace: str
    model: ModelSpec
    replicas: int = 1
    processes_per_pod: int = 1
    batching: BatchSettings = field(default_factory=BatchSettings)
    gpu: GpuSpec = field(default_factory=GpuSpec)
    image: str | None = None
    resources: dict[str, dict[str, str | int]] = field(default_factory=dict)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)


@functools.cache
def crd() -> dict[str, Any]:
    """The CustomResourceDefinition document from crds/inferencefleet.yaml."""
    with CRD_PATH.open(encoding="utf-8") as handle:
        document: dict[str, Any] = yaml.safe_load(handle)
    return document


def openapi_schema() -> dict[str, Any]:
    """The served version's openAPIV3Schema."""
    for version in crd()["spec"]["versions"]:
        if version["name"] == VERSION:
            schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
            return schema
    raise LookupError(f"{CRD_PATH} has no version {VERSION}")


def apply_defaults(value: Any, schema: Mapping[str, Any]) -> Any:
    """Fill in the schema's defaults as the apiserver does: a defaulted object gets its own."""
    if isinstance(value, dict) and schema.get("type") == "object":
        properties: Mapping[str, Any] = schema.get("properties", {})
        for key, sub in properties.items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = apply_defaults(value[key], sub)
    elif isinstance(value, list) and "items" in schema:
        return [apply_defaults(item, schema["items"]) for item in value]
    return value


def _closed(schema: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the schema that rejects unknown fields, as strict field validation does."""
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "properties":
            out[key] = {name: _closed(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _closed(value)
        else:
            out[key] = value
    if "properties" in schema and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


def _path(parts: Any) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _schema_error(error: jsonschema.ValidationError) -> tuple[str, str]:
    where = _path(error.absolute_path)
    kind, arg = str(error.validator), cast(Any, error.validator_value)
    instance: Any = error.instance
    if kind == "required":
        missing = next(name for name in arg if name not in instance)
        return (f"{where}.{missing}" if where else missing), "Required value"
    if kind == "additionalProperties":
        schema: Mapping[str, Any] = error.schema if isinstance(error.schema, Mapping) else {}
        extra = sorted(set(instance) - set(schema.get("properties", {})))
        return f"{where}.{extra[0]}", "unknown field"
    texts: dict[str, Callable[[Any], str]] = {
        "minimum": lambda v: f"must be >= {v}",
        "maximum": lambda v: f"must be <= {v}",
        "enum": lambda v: "must be one of " + ", ".join(repr(item) for item in v),
        "type": lambda v: f"must be of type {v}",
        "pattern": lambda v: f"must match {v}",
        "minLength": lambda v: f"must be at least {v} characters",
        "maxLength": lambda v: f"must be at most {v} characters",
        "maxItems": lambda v: f"must have at most {v} items",
        "maxProperties": lambda v: f"must have at most {v} entries",
    }
    text = texts[kind](arg) if kind in texts else error.message
    return where or "<root>", f"{text} (got {error.instance!r})" if kind != "type" else text


# A label name (Kubernetes' qualified name): an optional DNS subdomain prefix and '/', then a name
# of at most 63 characters; the prefix at most 253. The same regex in the CRD's rules (RE2).
_LABEL_NAME = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
_LABEL_NAME_RULE = "k.matches('" + _LABEL_NAME.replace("\\", "\\\\") + "') && k.indexOf('/') <= 253"
_CONTAINER_RESOURCES = ("cpu", "memory", "ephemeral-storage")


def _is_label_name(key: str) -> bool:
    return re.fullmatch(_LABEL_NAME, key) is not None and key.find("/") <= 253


def _is_resource_name(key: str) -> bool:
    """What the Deployment API takes as a container resource name."""
    known = key in _CONTAINER_RESOURCES or key.startswith("hugepages-") or "/" in key
    return known and _is_label_name(key)


# The CRD's CEL rules (x-kubernetes-validations), re-checked in Python. Keyed by the rule text so
# that a test fails when the CRD gains a rule that has no Python twin here.
CelCheck = Callable[[Any], bool]
CEL_RULES: dict[str, CelCheck] = {
    (
        "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')"
        " && self.metadata.name.size() <= 50"
    ): (
        lambda s: (
            _is_dns_label(str(s.get("metadata", {}).get("name", "")))
            and len(s["metadata"]["name"]) <= 50
        )
    ),
    "!has(self.volume) || self.source.startsWith('/models/')": (
        lambda s: "volume" not in s or str(s["source"]).startswith(MODEL_MOUNT + "/")
    ),
    "self.maxQueueSize >= self.maxBatchSize": lambda s: s["maxQueueSize"] >= s["maxBatchSize"],
    "self.sharing != 'none' || self.workersPerGPU == 1": (
        lambda s: s["sharing"] != "none" or s["workersPerGPU"] == 1
    ),
    "self.sharing == 'none' || self.workersPerGPU >= 2": (
        lambda s: s["sharing"] == "none" or s["workersPerGPU"] >= 2
    ),
    (
        "(!has(self.limits) || !('nvidia.com/gpu' in self.limits))"
        " && (!has(self.requests) || !('nvidia.com/gpu' in self.requests))"
    ): (lambda s: all("nvidia.com/gpu" not in s.get(part, {}) for part in ("limits", "requests"))),
    "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''": (
        lambda s: s.get("operator") != "Exists" or not s.get("value")
    ),
    f"self.all(k, {_LABEL_NAME_RULE})": lambda s: all(_is_label_name(k) for k in s),
    (
        "self.all(k, (k in ['cpu', 'memory', 'ephemeral-storage'] || k.startsWith('hugepages-')"
        f" || k.contains('/')) && {_LABEL_NAME_RULE})"
    ): lambda s: all(_is_resource_name(k) for k in s),
    "(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')": (
        lambda s: bool(s.get("key")) or s.get("operator") == "Exists"
    ),
    "!has(self.key) || self.key.indexOf('/') <= 253": lambda s: s.get("key", "").find("/") <= 253,
    "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')": (
        lambda s: "tolerationSeconds" not in s or s.get("effect") == "NoExecute"
    ),
}


def _is_dns_label(name: str) -> bool:
    allowed = set("abcdefghijklmnopqrstuvwxyz0123456789-")
    return (
        bool(name)
        and name[0].isalpha()
        and name[-1] != "-"
        and set(name) <= allowed
        and name.islower()
    )


def _cel_errors(value: Any, schema: Mapping[str, Any], where: str) -> list[tuple[str, str]]:
    errors: list[tuple[str, str]] = []
    for rule in schema.get("x-kubernetes-validations", []):
        if not CEL_RULES[rule["rule"]](value):
            path = where + rule.get("fieldPath", "")
            message = str(rule["message"])
            if not path and ": " in message:  # root rules name their field in the message
                path, message = message.split(": ", 1)
            errors.append((path, message))
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                errors += _cel_errors(value[key], sub, f"{where}.{key}" if where else key)
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            errors += _cel_errors(item, schema["items"], f"{where}[{index}]")
    return errors


def defaulted(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of the manifest with the CRD's defaults filled in (no validation)."""
    result: dict[str, Any] = apply_defaults(copy.deepcopy(dict(manifest)), openapi_schema())
    return result


def validate(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Default and validate like the apiserver (schema, then CEL); return the defaulted copy."""
    document = defaulted(manifest)
    schema = openapi_schema()
    validator = jsonschema.Draft7Validator(_closed(schema))
    errors = [
        _schema_error(e)
        for e in sorted(validator.iter_errors(document), key=lambda e: list(e.path))
    ]
    if errors:
        raise FleetSpecError(errors)
    cel = _cel_errors(document, schema, "")
    if cel:
        raise FleetSpecError(cel)
    return document


def parse_fleet(manifest: Mapping[str, Any]) -> FleetSpec:
    """Parse an InferenceFleet manifest into a FleetSpec, or raise FleetSpecError naming a field."""
    if manifest.get("kind", KIND) != KIND or manifest.get("apiVersion", API_VERSION) != API_VERSION:
        raise FleetSpecError([("kind", f"must be {KIND} ({API_VERSION})")])
    doc = validate(manifest)
    meta, spec = doc.get("metadata", {}), doc["spec"]
    model, batching, gpu = spec["model"], spec["batching"], spec["gpu"]
    return FleetSpec(
        name=meta.get("name", ""),
        namespace=meta.get("namespace", "default"),
        replicas=spec["replicas"],
        processes_per_pod=spec["processesPerPod"],
        model=ModelSpec(
            source=model["source"],
            precision=model["precision"],
            name=model.get("name"),
            claim_name=model.get("volume", {}).get("claimName"),
        ),
        batching=BatchSettings.from_mapping(batching),
        gpu=GpuSpec(
            product=gpu.get("product"),
            sharing=gpu["sharing"],
            workers_per_gpu=gpu["workersPerGPU"],
            memory_per_worker_mib=gpu["memoryPerWorkerMiB"],
        ),
        image=spec.get("image"),
        resources=copy.deepcopy(spec.get("resources", {})),
        node_selector=dict(spec.get("nodeSelector", {})),
        tolerations=copy.deepcopy(spec.get("tolerations", [])),
    )


def load_fleet(path: str | Path) -> FleetSpec:
    """Read a fleet manifest from a YAML file and parse it."""
    with Path(path).open(encoding="utf-8") as handle:
        manifest = yaml.safe_load(handle)
    if not isinstance(manifest, dict):
        raise FleetSpecError([("<root>", f"{path} does not hold one YAML mapping")])
    return parse_fleet(manifest)
