"""A stand-in for the Kubernetes API server of a sandbox cluster, run as its own process.

No API server can run here. For the DaemonSet test, this serves the replaying API of
tests/deploy/kube_replay.py over HTTPS on an address inside the sandbox, with a node list
built for the sandbox's nodes (each one's InternalIP is its underlay address), so the agents'
`--kube-peers` (the manifest's default) find each other as they would in a cluster. A watch is
held open with no events (a quiet cluster); the NetworkUnavailable patch is answered.

    python -m tests.deploy.kube_standin --bind 198.18.0.2:6443 --cert C --key K \\
        --token-file T --node n1=198.18.0.11 --node n2=198.18.0.12 ...
"""

from __future__ import annotations

import argparse
import copy
import functools
from pathlib import Path
from typing import Any

import trio

from tests.deploy.kube_replay import ReplayApi, recorded, serve_replay


def node_list(nodes: list[tuple[str, str]]) -> dict[str, Any]:
    """A NodeList of `nodes` ((name, InternalIP) pairs), in the recorded list's shape."""
    template = recorded("nodes-list-1.json")
    node = template["items"][0]
    items = []
    for number, (name, address) in enumerate(nodes, 1):
        item = copy.deepcopy(node)
        item["metadata"]["name"] = name
        item["metadata"]["uid"] = f"6c1f0d2e-0000-4000-8000-{number:012d}"
        item["metadata"]["labels"]["kubernetes.io/hostname"] = name
        item["spec"]["providerID"] = f"sandbox://{name}"
        item["status"]["addresses"] = [{"type": "InternalIP", "address": address},
                                       {"type": "Hostname", "address": name}]
        items.append(item)
    return {**template, "items": items}


async def serve(args: argparse.Namespace) -> None:
    api = ReplayApi(args.token_file.read_text().strip())
    pairs = [node.split("=", 1) for node in args.node]
    api.lists.append(node_list([(name, address) for name, address in pairs]))
    await serve_replay(api, args.cert, args.key, bind=args.bind)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", required=True, help="IP:PORT to serve HTTPS on")
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--token-file", type=Path, required=True)
    parser.add_argument("--node", action="append", default=[], help="NAME=INTERNAL_IP")
    args = parser.parse_args()
    trio.run(functools.partial(serve, args))


if __name__ == "__main__":
    main()
