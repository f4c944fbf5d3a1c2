"""Unit tests of `inferencefleet operator`'s command line and kopf settings."""

from __future__ import annotations

import pytest
from fleet_operator.main import parse_args, settings_for


def test_defaults_and_repeated_namespaces() -> None:
    args = parse_args(["--namespace", "a", "--namespace", "b"])
    assert args.namespace == ["a", "b"]
    assert not args.all_namespaces
    assert (args.device_plugin_configmap, args.device_plugin_namespace) == (
        "device-plugin-config",
        "nvidia-device-plugin",
    )
    assert args.peering == "inferencefleet"
    assert not args.standalone
    assert args.liveness_port == 8080


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
