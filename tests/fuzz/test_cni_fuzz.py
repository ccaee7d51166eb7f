"""Fuzzing the CNI input paths: environment and stdin into `parse_request`, and whole client
requests into the agent's `answer` (the server's decode-and-dispatch step).

The contract: any input yields a `CniRequest` or a `CniError` (a CNI error object with a code),
never another exception. The backend behind `answer` is a stand-in that refuses every command
(the kernel work is not what is fuzzed here; tests/cni covers it with real namespaces), so any
non-CNI exception would come from the decoding path.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weavepy.cni.protocol import CniError, CniRequest, ErrorCode, parse_request
from weavepy.cni.server import answer

COMMANDS = ["ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION", "add", "", "NOPE"]
ENV_KEYS = ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH"]
VALID_CONF = {"cniVersion": "1.0.0", "name": "weavepy", "type": "weavepy-cni"}

env_values = st.one_of(st.text(max_size=40), st.sampled_from(
    ["eth0", "/run/netns/x", "abc", "IgnoreUnknown=1;K8S_POD_NAME=a", "a=b;c", "x" * 20,
     "", "/", "../..", "eth0\x00", "1.0.0"]))
envs = st.dictionaries(st.sampled_from(ENV_KEYS), env_values, max_size=6).flatmap(
    lambda env: st.sampled_from(COMMANDS).map(lambda c: {**env, "CNI_COMMAND": c}))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20)


@st.composite
def configs(draw: st.DrawFn) -> bytes:
    """A valid network config with random fields changed, or random JSON, or random bytes."""
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return draw(st.binary(max_size=200))
    if kind == 1:
        return json.dumps(draw(json_values)).encode()
    conf: dict[str, Any] = dict(VALID_CONF)
    for key in draw(st.lists(st.sampled_from(
            ["cniVersion", "name", "type", "socketPath", "dns", "prevResult", "runtimeConfig",
             "cni.dev/valid-attachments", "args"]), max_size=4)):
        conf[key] = draw(json_values)
    return json.dumps(conf).encode()


def _check(env: dict[str, str], stdin: bytes) -> None:
    try:
        request = parse_request(env, stdin)
    except CniError as exc:
        assert isinstance(exc.code, int) and exc.to_json("1.0.0")["msg"]
    else:
        assert isinstance(request, CniRequest)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(envs, configs())
def test_parse_request_raises_only_cni_errors(env: dict[str, str], stdin: bytes) -> None:
    _check(env, stdin)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=20), st.text(max_size=40), max_size=8), st.binary(
    max_size=300))
def test_arbitrary_environments(env: dict[str, str], stdin: bytes) -> None:
    _check(env, stdin)


class RefusingBackend:
    """Stand-in backend: every command is refused with a CNI error (see the module doc)."""

    def _refuse(self, request: CniRequest) -> Any:
        raise CniError(ErrorCode.TRY_AGAIN_LATER, "refused by the fuzz backend")

    add = delete = check = status = gc = _refuse

    def close(self) -> None:
        pass


wire_requests = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.tuples(st.sampled_from([1, 2, 0, "1", None]), envs, configs()).map(
        lambda t: json.dumps({"wire": t[0], "env": t[1],
                              "stdin": t[2].decode("utf-8", "replace")}).encode()),
)


@settings(max_examples=300, deadline=None)
@given(wire_requests)
def test_the_server_answers_every_request_with_a_cni_reply(data: bytes) -> None:
    reply = answer(RefusingBackend(), data)
    if reply.code:
        doc = json.loads(reply.stdout)
        assert doc["code"] == reply.code and doc["msg"]
        assert reply.code != ErrorCode.INTERNAL, doc  # an internal error means a decoder bug
    wire = json.loads(reply.to_wire())
    assert wire["code"] == reply.code
