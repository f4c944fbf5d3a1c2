"""Command line of the test cluster: `e2e/cluster up|down|env|status`."""

from __future__ import annotations

import argparse
import shlex
import sys

from .cluster import ClusterError, State, default_state_dir, down, health, status_lines, up, usage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="e2e/cluster", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="build if needed, start (or reuse) the cluster")
    p_up.add_argument(
        "--port-base",
        type=int,
        default=None,
        help="first of 6 consecutive ports (default 16443, or $INFERENCEFLEET_CLUSTER_PORT_BASE)",
    )
    sub.add_parser("down", help="stop the processes `up` started and remove the state")
    sub.add_parser("env", help='shell lines for eval "$(e2e/cluster env)": PATH and KUBECONFIG')
    sub.add_parser("status", help="list the components; exit 1 if one is down")
    args = parser.parse_args(argv)
    state_dir = default_state_dir()
    try:
        if args.cmd == "up":
            state, started = up(state_dir, args.port_base)
            if not started:
                print(f"[cluster] reusing the healthy cluster in {state_dir}", file=sys.stderr)
            print(usage(state), file=sys.stderr)
        elif args.cmd == "down":
            if not down(state_dir):
                print(f"[cluster] nothing to stop ({state_dir} does not exist)", file=sys.stderr)
        elif args.cmd == "env":
            state = State.load(state_dir)
            if state is None:
                raise ClusterError("no cluster is up; run e2e/cluster up")
            env = state.env()
            print(f"export KUBECONFIG={shlex.quote(env['KUBECONFIG'])}")
            print(f'export PATH={shlex.quote(state.bin_dir)}:"$PATH"')
        else:
            state = State.load(state_dir)
            if state is None:
                print(f"no cluster is up ({state_dir})")
                return 1
            print("\n".join(status_lines(state)))
            problems = health(state)
            for p in problems:
                print(f"PROBLEM: {p}")
            return 1 if problems else 0
    except ClusterError as e:
        print(f"[cluster] ERROR: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
