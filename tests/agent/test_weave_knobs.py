"""A DaemonSet copied from Weave Net keeps working: Weave's variables are taken with Weave's
meaning (IPALLOC_RANGE, WEAVE_MTU, NO_MASQ_LOCAL, IPALLOC_INIT, KUBE_PEERS, EXTRA_ARGS,
WEAVE_PASSWORD), and every other Weave variable gives one warning naming what weavepy does
instead. docs/migrating-from-weave.md's variable map is checked against the code here."""

from __future__ import annotations

import re
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from weavepy.config import (
    SETTINGS,
    WEAVE_ONLY_VARIABLES,
    ConfigError,
    IpallocInit,
    load_config,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "migrating-from-weave.md"


def test_weave_daemonset_variables_are_honoured() -> None:
    config = load_config({}, {"IPALLOC_RANGE": "198.19.0.0/16", "WEAVE_MTU": "1376",
                              "KUBE_PEERS": "198.18.0.11 198.18.0.12",
                              "IPALLOC_INIT": "consensus=3", "NO_MASQ_LOCAL": "1"})
    assert config.ipalloc_range == IPv4Network("198.19.0.0/16")
    assert config.mtu == 1376
    assert config.peers == ("198.18.0.11", "198.18.0.12")
    assert config.ipalloc_init == IpallocInit("consensus", count=3)
    assert config.warnings == ()


@pytest.mark.parametrize(("text", "expected"), [
    ("consensus=5", IpallocInit("consensus", count=5)),
    ("seed=node-a,node-b", IpallocInit("seed", seeds=("node-a", "node-b"))),
    ("observer", IpallocInit("observer")),
    ("consensus", None),  # Weave's count is the number of peers: weavepy's own rules then
])
def test_ipalloc_init_modes(text: str, expected: IpallocInit | None) -> None:
    assert load_config({}, {"IPALLOC_INIT": text}).ipalloc_init == expected
    if expected is not None:  # the status document shows it as Weave writes it
        assert load_config({}, {"IPALLOC_INIT": text}).to_public_dict()["ipalloc_init"] == text


@pytest.mark.parametrize("text", ["consensus=0", "consensus=x", "seed=", "observer=2", "quorum"])
def test_a_bad_ipalloc_init_is_one_line(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config({}, {"IPALLOC_INIT": text})
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith("$IPALLOC_INIT: ")


def test_weave_password_is_any_string_stretched_into_a_key() -> None:
    one = load_config({}, {"WEAVE_PASSWORD": "correct horse battery staple"})
    again = load_config({}, {"WEAVE_PASSWORD": "correct horse battery staple"})
    other = load_config({}, {"WEAVE_PASSWORD": "correct horse battery stapler"})
    assert one.encrypt is not None and len(one.encrypt) == 32
    assert one.encrypt == again.encrypt  # every node given the password derives the same key
    assert one.encrypt != other.encrypt
    assert one.encrypted
    # weavepy's own variable keeps meaning a base64 key, and is not stretched
    key = load_config({}, {"WEAVEPY_ENCRYPT": "MDEyMzQ1Njc4OWFiY2RlZg=="})
    assert key.encrypt == b"0123456789abcdef"
    with pytest.raises(ConfigError, match=r"^\$WEAVEPY_ENCRYPT: must be a base64 key"):
        load_config({}, {"WEAVEPY_ENCRYPT": "not a key"})


def test_extra_args_are_read_as_launch_flags() -> None:
    env = {"EXTRA_ARGS": "--mtu 1300 --conn-limit=30 --nickname host-1 --no-dns "
                         "--ipalloc-init=observer 198.18.0.11",
           "WEAVE_MTU": "1400"}
    config = load_config({}, env)
    assert config.mtu == 1300  # EXTRA_ARGS are flags: they beat the environment
    assert config.ipalloc_init == IpallocInit("observer")
    assert config.peers == ("198.18.0.11",)
    assert config.warnings == tuple(
        f"$EXTRA_ARGS: {flag} is a Weave Net flag with no weavepy equivalent; ignored"
        for flag in ("--conn-limit", "--nickname", "--no-dns"))
    assert load_config({"mtu": "1200"}, env).mtu == 1200  # real flags beat them


@pytest.mark.parametrize(("extra", "problem"), [
    ("--frobnicate", "$EXTRA_ARGS: unknown flag --frobnicate (see `weavepy launch --help`)"),
    ("--mtu", "$EXTRA_ARGS: --mtu needs a value"),
    ("--mtu 70", "$EXTRA_ARGS: --mtu: must be between 576 and 9216, got 70"),
    ("--name 'unterminated", "$EXTRA_ARGS: No closing quotation"),
])
def test_bad_extra_args_are_one_line(extra: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config({}, {"EXTRA_ARGS": extra})
    assert info.value.problems == [problem]


def test_other_weave_variables_warn_once_each_with_what_weavepy_does() -> None:
    env = {"CONN_LIMIT": "200", "HAIRPIN_MODE": "true", "EXPECT_NPC": "0",
           "CHECKPOINT_DISABLE": "1", "IPTABLES_BACKEND": "nft"}
    warnings = load_config({}, env).warnings
    assert [w.split(" ", 1)[0] for w in warnings] == [
        "$CONN_LIMIT", "$CHECKPOINT_DISABLE", "$HAIRPIN_MODE", "$EXPECT_NPC",
        "$IPTABLES_BACKEND"]
    assert all(" is Weave Net's and not used by weavepy: " in w for w in warnings)


def test_no_masq_local() -> None:
    assert load_config({}, {"NO_MASQ_LOCAL": "1"}).warnings == ()
    (warning,) = load_config({}, {"NO_MASQ_LOCAL": "0"}).warnings
    assert warning.startswith("$NO_MASQ_LOCAL=0 has no effect")
    with pytest.raises(ConfigError, match=r"^\$NO_MASQ_LOCAL: must be true or false"):
        load_config({}, {"NO_MASQ_LOCAL": "sometimes"})


def _doc_rows() -> dict[str, str]:
    rows: dict[str, str] = {}
    for line in DOC.read_text().splitlines():
        match = re.match(r"^\| `([A-Z_]+)` \| ([^|]+) \|", line)
        if match:
            rows[match.group(1)] = match.group(2).strip()
    return rows


def test_the_migration_doc_variable_map_matches_the_code() -> None:
    rows = _doc_rows()
    taken = {var: setting.name.replace("_", "-") for setting in SETTINGS
             for var in setting.envs if not var.startswith("WEAVEPY_")}
    documented = {var: cell for var, cell in rows.items() if re.fullmatch(r"`[a-z-]+`", cell)}
    assert documented == {var: f"`{key}`" for var, key in taken.items()}
    ignored = {var for var, cell in rows.items() if cell == "not used (warning)"}
    assert ignored == set(WEAVE_ONLY_VARIABLES)
    assert rows.keys() - documented.keys() - ignored == {"NO_MASQ_LOCAL", "EXTRA_ARGS"}
