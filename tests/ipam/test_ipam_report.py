"""The status report: the document the agent serves for a real core matches the report schema
and says what the core knows."""

from __future__ import annotations

import ipaddress
import json
import random
from pathlib import Path
from typing import Any

import jsonschema

from weavepy.ipam.allocator import PodAllocator
from weavepy.ipam.core import IpamCore
from weavepy.ipam.report import status_document
from weavepy.ipam.status import IpamState
from weavepy.statusview import ipam_advice

REPO = Path(__file__).resolve().parents[2]
IPAM_SCHEMA = json.loads((REPO / "docs" / "report.schema.json").read_text())["properties"]["ipam"]


def served(core: IpamCore, allocator: PodAllocator, now: float) -> dict[str, Any]:
    """What the agent puts under `ipam` (it adds `fix`, as `Agent.status` does)."""
    doc = status_document(core.status(now), allocator.usage(), {"decode_bad_msgpack": 2})
    doc["fix"] = ipam_advice(doc, core.name)
    return doc


def test_a_waiting_node_renders_a_valid_document() -> None:
    core = IpamCore("n2", "198.19.0.0/16", 24, rng=random.Random(3))
    doc = served(core, PodAllocator(core), 0.0)
    jsonschema.validate(doc, IPAM_SCHEMA)
    assert doc["state"] == IpamState.WAITING_FOR_CLUSTER.value
    assert doc["detail"] == "waiting to hear from a cluster member (launched with peers)"
    assert doc["cluster_id"] is None and doc["total_blocks"] == doc["free_blocks"] == 256
    assert doc["fix"]


def test_a_ready_node_renders_its_blocks_members_and_pods() -> None:
    core = IpamCore("n1", "198.19.0.0/16", 24, rng=random.Random(3), bootstrap="found")
    core.handle_timer(0.0)
    allocator = PodAllocator(core)
    allocator.add("c1", "eth0", 1.0)  # asks for a block; a sole voter decides at once
    allocator.add("c1", "eth0", 1.0)
    allocator.add("c2", "eth0", 1.0)
    doc = served(core, allocator, 2.0)
    jsonschema.validate(doc, IPAM_SCHEMA)
    assert doc["state"] == "ready" and doc["detail"] == "ok" and doc["fix"] is None
    assert doc["cluster_id"] == core.cluster_id and doc["voters"] == ["n1"]
    assert doc["owned_blocks"] == doc["held_blocks"] == ["198.19.0.0/24"]
    assert doc["free_blocks"] == 255 and doc["quorum"] == 1 and doc["voters_reachable"] == 1
    assert 0 < doc["lease_remaining_s"] <= 3600
    assert doc["members"] == [{"name": "n1", "generation": 1, "voter": True, "alive": True,
                               "blocks": ["198.19.0.0/24"], "reclaim_in_s": None,
                               "node_deleted": False}]
    block = ipaddress.ip_network("198.19.0.0/24")
    assert doc["pods"] == {str(block): {"used": 2, "capacity": allocator.usage()[block][1]}}
    assert doc["dropped"] == {"decode_bad_msgpack": 2}
