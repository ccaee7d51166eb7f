"""A policy applier living in a network namespace (a sandbox node), as the agent's would:
Kubernetes-format objects in, compile for the node, apply, answer.

Started by the tests with `ip netns exec NODE python -m tests.policy.applier_worker NODE`.
Protocol: one JSON request per line on stdin, one JSON answer per line on stdout:
`{"op": "apply", "objects": [...], "audit": false}` -> `{"kind", "reason"}`;
`{"op": "check"}` -> `{"problem"}`; `{"op": "verify"}` -> `{"differences"}`;
`{"op": "counters"}` -> `{"counters": {name: [packets, bytes]}}`; errors -> `{"error"}`."""

from __future__ import annotations

import json
import sys
from typing import Any

from weavepy.nft import Nft, NftError
from weavepy.policy.applier import PolicyApplier
from weavepy.policy.compiler import DEFAULT_TABLE, CompileOptions, compile_policy
from weavepy.policy.sources import PolicyStore


def answer(applier: PolicyApplier, node: str, request: dict[str, Any]) -> dict[str, Any]:
    op = request["op"]
    if op == "apply":
        store = PolicyStore()
        for kind in ("NetworkPolicy", "Pod", "Namespace"):
            store.replace(kind, [o for o in request["objects"] if o.get("kind") == kind])
        compiled = compile_policy(store.snapshot(), node,
                                  CompileOptions(audit=bool(request.get("audit"))))
        result = applier.apply(compiled.ruleset)
        return {"kind": result.kind, "reason": result.reason}
    if op == "check":
        return {"problem": applier.check()}
    if op == "verify":
        return {"differences": applier.verify()}
    if op == "counters":
        return {"counters": applier.counter_values(DEFAULT_TABLE)}
    return {"error": f"unknown op {op!r}"}


def main() -> None:
    node = sys.argv[1]
    applier = PolicyApplier(Nft())
    for line in sys.stdin:
        try:
            reply = answer(applier, node, json.loads(line))
        except NftError as exc:
            reply = {"error": str(exc)}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
