"""Request parsing and validation (sans-IO): environment, CNI_ARGS, runtimeConfig, versions,
and the spec's error codes for each kind of bad input."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from weavepy.cni.protocol import (
    Attachment,
    CniError,
    Command,
    ErrorCode,
    PodIdentity,
    decode_wire_request,
    parse_cni_args,
    parse_request,
    parse_runtime_config,
    pod_identity,
    version_reply,
)

CONF = {"cniVersion": "1.0.0", "name": "weavepy", "type": "weavepy-cni"}
ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c0ffee", "CNI_NETNS": "/run/netns/pod",
       "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin:/usr/lib/cni"}


def _parse(env: dict[str, str] | None = None, conf: object = None, **overrides: str):
    full = dict(ENV if env is None else env)
    full.update(overrides)
    body = conf if isinstance(conf, bytes) else json.dumps(CONF if conf is None else conf).encode()
    return parse_request(full, body)


def _code(**kwargs: object) -> ErrorCode:
    with pytest.raises(CniError) as info:
        _parse(**kwargs)  # type: ignore[arg-type]
    return info.value.code


def test_add_request_is_parsed() -> None:
    req = _parse(CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;"
                          "K8S_POD_INFRA_CONTAINER_ID=c0ffee;K8S_POD_UID=u-1")
    assert req.command is Command.ADD
    assert req.attachment == Attachment("c0ffee", "eth0")
    assert req.netns == "/run/netns/pod"
    assert req.path == ("/opt/cni/bin", "/usr/lib/cni")
    assert req.pod == PodIdentity("default", "web-0", "c0ffee", "u-1")
    assert req.pod.label() == "default/web-0"
    assert req.config.cni_version == "1.0.0" and req.config.name == "weavepy"
    assert req.config.socket_path == "/run/weavepy/cni.sock"


@given(st.permutations(["IgnoreUnknown=1", "K8S_POD_NAMESPACE=ns", "K8S_POD_NAME=p",
                        "K8S_POD_INFRA_CONTAINER_ID=abc", "K8S_POD_UID=42", "", "Other=x"]))
def test_cni_args_in_any_order(pairs: list[str]) -> None:
    args = parse_cni_args(";".join(pairs))
    assert pod_identity(args) == PodIdentity("ns", "p", "abc", "42")
    assert args["Other"] == "x" and args["IgnoreUnknown"] == "1"


def test_cni_args_without_pod_keys_name_no_pod() -> None:
    assert pod_identity(parse_cni_args("IgnoreUnknown=1")) is None
    assert parse_cni_args("") == {}
    assert parse_cni_args("A=b=c") == {"A": "b=c"}


def test_runtime_config_keys_match_case_insensitively() -> None:
    # containerd 1.6 sends Go field names (seen with Debian's containerd in test_containerd)
    containerd = parse_runtime_config({
        "portMappings": [{"HostPort": 18095, "ContainerPort": 80, "Protocol": "TCP",
                          "HostIP": ""}],
        "Bandwidth": {"IngressRate": 10_000_000, "IngressBurst": 4294967295,
                      "EgressRate": 20_000_000, "EgressBurst": 4294967295},
    })
    documented = parse_runtime_config({
        "portMappings": [{"hostPort": 18095, "containerPort": 80, "protocol": "tcp"}],
        "bandwidth": {"ingressRate": 10_000_000, "ingressBurst": 4294967295,
                      "egressRate": 20_000_000, "egressBurst": 4294967295},
    })
    assert containerd.port_mappings == documented.port_mappings
    assert containerd.port_mappings[0].host_port == 18095
    assert containerd.port_mappings[0].protocol == "tcp"
    assert containerd.bandwidth == documented.bandwidth
    assert containerd.bandwidth is not None and containerd.bandwidth.egress_rate == 20_000_000


def test_runtime_config_reaches_the_request() -> None:
    conf = dict(CONF, runtimeConfig={"MAC": "0a:58:00:00:00:01", "IPs": ["198.19.1.9/24"]})
    req = _parse(conf=conf)
    assert req.config.runtime_config.mac == "0a:58:00:00:00:01"
    assert [str(i) for i in req.config.runtime_config.ips] == ["198.19.1.9/24"]


def test_del_accepts_an_empty_netns() -> None:
    req = _parse(CNI_COMMAND="DEL", CNI_NETNS="")
    assert req.command is Command.DEL and req.netns == ""


def test_gc_valid_attachments() -> None:
    env = {"CNI_COMMAND": "GC", "CNI_PATH": "/usr/lib/cni"}
    conf = dict(CONF, cniVersion="1.1.0", **{"cni.dev/valid-attachments": [
        {"containerID": "a", "ifname": "eth0"}, {"containerID": "b", "ifname": "net1"}]})
    req = _parse(env=env, conf=conf)
    assert req.config.valid_attachments == {Attachment("a", "eth0"), Attachment("b", "net1")}
    # libcni omits an empty list (Go omitempty): nothing is valid
    assert _parse(env=env, conf=dict(CONF, cniVersion="1.1.0")).config.valid_attachments == set()


def test_prev_result_is_parsed_for_chaining() -> None:
    prev = {"cniVersion": "0.4.0", "interfaces": [{"name": "eth0", "sandbox": "/run/netns/x"}],
            "ips": [{"version": "4", "interface": 0, "address": "198.19.1.5/24"}]}
    req = _parse(conf=dict(CONF, cniVersion="0.4.0", prevResult=prev))
    assert req.config.prev_result is not None
    assert [str(ip.address) for ip in req.config.prev_result.ips] == ["198.19.1.5/24"]


@pytest.mark.parametrize(("kwargs", "code"), [
    ({"CNI_COMMAND": ""}, ErrorCode.INVALID_ENVIRONMENT),
    ({"CNI_COMMAND": "FROB"}, ErrorCode.INVALID_ENVIRONMENT),
    ({"CNI_CONTAINERID": ""}, ErrorCode.INVALID_ENVIRONMENT),
    ({"CNI_NETNS": ""}, ErrorCode.INVALID_ENVIRONMENT),
    ({"CNI_NETNS": "relative/path"}, ErrorCode.INVALID_ENVIRONMENT),
    ({"CNI_IFNAME": ""}, ErrorCode.INVALID_ENVIRONMENT),
    ({"CNI_IFNAME": "a-name-longer-than-15"}, ErrorCode.INVALID_ENVIRONMENT),
    ({"CNI_IFNAME": "eth/0"}, ErrorCode.INVALID_ENVIRONMENT),
    ({"CNI_CONTAINERID": "-leading-dash"}, ErrorCode.INVALID_ENVIRONMENT),
    ({"CNI_ARGS": "K8S_POD_NAME"}, ErrorCode.INVALID_ENVIRONMENT),
    ({"conf": b"{not json"}, ErrorCode.DECODE_FAILURE),
    ({"conf": b"\xff\xfe"}, ErrorCode.DECODE_FAILURE),
    ({"conf": [1, 2]}, ErrorCode.DECODE_FAILURE),
    ({"conf": {"name": "weavepy"}}, ErrorCode.INCOMPATIBLE_VERSION),
    ({"conf": dict(CONF, cniVersion="9.9.9")}, ErrorCode.INCOMPATIBLE_VERSION),
    ({"conf": dict(CONF, cniVersion="0.2.0")}, ErrorCode.INCOMPATIBLE_VERSION),
    ({"conf": dict(CONF, cniVersion=1)}, ErrorCode.INVALID_NETWORK_CONFIG),
    ({"conf": dict(CONF, name="bad name!")}, ErrorCode.INVALID_NETWORK_CONFIG),
    ({"conf": dict(CONF, socketPath="relative.sock")}, ErrorCode.INVALID_NETWORK_CONFIG),
    ({"conf": dict(CONF, runtimeConfig={"portMappings": [{"hostPort": -1}]})},
     ErrorCode.INVALID_NETWORK_CONFIG),
    ({"conf": dict(CONF, prevResult={"ips": "nope"})}, ErrorCode.DECODE_FAILURE),
    ({"CNI_COMMAND": "CHECK", "conf": dict(CONF, cniVersion="0.3.1")},
     ErrorCode.INCOMPATIBLE_VERSION),
    ({"CNI_COMMAND": "STATUS", "conf": dict(CONF, cniVersion="1.0.0")},
     ErrorCode.INCOMPATIBLE_VERSION),
    ({"CNI_COMMAND": "GC", "conf": dict(CONF, cniVersion="1.1.0",
                                        **{"cni.dev/valid-attachments": [{"ifname": "x"}]})},
     ErrorCode.INVALID_NETWORK_CONFIG),
])
def test_bad_input_gets_the_spec_code(kwargs: dict[str, object], code: ErrorCode) -> None:
    assert _code(**kwargs) == code


def test_error_object_names_the_variable_and_carries_the_version() -> None:
    with pytest.raises(CniError) as info:
        _parse(CNI_CONTAINERID="", CNI_IFNAME="")
    err = info.value.to_json("0.4.0")
    assert err["cniVersion"] == "0.4.0" and err["code"] == 4
    assert "CNI_CONTAINERID" in err["msg"] and "CNI_IFNAME" in err["msg"]
    assert set(err) == {"cniVersion", "code", "msg", "details"}
    assert info.value.to_json("7.7.7")["cniVersion"] == "1.1.0"


def test_version_reply_echoes_the_asked_version() -> None:
    reply = version_reply(b'{"cniVersion":"0.4.0"}')
    assert reply["cniVersion"] == "0.4.0"
    assert reply["supportedVersions"] == ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
    assert version_reply(b"")["cniVersion"] == "1.1.0"


def test_wire_request_roundtrip_and_errors() -> None:
    env, stdin = decode_wire_request(json.dumps(
        {"wire": 1, "env": {"CNI_COMMAND": "DEL"}, "stdin": "{}"}).encode())
    assert env == {"CNI_COMMAND": "DEL"} and stdin == b"{}"
    with pytest.raises(CniError) as info:
        decode_wire_request(b"\x00garbage")
    assert info.value.code == ErrorCode.DECODE_FAILURE
    with pytest.raises(CniError) as info:
        decode_wire_request(b'{"wire": 99}')
    assert info.value.code == ErrorCode.INCOMPATIBLE_VERSION
    # a lone surrogate cannot crash the decoder; the config decode reports it
    env, stdin = decode_wire_request(b'{"wire":1,"env":{},"stdin":"\\udc80"}')
    with pytest.raises(CniError) as info:
        parse_request({"CNI_COMMAND": "STATUS"}, stdin)
    assert info.value.code == ErrorCode.DECODE_FAILURE
