"""Every shape the compiler emits loads into a real kernel (nft syntax errors are bugs), reads
back as written, and the interpreter reads the kernel's listing to the same verdicts as the
commands it came from. The kernel runs in a network namespace of the worker's own
(`unshare -n`); SCTP rules load although this kernel has no SCTP sockets."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.policy.conftest import NftWorker
from tests.policy.strategies import NODES, clusters, connections
from weavepy.policy.compiler import CompileOptions, compile_policy
from weavepy.policy.nftsim import Packet, SimTable
from weavepy.policy.ruleset import full_replace, parse_listing

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(900)]


def _address(end: Any) -> Any:
    return getattr(end, "ip", None) or getattr(end, "address", None) or end


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.data(), st.booleans())
def test_every_compiled_table_loads_and_reads_back(nft_worker: NftWorker, data: Any,
                                                   audit: bool) -> None:
    state = data.draw(clusters())
    for node in NODES:
        compiled = compile_policy(state, node, CompileOptions(audit=audit))
        commands = full_replace(compiled.ruleset, "gen 7")
        answer = nft_worker.run(commands, compiled.ruleset.table)
        assert answer["ok"], answer["error"]
        listing = answer["listing"]
        assert parse_listing(listing).differences(compiled.ruleset, "gen 7") == []
        written, read = SimTable.from_commands(commands), SimTable.from_listing(listing)
        for _ in range(6):
            src, dst, port, protocol = data.draw(connections(state))
            packet = Packet(_address(src), _address(dst), protocol.lower(), port)
            assert written.run(packet).verdict == read.run(packet).verdict
