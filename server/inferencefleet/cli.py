"""The `inferencefleet` command: one entry point that hands each subcommand to its owner."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Sequence

# subcommand -> (module, one-line help). Each module exposes main(argv: list[str]) -> int.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("fleet_server.serve", "run an inference worker (Open Inference Protocol over gRPC)"),
    "bench": ("fleet_client.bench", "benchmark one or more workers with a concurrency sweep"),
    "tune": (
        "fleet_tune.tune",
        "find workers per GPU and batching for the most frames/s in a p99 budget",
    ),
    "run": ("fleet_local.run", "run a fleet.yaml as supervised local processes"),
    "operator": ("fleet_operator.main", "run the Kubernetes operator for InferenceFleet"),
}


def usage() -> str:
    lines = ["usage: inferencefleet <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, (_, text) in SUBCOMMANDS.items()]
    lines += ["", "`inferencefleet <command> --help` describes each command."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"inferencefleet: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    # Before grpc is imported: every process these commands start is forked only to exec, so
    # gRPC's fork handlers have nothing to protect. With them on, a fork that raced gRPC's own
    # threads (`run` probing workers while it restarts one) sometimes aborted the new worker.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    module = importlib.import_module(SUBCOMMANDS[name][0])
    entry: Callable[[list[str]], int] = module.main
    return entry(rest)


if __name__ == "__main__":
    sys.exit(main())
