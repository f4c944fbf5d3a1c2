"""Unit tests of parse_fleet: the CRD's defaults, schema and CEL rules, and field-naming errors."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from fleet_local.manifest import read_fleet
from fleet_spec import cel_rules
from fleet_spec import spec as fleet_spec
from fleet_spec.spec import FleetSpecError, parse_fleet

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fleet.yaml"


def test_minimal_fleet_gets_every_default() -> None:
    fleet = parse_fleet(
        {
            "apiVersion": "inferencefleet.dev/v1alpha1",
            "kind": "InferenceFleet",
            "metadata": {"name": "tiny"},
            "spec": {"model": {"source": "builtin:tiny"}},
        }
    )
    assert fleet.namespace == "default"
    assert fleet.replicas == 1
    assert fleet.processes_per_pod == 1
    assert fleet.model.precision == "fp16"
    assert fleet.model.served_name == "tiny"
    assert fleet.batching.to_mapping() == {
        "maxBatchSize": 8,
        "maxQueueDelayMicroseconds": 2000,
        "maxQueueSize": 64,
    }
    assert (fleet.gpu.product, fleet.gpu.sharing, fleet.gpu.workers_per_gpu) == (None, "none", 1)
    assert fleet.gpu.memory_per_worker_mib == 2048


def test_example_fleet_parses() -> None:
    fleet = read_fleet(EXAMPLE)
    assert fleet.name == "detector"
    assert fleet.gpu.product == "NVIDIA-RTX-6000-Ada-Generation"
    assert fleet.gpu.sharing == "timeSlicing"
    assert fleet.gpu.workers_per_gpu == 4
    assert fleet.batching.max_batch_size == 8


def test_file_model_on_a_volume(valid_fleet: dict[str, Any]) -> None:
    valid_fleet["spec"]["model"] = {
        "source": "/models/detector.pt2",
        "volume": {"claimName": "weights"},
    }
    fleet = parse_fleet(valid_fleet)
    assert fleet.model.claim_name == "weights"
    assert fleet.model.served_name == "detector"
    assert not fleet.model.is_builtin


def test_parse_does_not_change_its_input(valid_fleet: dict[str, Any]) -> None:
    before = copy.deepcopy(valid_fleet)
    del valid_fleet["spec"]["batching"]
    del before["spec"]["batching"]
    parse_fleet(valid_fleet)
    assert valid_fleet == before


def test_invalid_fleet_error_names_the_field(invalid_fleet: Any) -> None:
    with pytest.raises(FleetSpecError) as caught:
        parse_fleet(invalid_fleet.manifest)
    assert caught.value.field == invalid_fleet.field
    assert invalid_fleet.field in str(caught.value)


def test_error_message_reads_well(valid_fleet: dict[str, Any]) -> None:
    valid_fleet["spec"]["batching"]["maxBatchSize"] = 0
    with pytest.raises(FleetSpecError, match=r"^spec\.batching\.maxBatchSize: must be >= 1"):
        parse_fleet(valid_fleet)


def test_wrong_kind_is_rejected(valid_fleet: dict[str, Any]) -> None:
    valid_fleet["kind"] = "Deployment"
    with pytest.raises(FleetSpecError, match="kind"):
        parse_fleet(valid_fleet)


def test_every_cel_rule_of_the_crd_can_be_evaluated_here() -> None:
    """A rule calling a Kubernetes CEL function we do not provide fails here, not in `run`."""
    found = cel_rules.rules(fleet_spec.crd())
    assert found
    assert {rule: cel_rules.unsupported(rule) for rule in found} == {rule: set() for rule in found}


@pytest.mark.parametrize(
    ("value", "ok"),
    [("1Gi", True), ("500m", True), ("1.5", True), ("2e3", True), ("1GB", False), ("", False)],
)
def test_is_quantity_follows_the_kubernetes_grammar(value: str, ok: bool) -> None:
    assert cel_rules.KUBERNETES_FUNCTIONS["isQuantity"](value) is ok


def test_a_rule_is_evaluated_where_it_is_declared() -> None:
    schema = {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "x-kubernetes-validations": [
                        {
                            "rule": "self.low <= self.high",
                            "fieldPath": ".low",
                            "message": "too high",
                        }
                    ],
                },
            }
        },
    }
    value = {"items": [{"low": 1, "high": 2}, {"low": 3, "high": 2}]}
    assert cel_rules.rule_errors(value, schema, "spec") == [("spec.items[1].low", "too high")]


def test_crd_declares_the_scale_subresource_and_short_name() -> None:
    document = fleet_spec.crd()
    version = document["spec"]["versions"][0]
    assert document["spec"]["names"]["shortNames"] == ["ifleet"]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    assert any(column.get("priority") == 1 for column in version["additionalPrinterColumns"])


def test_load_fleet_rejects_a_non_mapping(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(["not", "a", "fleet"]))
    with pytest.raises(FleetSpecError, match="mapping"):
        read_fleet(path)


def test_object_defaults_spell_out_their_fields_defaults() -> None:
    """The apiserver checks CEL rules against an object's default as written: it must be whole."""
    spec_schema = fleet_spec.openapi_schema()["properties"]["spec"]["properties"]
    for name in ("batching", "gpu"):
        schema = spec_schema[name]
        nested = {
            key: sub["default"] for key, sub in schema["properties"].items() if "default" in sub
        }
        assert schema["default"] == nested, name
