"""`inferencefleet operator`: the command line, kopf's settings, and the run."""

from __future__ import annotations

import argparse
import logging
import random
import sys

import kopf
from fleet_spec.spec import GROUP

from fleet_operator.decide import Settings
from fleet_operator.kube import ConfigMapRef, KubeApi, connect
from fleet_operator.reconcile import CONFIG_VOLUME_DELAY, DEFAULT_WORKER_IMAGE, Reconciler

DEFAULT_PEERING = "inferencefleet"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="inferencefleet operator",
        description="Run the Kubernetes operator that turns InferenceFleets into GPU worker pods.",
    )
    scope = parser.add_mutually_exclusive_group(required=True)
    scope.add_argument(
        "--namespace",
        action="append",
        metavar="NS",
        help="watch InferenceFleets in this namespace (repeat for several)",
    )
    scope.add_argument(
        "--all-namespaces", action="store_true", help="watch InferenceFleets in every namespace"
    )
    parser.add_argument(
        "--device-plugin-configmap",
        default="device-plugin-config",
        metavar="NAME",
        help="the NVIDIA device plugin's ConfigMap of sharing configs (default: %(default)s)",
    )
    parser.add_argument(
        "--device-plugin-namespace",
        default="nvidia-device-plugin",
        metavar="NS",
        help="the namespace of that ConfigMap (default: %(default)s)",
    )
    parser.add_argument(
        "--config-volume-delay",
        type=float,
        default=CONFIG_VOLUME_DELAY,
        metavar="SECONDS",
        help="how long the kubelet may take to bring a change of that ConfigMap into the device "
        "plugin's volume; a node is pointed at a new profile key only after this (default: "
        "%(default)s, the kubelet's 1 min sync period plus its cache)",
    )
    parser.add_argument(
        "--worker-image",
        default=DEFAULT_WORKER_IMAGE,
        metavar="IMAGE",
        help="worker image for fleets without spec.image (default: %(default)s)",
    )
    parser.add_argument(
        "--worker-device",
        default="cuda",
        choices=["cuda", "cpu"],
        help="the device worker pods run the model on (default: %(default)s; cpu only where "
        "the cluster's GPUs are simulated, as on a test cluster)",
    )
    parser.add_argument(
        "--liveness-port",
        type=int,
        default=8080,
        metavar="PORT",
        help="serve GET /healthz on this port (0: off; default: %(default)s)",
    )
    parser.add_argument(
        "--liveness-host",
        default="0.0.0.0",
        metavar="ADDR",
        help="address of the liveness endpoint (default: %(default)s; tests use 127.0.0.1)",
    )
    peering = parser.add_mutually_exclusive_group()
    peering.add_argument(
        "--peering",
        default=DEFAULT_PEERING,
        metavar="NAME",
        help="kopf peering object shared by operator replicas: only the highest priority acts "
        "(default: %(default)s; needs crds/kopf-peering.yaml)",
    )
    peering.add_argument(
        "--standalone", action="store_true", help="no peering: this must be the only operator"
    )
    parser.add_argument(
        "--priority",
        type=int,
        default=None,
        help="peering priority (default: random, so that of two replicas exactly one acts)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="(default: %(default)s)",
    )
    return parser.parse_args(argv)


def settings_for(args: argparse.Namespace) -> kopf.OperatorSettings:
    """kopf settings, chosen against its known pitfalls."""
    settings = kopf.OperatorSettings()
    # Watches that silently stall: the server ends each watch, and the client gives up on
    # a connection that says nothing for longer than that.
    settings.watching.server_timeout = 120
    settings.watching.client_timeout = 150
    settings.watching.connect_timeout = 10
    settings.networking.request_timeout = 60
    settings.networking.connect_timeout = 10
    # Our own bookkeeping names, not kopf's defaults; nothing kopf-specific in status.
    settings.persistence.finalizer = f"{GROUP}/release-gpu-nodes"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    # The operator posts its own Events for decisions; kopf only for its warnings and errors.
    settings.posting.level = logging.WARNING
    # CRDs come from the chart before the operator starts: no cluster-wide CRD/namespace watch.
    settings.scanning.disabled = True
    settings.peering.stealth = True
    return settings


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    kube = KubeApi(connect())
    import fleet_operator.handlers  # noqa: F401  (registers the handlers)

    peering_name = None if args.standalone else args.peering
    memo = kopf.Memo(
        kube=kube,
        reconciler=Reconciler(
            kube,
            Settings(
                worker_image=args.worker_image,
                worker_device=args.worker_device,
                device_plugin_configmap=(
                    f"{args.device_plugin_namespace}/{args.device_plugin_configmap}"
                ),
            ),
            ConfigMapRef(args.device_plugin_configmap, args.device_plugin_namespace),
            config_volume_delay=args.config_volume_delay,
        ),
        watched=None if args.all_namespaces else tuple(args.namespace),
        peering_name=peering_name,
        peering_namespaces=[None] if args.all_namespaces else list(args.namespace),
    )
    liveness = None
    if args.liveness_port:
        liveness = f"http://{args.liveness_host}:{args.liveness_port}/healthz"
    kopf.run(
        settings=settings_for(args),
        standalone=args.standalone,
        peering_name=peering_name,
        priority=args.priority if args.priority is not None else random.randint(1, 1_000_000),
        clusterwide=args.all_namespaces,
        namespaces=[] if args.all_namespaces else list(args.namespace),
        liveness_endpoint=liveness,
        memo=memo,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
