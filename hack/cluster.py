"""Start and stop the local cluster: the plane (``controlplane.py``) and the node on it.

    python hack/cluster.py up [--no-node] | down | binaries | load-image IMAGE

Users: ``make cluster-up`` / ``make cluster-down`` / ``make binaries``, ``hack/run.sh`` and
``hack/run-in-cluster.sh``. It sits above both modules: the plane knows nothing of the node,
the node builds on the plane, and this brings the two together.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from controlplane import (
    REPO_DIR,
    ControlPlane,
    ControlPlaneError,
    ensure_binaries,
    stop_from_state,
)
from node import PODMAN, Node, load_podman_image, node_record, running_node, stop_node
from processes import pid_alive, stopped_on_failure

STATE_POINTER = REPO_DIR / ".state" / "cluster.json"


def _running_plane() -> ControlPlane | None:
    """The plane that an earlier `up` of this clone started, if all of it still runs."""
    if not STATE_POINTER.exists():
        return None
    root = Path(json.loads(STATE_POINTER.read_text())["root"])
    try:
        state = json.loads((root / "state.json").read_text())
    except (FileNotFoundError, ValueError):
        state = None
    if state is not None and all(pid_alive(p) for p in state["pids"].values()):
        return ControlPlane(ensure_binaries(), root=root, server=state["server"])
    _stop_everything(root)
    return None


def _stop_everything(root: Path) -> list[str]:
    """The node on the plane at ``root`` (if any), then the plane; returns what is left."""
    left: list[str] = []
    record = node_record()
    if record is not None and str(record["root"]).startswith(str(root)):
        left += stop_node(record)
    left += [f"process {pid}" for pid in stop_from_state(root)]
    return left


def _cmd_up(args: argparse.Namespace) -> int:
    plane = _running_plane()
    fresh = plane is None
    if plane is None:
        plane = ControlPlane(ensure_binaries(quiet=False)).start()
    record = running_node()
    ours = record is not None and str(record["root"]).startswith(str(plane.root))
    if args.node and not ours:
        # Leave nothing behind: no fresh plane without the node that was asked for.
        with stopped_on_failure(plane.stop if fresh else lambda: None):
            node = Node(plane, plane.binaries).start()
        print(
            f"node {node.name} is Ready (kubelet, containerd, kube-scheduler, kube-proxy, CoreDNS)",
            file=sys.stderr,
        )
    if fresh:
        STATE_POINTER.parent.mkdir(parents=True, exist_ok=True)
        STATE_POINTER.write_text(
            json.dumps({"root": str(plane.root), "kubeconfig": str(plane.kubeconfig)})
        )
    print(f"KUBECONFIG={plane.kubeconfig}")
    return 0


def _cmd_down(_: argparse.Namespace) -> int:
    if not STATE_POINTER.exists():
        print("no local control plane recorded in .state/cluster.json; nothing to stop")
        return 0
    root = Path(json.loads(STATE_POINTER.read_text())["root"])
    left = _stop_everything(root)
    if left:
        print(f"error: still there after stop: {', '.join(left)}", file=sys.stderr)
        return 1
    STATE_POINTER.unlink()
    print(f"stopped the local cluster and removed {root}")
    return 0


def _cmd_load_image(args: argparse.Namespace) -> int:
    record = running_node()
    if record is None:
        raise ControlPlaneError(
            "no local node runs on this machine: start one with make cluster-up"
        )
    copied = load_podman_image(Path(str(record["socket"])), args.image, PODMAN)
    print(f"{args.image} {'copied into' if copied else 'already on'} the node", file=sys.stderr)
    return 0


def _cmd_binaries(_: argparse.Namespace) -> int:
    bins = ensure_binaries(quiet=False)
    print(
        f"KUBE_BIN={bins.kube}\nETCD_BIN={bins.etcd}\nHELM_BIN={bins.helm}\n"
        f"COREDNS_BIN={bins.coredns}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the plane (or reuse a running one); prints KUBECONFIG=")
    up.add_argument(
        "--node",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also a real node: containerd, kubelet, kube-scheduler, kube-proxy, CoreDNS "
        "(root Debian; hack/node.py)",
    )
    sub.add_parser("down", help="stop the node and plane that `up` started; remove their folders")
    sub.add_parser("binaries", help="build or reuse the binaries and print their folders")
    load = sub.add_parser("load-image", help="copy an image from podman into the node")
    load.add_argument("image", help="e.g. localhost/juturna-operator:dev")
    args = parser.parse_args(argv)
    handler = {
        "up": _cmd_up,
        "down": _cmd_down,
        "binaries": _cmd_binaries,
        "load-image": _cmd_load_image,
    }[args.command]
    try:
        return handler(args)
    except ControlPlaneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
