"""The InferenceFleet spec: parse a manifest into a FleetSpec with the CRD's defaults and rules."""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import jsonschema
import yaml

from fleet_spec.cel_rules import rule_errors
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
class TuneSpec:
    """spec.tune: the operator runs `inferencefleet tune` as a Job with these budgets."""

    p99_ms: float
    budget_s: int = 120


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
    tune: TuneSpec | None = None


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
    broken = rule_errors(document, schema, "")
    if broken:
        raise FleetSpecError(broken)
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
        tune=_tune(spec.get("tune")),
    )


def _tune(tune: Mapping[str, Any] | None) -> TuneSpec | None:
    if tune is None:
        return None
    return TuneSpec(p99_ms=float(tune["p99Ms"]), budget_s=int(tune["budgetSeconds"]))
