"""Fuzzing the agent's local HTTP API: hypothesis-made requests against the real Starlette app.

The contract (weavepy/api.py, docs/api.md): whatever arrives - any method, path, query string,
headers, API token (right, wrong, missing, malformed), body (huge, malformed JSON, JSON of the
wrong shape, forms, binary) - the answer is a well-formed HTTP response; every 4xx/5xx carries
a JSON body `{"error": "<sentence>"}`; no request produces a 500 (a traceback); and no
request without the right token changes the node.

What is real: the app (`weavepy.api.build_app`) over the answers
(`weavepy.control.NodeControl`) of a real `weavepy.agent.Agent`, built from a real
configuration (`load_config`), a generated identity and state/run directories under tmp_path,
driven through Starlette's TestClient on the trio backend (the agent's handlers use trio). What
stands in, and why: the agent is never `run()` - running it needs root, a network namespace and
the kernel (VXLAN device, bridge, routes) - so its gossip service is absent and its IPAM has
not joined; and its `Underlay` (normally detected from the host's routes by `prepare`) is a
fixed description of a 198.18.0.11/24 interface the test names, not read from any kernel.
Requests that would stop the agent only set its stop event.
"""

from __future__ import annotations

import base64
import json
import string
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from gossip.config import GossipConfig
from weavepy.agent import Agent, Prepared
from weavepy.api import CONTROL_ERROR_STATUS, build_app
from weavepy.apitoken import load_or_create
from weavepy.config import load_config
from weavepy.control import ControlError, Unavailable
from weavepy.hostnet import Underlay
from weavepy.identity import Identity

NODE = "fuzz-node"
ROUTES = ["/status", "/status/gossip", "/status/peers", "/status/nope", "/status/name",
          "/report", "/healthz", "/readyz", "/connect", "/forget", "/peer/other",
          f"/peer/{NODE}", "/stop", "/", "/metrics", "/peer/", "/status/", "/keyring/reload"]
METHODS = ["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS"]
CONTENT_TYPES = ["application/json", "application/json; charset=utf-8", "text/plain",
                 "application/octet-stream", "application/x-json", "", "json",
                 "text/json; charset=latin-1"]
FORM_TYPES = ["application/x-www-form-urlencoded", "multipart/form-data",
              "multipart/form-data; boundary=xyz"]
# Non-JSON bodies to /connect and /forget are urlencoded forms (Weave's `peer=...`); any other
# body type gets a JSON 415.
CONTENT_TYPES += FORM_TYPES
ENDPOINTS = [("GET", "/status"), ("GET", "/report"), ("GET", "/healthz"), ("GET", "/readyz"),
             ("POST", "/connect"), ("POST", "/forget"), ("DELETE", "/peer/other"),
             ("POST", "/stop"), ("GET", "/status/peers"), ("POST", "/keyring/reload")]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=25)
peer_like = st.one_of(
    st.sampled_from(["198.18.0.12", "198.18.0.12:6783", "[::1]:6783", "host.example:1",
                     "198.18.0.12:99999", ":", "", "a:b:c", "-", "198.18.0.300",
                     "x" * 300, "198.18.0.12:-1", "\x00", "localhost:0"]),
    st.text(max_size=40))


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 6))
    if kind == 0:
        return b""
    if kind == 1:
        return draw(st.binary(max_size=300))
    if kind == 2:  # JSON of any shape
        return json.dumps(draw(json_values)).encode()
    if kind == 3:  # the expected shape with odd values
        doc: dict[str, Any] = {"peers": draw(st.one_of(st.lists(peer_like, max_size=5),
                                                       json_values))}
        if draw(st.booleans()):
            doc["replace"] = draw(json_values)
        return json.dumps(doc).encode()
    if kind == 4:  # malformed JSON: a valid document cut short or with junk spliced in
        text = json.dumps({"peers": draw(st.lists(peer_like, max_size=3)), "replace": True})
        cut = draw(st.integers(0, len(text)))
        return (text[:cut] + draw(st.text(max_size=5))).encode("utf-8", "surrogatepass")
    if kind == 5:  # huge: over the 64 KiB limit, valid or not
        size = draw(st.sampled_from([65537, 70000, 300_000]))
        if draw(st.booleans()):
            return json.dumps({"peers": ["198.18.0.12"] * (size // 14)}).encode()
        return b"{" * size
    return draw(st.sampled_from([b"null", b"[]", b"{}", b'{"peers": null}', b'"peers"',
                                 b"1e999999", b'{"peers": ["a"], "replace": "no"}',
                                 b"\xff\xfe{}", b'{"peers": [' * 1000, b"NaN", b"-Infinity"]))


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    if draw(st.booleans()):  # half the requests go to a real endpoint with its own method
        method, path = draw(st.sampled_from(ENDPOINTS))
    else:
        method, path = draw(st.sampled_from(METHODS)), draw(request_paths())
    query = draw(st.lists(st.tuples(
        st.sampled_from(["peer", "replace", "force", "x", ""]) | st.text(max_size=8),
        st.one_of(peer_like, st.sampled_from(["true", "1", "yes", "no", ""]))), max_size=4))
    headers = {}
    content_type = draw(st.sampled_from(CONTENT_TYPES) | st.text(
        alphabet=string.printable.strip("\r\n\x0b\x0c"), max_size=30))
    if content_type:
        headers["content-type"] = content_type
    if draw(st.booleans()):
        headers["x-" + draw(st.text(alphabet=string.ascii_lowercase, min_size=1,
                                    max_size=10))] = draw(
            st.text(alphabet=string.printable.strip("\r\n\x0b\x0c"), max_size=50))
    # Most requests carry the right token (filled in by the test, which knows it), so the
    # handlers behind the check are fuzzed too; the others a wrong, a junk or no header.
    auth = draw(st.sampled_from(["right", "right", "right", "none", "wrong", "junk"]))
    if auth == "wrong":
        headers["authorization"] = "Bearer " + "x" * 43
    elif auth == "junk":
        headers["authorization"] = draw(st.text(
            alphabet=string.printable.strip("\r\n\x0b\x0c"), max_size=60))
    return {"method": method, "path": path, "query": query, "headers": headers,
            "body": draw(bodies()), "auth": auth}


def request_paths() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(ROUTES),
        st.builds(lambda p, s: p + quote(s, safe=""), st.sampled_from(["/status/", "/peer/"]),
                  st.text(min_size=1, max_size=40)),
        st.text(alphabet=string.ascii_letters + string.digits + "/%._-~", max_size=60)
        .map(lambda s: "/" + s))


def make_agent(tmp_path: Path) -> Agent:
    """A real Agent that is never run (see the module docstring for what stands in); its API
    token is in its state directory, as `prepare` leaves it."""
    state, run = tmp_path / "state", tmp_path / "run"
    state.mkdir()
    run.mkdir()
    config = load_config({"name": NODE, "ipalloc_range": "198.19.0.0/16",
                          "state_dir": str(state), "run_dir": str(run)}, env={})
    identity = Identity.generate(NODE)
    identity.save(state)
    underlay = Underlay(iface="eth0", ifindex=2, local_ip=IPv4Address("198.18.0.11"), mtu=1500,
                        how="stand-in for the fuzz test")
    prepared = Prepared(config, identity, None, underlay, ("198.18.0.11", config.gossip_port),
                        1450, GossipConfig.lan(), load_or_create(state), "on")
    return Agent(prepared)


def authorized_client(agent: Agent) -> TestClient:
    """A client of the agent's app that sends its API token with every request."""
    token = agent.prepared.api_token
    return TestClient(build_app(agent.control, token), backend="trio",
                      raise_server_exceptions=False, base_url="http://127.0.0.1:6784",
                      headers={"Authorization": f"Bearer {token}"})


def check_response(request: dict[str, Any], response: Any) -> None:
    what = f"{request['method']} {request['path']} -> {response.status_code}"
    assert 200 <= response.status_code < 600, what
    assert response.status_code != 500, f"{what}: {response.text[:2000]}"
    if request["method"] == "HEAD":
        return  # no body by definition
    if request["path"] == "/readyz" and response.status_code == 503:
        doc = response.json()  # documented: not ready is 503 with the reasons, not an error
        assert doc["ready"] is False and doc["reasons"], what
    elif response.status_code >= 400:
        assert response.headers.get("content-type", "").startswith("application/json"), (
            f"{what}: non-JSON error body {response.text[:300]!r}")
        doc = response.json()
        assert isinstance(doc, dict) and isinstance(doc.get("error"), str) and doc["error"], (
            f"{what}: {doc!r}")
        assert "Traceback" not in doc["error"], what
    elif response.status_code != 204:
        response.json()  # a success is JSON too


@pytest.mark.timeout(240)
def test_any_request_gets_a_json_answer_and_never_a_500(tmp_path: Path) -> None:
    agent = make_agent(tmp_path)
    token = agent.prepared.api_token
    app = build_app(agent.control, token)
    with TestClient(app, backend="trio", raise_server_exceptions=False,
                    base_url="http://127.0.0.1:6784") as client:

        @settings(max_examples=400, deadline=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(request=requests())
        def one(request: dict[str, Any]) -> None:
            headers = dict(request["headers"])
            if request["auth"] == "right":
                headers["authorization"] = f"Bearer {token}"
            response = client.request(request["method"], request["path"],
                                      params=request["query"], headers=headers,
                                      content=request["body"])
            check_response(request, response)
            if request["auth"] != "right" and response.status_code < 400:
                assert request["method"] in ("GET", "HEAD"), (
                    f"{request['method']} {request['path']} without the token answered "
                    f"{response.status_code}")

        one()


@pytest.mark.timeout(60)
def test_known_requests_answer_as_documented(tmp_path: Path) -> None:
    """Fixed points next to the fuzzing: the documented codes for the classic mistakes."""
    agent = make_agent(tmp_path)
    with authorized_client(agent) as client:
        cases: list[tuple[str, str, dict[str, str], bytes, int]] = [
            ("GET", "/healthz", {}, b"", 200),
            ("GET", "/status", {}, b"", 200),
            ("GET", "/readyz", {}, b"", 503),  # never run: no block, no CNI socket
            ("GET", "/status/nope", {}, b"", 404),
            ("GET", "/nowhere", {}, b"", 404),
            ("PUT", "/status", {}, b"", 405),
            ("POST", "/connect", {"content-type": "application/json"}, b"{", 400),
            ("POST", "/connect", {"content-type": "application/json"}, b"[]", 400),
            ("POST", "/connect", {"content-type": "application/json"},
             b'{"peers": [1]}', 400),
            ("POST", "/connect", {"content-type": "application/json"},
             b'{"peers": []}', 400),
            ("POST", "/connect", {"content-type": "application/json"},
             b"{" * 70000, 413),
            ("POST", "/connect", {"content-type": "application/json"},
             b'{"peers": ["198.18.0.300:x"]}', 400),
            ("POST", "/connect", {"content-type": "application/json"},
             b'{"peers": ["198.18.0.12"]}', 200),
            ("POST", "/forget", {"content-type": "application/json"},
             b'{"peers": ["198.18.0.12"]}', 200),
            ("DELETE", f"/peer/{NODE}", {}, b"", 409),
        ]
        for method, path, headers, body, expected in cases:
            response = client.request(method, path, headers=headers, content=body)
            assert response.status_code == expected, (method, path, body[:40], response.text)
            check_response({"method": method, "path": path}, response)


@pytest.mark.timeout(60)
def test_refusals_of_the_node_answer_with_their_documented_codes(tmp_path: Path) -> None:
    """The node refuses in its own terms (weavepy.control's errors); the API gives each kind
    its code (docs/api.md), and every kind has one."""
    assert set(CONTROL_ERROR_STATUS) == set(ControlError.__subclasses__())
    assert CONTROL_ERROR_STATUS[Unavailable] == 503
    agent = make_agent(tmp_path)
    key = base64.b64encode(bytes(32)).decode()
    host = {"name": "h1", "public_key": key, "allowed_ips": ["198.18.5.0/24"]}
    with authorized_client(agent) as client:
        cases: list[tuple[str, str, dict[str, Any] | None, int]] = [
            ("GET", "/wg-config/h1", None, 404),  # not declared yet
            ("DELETE", "/external-peers/h1", None, 404),
            ("POST", "/external-peers", {**host, "name": NODE}, 409),  # a member's name
            ("POST", "/external-peers", {**host, "public_key": "x"}, 400),
            ("POST", "/external-peers", {**host, "allowed_ips": ["198.19.5.0/24"]}, 400),
            ("POST", "/connect", {"peers": ["198.18.0.12:0"]}, 400),
            ("POST", "/forget", {"peers": ["no host here"]}, 400),
            ("DELETE", "/peer/ghost", None, 409),  # IPAM refuses: not a member yet
            ("POST", "/external-peers", host, 200),
            ("GET", "/wg-config/h1", None, 200),
            ("DELETE", "/external-peers/h1", None, 200),
        ]
        for method, path, body, expected in cases:
            response = client.request(method, path, json=body)
            assert response.status_code == expected, (method, path, body, response.text)
            check_response({"method": method, "path": path}, response)


@pytest.mark.timeout(60)
def test_form_bodies_are_parsed(tmp_path: Path) -> None:
    """Weave's form style (`peer=...`) and broken multipart bodies: 200 or a JSON 4xx."""
    agent = make_agent(tmp_path)
    with authorized_client(agent) as client:
        good = client.post("/connect", content=b"peer=198.18.0.12",
                           headers={"content-type": FORM_TYPES[0]})
        assert good.status_code == 200, good.text
        for content_type in FORM_TYPES[1:]:
            response = client.post("/connect", content=b"--xyz\r\nbroken",
                                   headers={"content-type": content_type})
            check_response({"method": "POST", "path": "/connect"}, response)
