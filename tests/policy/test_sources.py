"""The directory source and the object store: multi-document YAML, changes picked up by
polling, a bad file or object is one logged line and the last good state stays; CNI
attachments merged by container ID or name."""

from __future__ import annotations

import json
import logging
import os
import textwrap
from ipaddress import IPv4Address
from pathlib import Path

import pytest
import trio

from weavepy.policy.model import Attachment, Labels, Pod, attach
from weavepy.policy.sources import DirectorySource, PolicyStore, load_file

POLICIES = textwrap.dedent("""\
    apiVersion: v1
    kind: Namespace
    metadata: {name: x, labels: {ns: x}}
    ---
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: deny, namespace: x}
    spec: {podSelector: {}}
    ---
    kind: List
    items:
    - kind: Pod
      metadata: {name: a, namespace: x, labels: {pod: a}}
    - kind: Pod
      metadata:
        name: b
        namespace: x
        labels: {pod: b}
        annotations: {weavepy.io/container-id: c0ffee}
""")


def write(path: Path, text: str) -> None:
    path.write_text(text)
    stamp = path.stat().st_mtime_ns + 1_000_000_000  # a new mtime even within one tick
    os.utime(path, ns=(stamp, stamp))


def test_a_directory_of_multi_document_yaml(tmp_path: Path) -> None:
    write(tmp_path / "policies.yaml", POLICIES)
    (tmp_path / ".hidden.yaml").write_text("not: [valid")
    (tmp_path / "notes.txt").write_text("ignored")
    source = DirectorySource(tmp_path)
    assert source.poll()
    state = source.state
    assert [p.key for p in state.policies] == ["x/deny"]
    assert [p.key for p in state.pods] == ["x/a", "x/b"]
    assert state.namespace_labels("x") == {"ns": "x", "kubernetes.io/metadata.name": "x"}
    assert not source.poll()  # nothing changed


def test_a_bad_file_is_one_line_and_its_last_good_objects_stay(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "policies.yaml"
    write(path, POLICIES)
    source = DirectorySource(tmp_path)
    source.poll()
    good = source.state
    caplog.set_level(logging.WARNING)
    write(path, POLICIES.replace("podSelector: {}", "podSelector: {matchLabel: {}}"))
    assert not source.poll()
    assert source.state == good
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "policies.yaml (document 2): NetworkPolicy x/deny: spec.podSelector: unknown " \
           "field 'matchLabel'" in warnings[0] and "\n" not in warnings[0]
    assert list(source.errors) == [str(path)]
    assert not source.poll() and len(caplog.records) == 1  # logged once, not every poll
    write(path, "kind: NetworkPolicy\nmetadata: {name: [oops\n")
    assert not source.poll() and source.state == good
    assert "not YAML" in caplog.records[-1].getMessage()
    write(path, POLICIES.replace("name: deny", "name: deny2"))
    assert source.poll() and [p.key for p in source.state.policies] == ["x/deny2"]
    assert source.errors == {}
    path.unlink()
    assert source.poll() and source.state.policies == ()


def test_the_first_file_wins_a_duplicate(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", POLICIES)
    write(tmp_path / "b.yaml", POLICIES.split("---")[1])
    source = DirectorySource(tmp_path)
    source.poll()
    assert len(source.state.policies) == 1
    assert source.duplicates == [f"NetworkPolicy x/deny in {tmp_path / 'b.yaml'} is also in "
                                 f"{tmp_path / 'a.yaml'}; using {tmp_path / 'a.yaml'}"]


def test_load_file_names_the_file_and_document(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("kind: Pod\nmetadata: {name: a}\n---\nkind: Service\n")
    from weavepy.policy.model import PolicyInputError

    with pytest.raises(PolicyInputError, match=r"p.yaml \(document 2\): kind 'Service'"):
        load_file(path)


async def test_watch_yields_the_state_then_each_change(tmp_path: Path) -> None:
    source = DirectorySource(tmp_path, interval=0.05)
    async with source.watch() as states:
        first = await states.receive()
        assert first.policies == ()
        write(tmp_path / "p.yaml", POLICIES)
        with trio.fail_after(10):
            second = await states.receive()
        assert [p.key for p in second.policies] == ["x/deny"]


def test_the_store_follows_lists_and_events_and_keeps_a_bad_objects_last_version() -> None:
    store = PolicyStore()
    good = {"metadata": {"name": "p", "namespace": "x"}, "spec": {"podSelector": {}}}
    assert store.replace("NetworkPolicy", [good])
    bad = {"metadata": {"name": "p", "namespace": "x"}, "spec": {"podSelector": []}}
    assert not store.apply("NetworkPolicy", "MODIFIED", bad)
    assert [p.key for p in store.snapshot().policies] == ["x/p"]
    assert "NetworkPolicy x/p" in store.errors
    assert not store.replace("NetworkPolicy", [bad])  # a relist keeps it too
    assert store.apply("NetworkPolicy", "DELETED", bad)
    assert store.snapshot().policies == () and store.errors == {}
    pod = {"metadata": {"name": "a", "namespace": "x"}, "status": {"podIP": "198.19.0.2"}}
    assert store.apply("Pod", "ADDED", pod)
    assert not store.apply("Pod", "MODIFIED", pod)
    # a pod that finished leaves (its address may be reused)
    assert store.apply("Pod", "MODIFIED", {**pod, "status": {"phase": "Failed"}})
    assert store.snapshot().pods == ()
    assert not store.apply("Pod", "BOOKMARK", pod)


def test_attachments_fill_addresses_by_container_id_or_name() -> None:
    source = DirectorySource(Path("/nonexistent"))
    source.poll()
    known = (Pod("x", "a", Labels({"pod": "a"})),
             Pod("x", "b", Labels({"pod": "b"}), container_id="c0ffee"))
    from dataclasses import replace

    state = replace(source.state, pods=known)
    merged = attach(state, [
        Attachment("c0ffee", IPv4Address("198.19.0.3"), "n1"),
        Attachment("1234", IPv4Address("198.19.0.2"), "n1", "x", "a"),
        Attachment("5678", IPv4Address("198.19.0.9"), "n1"),
    ])
    pods = {p.key: p for p in merged.pods}
    assert pods["x/b"].ip == IPv4Address("198.19.0.3") and pods["x/b"].labels == {"pod": "b"}
    assert pods["x/a"].ip == IPv4Address("198.19.0.2") and pods["x/a"].container_id == "1234"
    assert pods["default/5678"] == Pod("default", "5678", ip=IPv4Address("198.19.0.9"),
                                       node="n1", container_id="5678")


def test_the_store_dumps_what_policy_reads_and_loads_it_back() -> None:
    store = PolicyStore()
    store.replace("Namespace", [{"metadata": {"name": "x", "labels": {"team": "a"},
                                              "managedFields": [{"big": "yes"}]}}])
    store.replace("NetworkPolicy", [{"metadata": {"name": "deny", "namespace": "x"},
                                     "spec": {"podSelector": {}}}])
    store.replace("Pod", [{
        "metadata": {"name": "a", "namespace": "x", "labels": {"app": "a"},
                     "annotations": {"weavepy.io/container-id": "c1", "other": "dropped"}},
        "spec": {"nodeName": "n1", "containers": [
            {"name": "web", "image": "dropped", "ports": [{"name": "http",
                                                            "containerPort": 8080}]}]},
        "status": {"podIP": "198.19.0.2", "phase": "Running", "conditions": ["dropped"]}}])
    dumped = store.dump()
    assert "dropped" not in str(dumped) and "managedFields" not in str(dumped)
    again = PolicyStore()
    again.load(json.loads(json.dumps(dumped)))
    assert again.snapshot() == store.snapshot()
    assert again.snapshot().pod("x/a") is not None
