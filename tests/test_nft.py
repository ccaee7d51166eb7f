"""weavepy.nft, the one door to nftables, in a sandbox node's own namespace: a batch is one
transaction (one bad command changes nothing), a missing table reads as None, errors are one
line, and the handle of each rule comes back in listings."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import require
from weavepy.nft import Command, Nft, NftError

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

TABLE = {"family": "ip", "name": "wptest"}


def _batch(*bad_tail: Command) -> list[Command]:
    return [
        {"add": {"table": TABLE}},
        {"add": {"chain": {"family": "ip", "table": "wptest", "name": "c"}}},
        {"add": {"rule": {"family": "ip", "table": "wptest", "chain": "c",
                          "expr": [{"counter": None}, {"accept": None}]}}},
        *bad_tail,
    ]


def _exercise() -> dict[str, Any]:
    nft = Nft()
    found: dict[str, Any] = {"missing": nft.list_table("ip", "wptest")}
    try:
        nft.run(_batch({"add": {"rule": {"family": "ip", "table": "wptest", "chain": "c",
                                         "expr": [{"jump": {"target": "nowhere"}}]}}}))
    except NftError as exc:
        found["error"] = str(exc)
    found["after_bad_batch"] = nft.list_table("ip", "wptest")
    found["ruleset_after_bad_batch"] = nft.ruleset_text()
    found["empty_run"] = nft.run([])
    nft.run(_batch())
    found["listed"] = nft.list_table("ip", "wptest")
    found["text"] = nft.ruleset_text()
    nft.run([{"delete": {"table": TABLE}}])
    found["gone"] = nft.list_table("ip", "wptest")
    return found


def test_a_batch_is_one_transaction_and_errors_are_one_line(sandbox_factory: Any) -> None:
    try:
        Nft()
    except NftError as exc:
        require(False, str(exc))
    node = sandbox_factory(nodes=1).nodes[0]
    found = node.call(_exercise)
    assert found["missing"] is None
    assert "error" in found, "a batch with a jump to a missing chain was accepted"
    assert "\n" not in found["error"] and found["error"].strip()
    assert found["after_bad_batch"] is None  # the good commands before it did not stay
    assert "wptest" not in found["ruleset_after_bad_batch"]
    assert found["empty_run"] == []
    kinds = [next(iter(o)) for o in found["listed"]]
    assert kinds == ["table", "chain", "rule"]
    rule = found["listed"][2]["rule"]
    assert isinstance(rule["handle"], int) and rule["handle"] > 0
    assert "table ip wptest" in found["text"] and "accept" in found["text"]
    assert found["gone"] is None
