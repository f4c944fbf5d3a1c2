"""Unit tests of `inferencefleet operator`'s command line and kopf settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from fleet_operator.main import parse_args, settings_for

VALUES = Path(__file__).resolve().parents[2] / "charts" / "inferencefleet" / "values.yaml"


def test_defaults_agree_with_the_chart_and_namespaces_repeat() -> None:
    """`inferencefleet operator --namespace a` by hand finds what a default install set up."""
    args = parse_args(["--namespace", "a", "--namespace", "b"])
    assert args.namespace == ["a", "b"]
    assert not args.all_namespaces
    values = yaml.safe_load(VALUES.read_text())
    assert (args.device_plugin_configmap, args.device_plugin_namespace) == (
        values["devicePlugin"]["configMapName"],
        values["devicePlugin"]["namespace"],
    )
    assert args.liveness_port == values["healthPort"]
    assert not args.standalone
    overridden = parse_args(["--all-namespaces", "--liveness-port", "0", "--standalone"])
    assert (overridden.liveness_port, overridden.standalone) == (0, True)


def test_a_scope_is_required_and_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args([])
    with pytest.raises(SystemExit):
        parse_args(["--namespace", "a", "--all-namespaces"])
    with pytest.raises(SystemExit):
        parse_args(["--all-namespaces", "--standalone", "--peering", "x"])
    assert "not allowed with" in capsys.readouterr().err


def test_settings_guard_against_stalled_watches() -> None:
    settings = settings_for(parse_args(["--all-namespaces", "--standalone"]))
    assert settings.watching.server_timeout is not None
    assert settings.watching.client_timeout is not None
    assert settings.watching.client_timeout > settings.watching.server_timeout
    assert settings.persistence.finalizer == "inferencefleet.dev/release-gpu-nodes"
    assert settings.scanning.disabled
