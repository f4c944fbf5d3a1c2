"""Chart file checks that need no helm and no cluster: CRD copy, values, schema, dashboard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "inferencefleet"


def load_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    return values


def load_schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text())
    return schema


def test_chart_crd_is_an_exact_copy_of_the_crd() -> None:
    source = (ROOT / "crds" / "inferencefleet.yaml").read_bytes()
    copy = (CHART / "crds" / "inferencefleet.yaml").read_bytes()
    assert copy == source, (
        "charts/inferencefleet/crds/inferencefleet.yaml differs from crds/inferencefleet.yaml: "
        "run `make chart-sync-crd`"
    )


def test_chart_crds_folder_holds_only_the_crd() -> None:
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == ["inferencefleet.yaml"]


def test_default_values_pass_the_schema() -> None:
    schema = load_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(load_values(), schema, cls=jsonschema.Draft7Validator)


def closed_objects(schema: dict[str, Any], where: str = "") -> list[str]:
    """Paths of every object schema with properties; each must forbid unknown keys."""
    found: list[str] = []
    if "properties" in schema:
        found.append(where or "<root>")
        for name, sub in schema["properties"].items():
            found += closed_objects(sub, f"{where}.{name}")
    return found


def test_every_schema_object_rejects_unknown_keys() -> None:
    schema = load_schema()
    open_ones = []
    for path in closed_objects(schema):
        node = schema
        for part in [p for p in path.split(".") if p and p != "<root>"]:
            node = node["properties"][part]
        if node.get("additionalProperties") is not False:
            open_ones.append(path)
    assert open_ones == []


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"logLevel": 3}, "3 is not of type 'string'"),
        ({"healthPort": "8080"}, "'8080' is not of type 'integer'"),
        ({"watchNamespaces": "vision"}, "'vision' is not of type 'array'"),
        ({"image": {"repository": "x", "tagg": "1"}}, "Additional properties are not allowed"),
        ({"replicas": 2}, "Additional properties are not allowed ('replicas' was unexpected)"),
        ({"monitoring": {"enabled": "yes"}}, "'yes' is not of type 'boolean'"),
    ],
)
def test_schema_rejects_wrong_types_and_unknown_keys(
    override: dict[str, Any], message: str
) -> None:
    values = load_values() | override
    with pytest.raises(jsonschema.ValidationError) as caught:
        jsonschema.validate(values, load_schema(), cls=jsonschema.Draft7Validator)
    assert message in caught.value.message


def documented_keys(node: yaml.Node, lines: list[str], inherited: bool = False) -> list[str]:
    """Keys of values.yaml without a helm-docs `# --` comment above them (or above a parent)."""
    missing: list[str] = []
    if not isinstance(node, yaml.MappingNode):
        return missing
    for key, value in node.value:
        row = key.start_mark.line - 1
        comment: list[str] = []
        while row >= 0 and lines[row].strip().startswith("#"):
            comment.insert(0, lines[row].strip())
            row -= 1
        has_doc = bool(comment) and any(c.startswith("# --") for c in comment)
        is_parent = isinstance(value, yaml.MappingNode) and bool(value.value)
        if not (has_doc or inherited or is_parent):
            missing.append(f"{key.value} (line {key.start_mark.line + 1})")
        missing += documented_keys(value, lines, inherited or has_doc)
    return missing


def test_every_value_has_a_helm_docs_comment() -> None:
    text = (CHART / "values.yaml").read_text()
    assert documented_keys(yaml.compose(text), text.splitlines()) == []


def test_every_default_value_is_in_the_schema() -> None:
    schema = load_schema()

    def walk(values: dict[str, Any], node: dict[str, Any], where: str) -> list[str]:
        missing = []
        for key, value in values.items():
            sub = node.get("properties", {}).get(key)
            if sub is None:
                missing.append(f"{where}{key}")
            elif isinstance(value, dict) and "properties" in sub:
                missing += walk(value, sub, f"{where}{key}.")
        return missing

    assert walk(load_values(), schema, "") == []


def test_dashboard_charts_each_worker_metric_per_fleet() -> None:
    dashboard = json.loads((CHART / "dashboards" / "inferencefleet.json").read_text())
    panels = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in dashboard["panels"]}
    wanted = {
        "Frames/s": "inferencefleet_frames_total",
        "p99 latency (end to end)": "inferencefleet_request_duration_seconds_bucket",
        "Mean batch size": "inferencefleet_batch_size_count",
        "Queue depth": "inferencefleet_queue_depth",
        "Worker restarts (1h)": "kube_pod_container_status_restarts_total",
    }
    for title, metric in wanted.items():
        assert metric in panels[title], title
        assert "fleet" in panels[title], f"{title} is not grouped per fleet"
    assert "histogram_quantile(0.99" in panels["p99 latency (end to end)"]
    variables = [v["name"] for v in dashboard["templating"]["list"]]
    assert variables == ["datasource", "namespace", "fleet"]


def test_dashboard_ids_are_unique() -> None:
    dashboard = json.loads((CHART / "dashboards" / "inferencefleet.json").read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] == "inferencefleet"
