"""The node identity: created once, stable across restarts, private, never silently replaced."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from weavepy.identity import (
    IDENTITY_FILE,
    Identity,
    IdentityError,
    load_or_create,
    random_vtep_mac,
)


def test_created_once_then_stable(tmp_path: Path) -> None:
    first, created = load_or_create(tmp_path, "n1")
    assert created
    again, created_again = load_or_create(tmp_path, "n1")
    assert not created_again
    assert again == first
    assert len(first.wg_public_key) == 32
    mode = stat.S_IMODE((tmp_path / IDENTITY_FILE).stat().st_mode)
    assert mode == 0o600


def test_cluster_id_round_trips(tmp_path: Path) -> None:
    identity, _ = load_or_create(tmp_path, "n1")
    identity.with_cluster_id("abc").save(tmp_path)
    assert load_or_create(tmp_path, "n1")[0].cluster_id == "abc"


def test_a_renamed_node_is_refused(tmp_path: Path) -> None:
    load_or_create(tmp_path, "n1")
    with pytest.raises(IdentityError, match=r"belongs to node 'n1'.*--name n1.*weavepy reset"):
        load_or_create(tmp_path, "n2")


@pytest.mark.parametrize("content", [b"", b"{", b"[]", b'{"version": 9}',
                                     b'{"version": 1, "name": "n1", '
                                     b'"vtep_mac": "01:00:00:00:00:01", '
                                     b'"wireguard_private_key": "AAAA"}'])
def test_corrupt_files_are_reported_not_replaced(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / IDENTITY_FILE
    path.write_bytes(content)
    with pytest.raises(IdentityError, match=r"is corrupt.*weavepy reset"):
        load_or_create(tmp_path, "n1")
    assert path.read_bytes() == content


def test_macs_are_local_unicast() -> None:
    for _ in range(200):
        first = int(random_vtep_mac()[:2], 16)
        assert first & 0x02 and not first & 0x01


def test_a_new_state_directory_is_private(tmp_path: Path) -> None:
    load_or_create(tmp_path / "state", "n1")
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    assert [p.name for p in (tmp_path / "state").iterdir()] == [IDENTITY_FILE]


def test_json_round_trip() -> None:
    identity = Identity.generate("n1")
    assert Identity.from_json(identity.to_json()) == identity
