"""AgentConfig: precedence flags > environment > file > defaults, Weave-style variable names,
and one readable line per mistake."""

from __future__ import annotations

from ipaddress import IPv4Network
from pathlib import Path

import pytest

from weavepy.config import ConfigError, load_config, parse_duration, parse_peer


def test_defaults_match_weave_and_flannel() -> None:
    config = load_config({}, {})
    assert config.ipalloc_range == IPv4Network("10.32.0.0/12")
    assert config.block_prefix == 24
    assert config.gossip_port == 6783
    assert (config.vxlan_vni, config.vxlan_port) == (1, 8472)
    assert config.mtu is None  # auto: underlay MTU - 50
    assert config.api_addr == ("127.0.0.1", 6784)
    assert config.state_dir == Path("/var/lib/weavepy")
    assert config.run_dir == Path("/run/weavepy")
    assert config.cni_socket == Path("/run/weavepy/cni.sock")
    assert config.reclaim_after == 24 * 3600
    assert config.profile == "lan"
    assert not config.encrypted


def test_precedence_is_flags_then_env_then_file(tmp_path: Path) -> None:
    file = tmp_path / "weavepy.yaml"
    file.write_text("ipalloc-range: 198.19.0.0/16\nmtu: 1400\nblock_prefix: 26\n"
                    "peers: [198.18.0.1, '198.18.0.2:7000']\n")
    env = {"IPALLOC_RANGE": "198.19.64.0/18", "WEAVE_MTU": "1300"}
    config = load_config({"mtu": "1200"}, env, file)
    assert config.mtu == 1200  # flag
    assert config.ipalloc_range == IPv4Network("198.19.64.0/18")  # env beats file
    assert config.block_prefix == 26  # file beats default
    assert config.peers == ("198.18.0.1", "198.18.0.2:7000")
    assert config.peer_addresses() == [("198.18.0.1", 6783), ("198.18.0.2", 7000)]
    assert config.config_file == file


def test_weavepy_names_win_over_weave_names() -> None:
    config = load_config({}, {"WEAVEPY_MTU": "1400", "WEAVE_MTU": "1300",
                              "WEAVEPY_PEERS": "198.18.0.1, 198.18.0.2 198.18.0.1"})
    assert config.mtu == 1400
    assert config.peers == ("198.18.0.1", "198.18.0.2")


def test_config_file_from_environment(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("name: node-a\nreclaim_after: 2h\n")
    config = load_config({}, {"WEAVEPY_CONFIG": str(file)})
    assert config.name == "node-a"
    assert config.reclaim_after == 7200


def test_every_mistake_is_one_line(tmp_path: Path) -> None:
    file = tmp_path / "bad.yaml"
    file.write_text("colour: blue\n")
    with pytest.raises(ConfigError) as caught:
        load_config({"ipalloc_range": "300.1.0.0/16", "mtu": "70", "vxlan_port": "x",
                     "api_addr": "198.18.0.1:6784", "profile": "fast"},
                    {"WEAVEPY_RECLAIM_AFTER": "soon"}, file)
    problems = caught.value.problems
    assert len(problems) == 7, problems
    assert all("\n" not in p for p in problems)
    joined = "\n".join(problems)
    for fragment in ("--ipalloc-range", "--mtu", "--vxlan-port", "loopback", "--profile",
                     "$WEAVEPY_RECLAIM_AFTER", "unknown setting 'colour'"):
        assert fragment in joined


def test_cross_checks() -> None:
    with pytest.raises(ConfigError, match="do not fit"):
        load_config({"ipalloc_range": "198.19.0.0/16", "block_prefix": "12"}, {})
    with pytest.raises(ConfigError, match="at most 65536"):
        load_config({"ipalloc_range": "10.0.0.0/8", "block_prefix": "30"}, {})
    with pytest.raises(ConfigError, match="must not exceed --reclaim-after"):
        load_config({"reclaim_after": "1h", "ipam_lease": "2h"}, {})
    with pytest.raises(ConfigError, match="both set a gossip key"):
        load_config({"keyring_file": "/k"}, {"WEAVEPY_ENCRYPT": "A" * 43 + "="})


def test_ranges_are_checked() -> None:
    for bad, fragment in [("198.19.3.0/16", "did you mean 198.19.0.0/16"),
                          ("fd00::/64", "IPv6"), ("127.0.0.0/8", "loopback"),
                          ("198.19.0.0/31", "between /8 and /30")]:
        with pytest.raises(ConfigError, match=fragment.replace("?", r"\?")):
            load_config({"ipalloc_range": bad}, {})


def test_encrypt_key_is_never_shown() -> None:
    key = "q" * 43 + "="
    config = load_config({}, {"WEAVEPY_ENCRYPT": key})
    assert config.encrypted
    assert key not in repr(config)
    assert config.to_public_dict()["encrypt"] == "(set)"
    with pytest.raises(ConfigError, match="16, 24 or 32"):
        load_config({}, {"WEAVEPY_ENCRYPT": "c2hvcnQ="})


def test_bad_yaml_is_one_line(tmp_path: Path) -> None:
    file = tmp_path / "broken.yaml"
    file.write_text("mtu: [1400\n")
    with pytest.raises(ConfigError) as caught:
        load_config({}, {}, file)
    assert len(caught.value.problems) == 1
    assert "not valid YAML" in caught.value.problems[0]
    with pytest.raises(ConfigError, match="cannot read it"):
        load_config({}, {}, tmp_path / "missing.yaml")


@pytest.mark.parametrize(("text", "seconds"), [
    ("90", 90), ("90s", 90), ("500ms", 0.5), ("30m", 1800), ("24h", 86400), ("1h30m", 5400),
    ("2d", 172800)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "0", "-5", "1x", "h", "5 m"])
def test_bad_durations(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_peers() -> None:
    assert parse_peer("node-a.example") == ("node-a.example", 6783)
    assert parse_peer("198.18.0.1:7000") == ("198.18.0.1", 7000)
    assert parse_peer("[fd00::1]:7000") == ("fd00::1", 7000)
    for bad in ["198.18.0.1:0", "198.18.0.1:x", ":80", "bad host!", "[fd00::1"]:
        with pytest.raises(ValueError):
            parse_peer(bad)


def test_masquerade_is_on_unless_a_flag_a_variable_or_the_file_says_no(tmp_path: Path) -> None:
    assert load_config({}, {}).masquerade is True
    assert load_config({"masquerade": True}, {}).masquerade is False  # --no-masquerade
    assert load_config({}, {"WEAVEPY_NO_MASQUERADE": "1"}).masquerade is False
    assert load_config({}, {"WEAVEPY_NO_MASQUERADE": "false"}).masquerade is True
    assert load_config({}, {"EXTRA_ARGS": "--no-masquerade"}).masquerade is False
    file = tmp_path / "weavepy.yaml"
    file.write_text("masquerade: false\n")
    assert load_config({}, {}, file).masquerade is False
    file.write_text("masquerade: true\n")
    assert load_config({}, {"WEAVEPY_NO_MASQUERADE": "yes"}, file).masquerade is False
    assert load_config({}, {}, file).to_public_dict()["masquerade"] is True
    with pytest.raises(ConfigError, match=r"^\$WEAVEPY_NO_MASQUERADE: must be true or false"):
        load_config({}, {"WEAVEPY_NO_MASQUERADE": "sometimes"})


def test_no_masq_cidrs_from_flags_environment_and_file(tmp_path: Path) -> None:
    assert load_config({}, {}).no_masq_cidrs == ()
    flagged = load_config({"no_masq_cidrs": "10.0.0.0/8, 192.0.2.7 10.0.0.0/8"}, {})
    assert flagged.no_masq_cidrs == (IPv4Network("10.0.0.0/8"), IPv4Network("192.0.2.7/32"))
    assert flagged.to_public_dict()["no_masq_cidrs"] == ["10.0.0.0/8", "192.0.2.7/32"]
    env = load_config({}, {"WEAVEPY_NO_MASQ_CIDRS": "172.16.0.0/12"})
    assert env.no_masq_cidrs == (IPv4Network("172.16.0.0/12"),)
    file = tmp_path / "weavepy.yaml"
    file.write_text("no-masq-cidrs: [10.96.0.0/12, 203.0.113.0/24]\n")
    assert load_config({}, {}, file).no_masq_cidrs == (IPv4Network("10.96.0.0/12"),
                                                        IPv4Network("203.0.113.0/24"))


def test_every_bad_no_masq_cidr_is_its_own_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config({"no_masq_cidrs": "10.0.0.1/8,fd00::/64, nonsense,0.0.0.0/0,10.1.0.0/16"},
                    {})
    assert caught.value.problems == [
        "--no-masq-cidrs: not a CIDR range: '10.0.0.1/8': host bits are set (did you mean "
        "10.0.0.0/8?)",
        "--no-masq-cidrs: fd00::/64 is IPv6; weavepy's pod network is IPv4 only",
        "--no-masq-cidrs: not a CIDR range: 'nonsense': 'nonsense' does not appear to be an "
        "IPv4 or IPv6 network",
        "--no-masq-cidrs: 0.0.0.0/0 would exclude every destination; use --no-masquerade to "
        "switch masquerading off",
    ]
    file = tmp_path / "weavepy.yaml"
    file.write_text("no_masq_cidrs: [10.0.0.0/8, 300.0.0.0/8]\n")
    with pytest.raises(ConfigError) as from_file:
        load_config({}, {}, file)
    assert from_file.value.problems == [
        f"{file}: no_masq_cidrs: not a CIDR range: '300.0.0.0/8': '300.0.0.0/8' does not "
        "appear to be an IPv4 or IPv6 network"]


def test_launch_has_the_egress_flags() -> None:
    from click.testing import CliRunner

    from weavepy.cli import main

    shown = CliRunner().invoke(main, ["launch", "--help"])
    assert shown.exit_code == 0
    assert "--no-masquerade" in shown.output and "$WEAVEPY_NO_MASQUERADE" in shown.output
    assert "--no-masq-cidrs CIDR,..." in shown.output and "$WEAVEPY_NO_MASQ_CIDRS" in shown.output


def test_ipam_mode_is_weavepy_unless_set_and_kubernetes_needs_the_api(tmp_path: Path) -> None:
    assert load_config({}, {}).ipam == "weavepy"
    assert load_config({"ipam": "kubernetes", "kube_peers": True}, {}).ipam == "kubernetes"
    environment = {"WEAVEPY_IPAM": "Kubernetes", "WEAVEPY_KUBE_PEERS": "true"}
    assert load_config({}, environment).ipam == "kubernetes"
    config_file = tmp_path / "weavepy.yaml"
    config_file.write_text("ipam: kubernetes\nkube-peers: true\n")
    assert load_config({}, {}, config_file).ipam == "kubernetes"
    with pytest.raises(ConfigError) as refused:
        load_config({"ipam": "kubernetes"}, {})
    assert refused.value.problems == [
        "--ipam kubernetes takes each node's podCIDR from the Kubernetes API: add --kube-peers "
        "($WEAVEPY_KUBE_PEERS=true)"]
    with pytest.raises(ConfigError) as bad:
        load_config({}, {"WEAVEPY_IPAM": "calico"})
    assert bad.value.problems == ["$WEAVEPY_IPAM: must be one of weavepy, kubernetes, got "
                                  "'calico'"]


def test_policy_settings(tmp_path: Path) -> None:
    config = load_config({}, {})
    assert (config.policy, config.policy_dir, config.policy_audit) == (True, None, False)
    assert load_config({"policy": True}, {}).policy is False  # --no-policy
    assert load_config({}, {"WEAVEPY_NO_POLICY": "1"}).policy is False
    file = tmp_path / "weavepy.yaml"
    file.write_text(f"policy_dir: {tmp_path}\npolicy_audit: true\n")
    config = load_config({}, {}, file)
    assert (config.policy_dir, config.policy_audit) == (tmp_path, True)
    assert load_config({"policy_dir": "/p"}, {"WEAVEPY_POLICY_DIR": "/q"}).policy_dir == Path("/p")
    with pytest.raises(ConfigError, match=r"^--policy-dir and --no-policy contradict"):
        load_config({"policy_dir": "/p", "policy": True}, {})
    with pytest.raises(ConfigError, match=r"^--policy-audit and --no-policy contradict"):
        load_config({"policy": True}, {"WEAVEPY_POLICY_AUDIT": "yes"})
    with pytest.raises(ConfigError, match=r"^\$WEAVEPY_POLICY_AUDIT: must be true or false"):
        load_config({}, {"WEAVEPY_POLICY_AUDIT": "maybe"})
