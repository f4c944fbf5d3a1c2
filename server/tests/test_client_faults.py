"""`inferencefleet bench` fails fast, with a clear message, when a target does not answer."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_target_that_does_not_answer_fails_fast() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [
        sys.executable,
        "-m",
        "inferencefleet.cli",
        "bench",
        f"127.0.0.1:{port}",
        "--model",
        "tiny",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    message = " ".join(done.stderr.split())
    assert f"bench: 127.0.0.1:{port} does not answer" in message
    assert "Connection refused" in message


def test_silent_target_fails_at_the_connect_timeout() -> None:
    with socket.socket() as silent:  # accepts connections, never speaks HTTP/2
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        argv = [
            sys.executable, "-m", "inferencefleet.cli", "bench", f"127.0.0.1:{port}",
            "--model", "tiny", "--connect-timeout", "1",
        ]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert f"127.0.0.1:{port} does not answer" in " ".join(done.stderr.split())
