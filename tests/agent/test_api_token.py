"""The local API's token (weavepy.apitoken): created once, mode 0600, never replaced silently;
every request that is not a GET needs it, GETs do not; the token is in no answer.

The app is the real one (`weavepy.api.build_app`) over a real, never-run Agent, as in
tests/fuzz/test_api_fuzz.py (which says what stands in for the kernel there)."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest
from starlette.routing import Route
from starlette.testclient import TestClient

from tests.fuzz.test_api_fuzz import make_agent
from weavepy.api import build_app
from weavepy.apitoken import TOKEN_FILE, TokenError, bearer_matches, load_or_create, read_token


def test_the_token_is_created_once_private_and_kept(tmp_path: Path) -> None:
    token = load_or_create(tmp_path)
    path = tmp_path / TOKEN_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(token) == 43 and len(base64.urlsafe_b64decode(token + "=")) == 32
    assert load_or_create(tmp_path) == token, "a restart keeps the token the CLI has read"
    assert read_token(tmp_path) == token
    assert load_or_create(tmp_path / "other") != token


@pytest.mark.parametrize("content", ["", "short", "x" * 42 + "!", "x" * 44])
def test_a_file_without_a_token_is_refused_not_replaced(tmp_path: Path, content: str) -> None:
    path = tmp_path / TOKEN_FILE
    path.write_text(content)
    with pytest.raises(TokenError) as info:
        load_or_create(tmp_path)
    assert str(info.value) == (f"{path} does not hold an API token; remove it and launch "
                               f"again (the agent writes a new token, and the CLI reads it "
                               f"from there)")
    assert path.read_text() == content


def test_read_token_says_why_there_is_none(tmp_path: Path) -> None:
    with pytest.raises(TokenError, match=rf"^{tmp_path}/api-token does not exist$"):
        read_token(tmp_path)
    (tmp_path / TOKEN_FILE).mkdir()
    with pytest.raises(TokenError, match=rf"^cannot read {tmp_path}/api-token: Is a directory$"):
        read_token(tmp_path)


def test_bearer_matches() -> None:
    token = "a" * 43
    assert bearer_matches(token, f"Bearer {token}")
    assert bearer_matches(token, f"bearer {token} ")
    for header in (None, "", token, f"Basic {token}", f"Bearer {token}x", "Bearer ",
                   f"Bearer {token[:-1]}", "Bearer ü"):
        assert not bearer_matches(token, header), header
    assert not bearer_matches("", "Bearer "), "an empty token never matches"


def test_every_request_that_is_not_a_get_needs_the_token(tmp_path: Path) -> None:
    agent = make_agent(tmp_path)
    token = agent.prepared.api_token
    app = build_app(agent.control, token)
    changing = [(method, route.path.replace("{name}", "other").replace("{part}", "ipam"))
                for route in app.routes if isinstance(route, Route)
                for method in route.methods or () if method not in ("GET", "HEAD")]
    assert sorted(changing) == [
        ("DELETE", "/external-peers/other"), ("DELETE", "/peer"), ("DELETE", "/peer/other"),
        ("POST", "/connect"), ("POST", "/external-peers"), ("POST", "/forget"),
        ("POST", "/keyring/reload"), ("POST", "/stop")]
    body = {"peers": ["198.18.0.12"]}
    with TestClient(app, backend="trio", raise_server_exceptions=False,
                    base_url="http://127.0.0.1:6784") as client:
        before = client.get("/status").json()
        for method, path in changing:
            for header in ({}, {"Authorization": "Bearer " + "x" * 43},
                           {"Authorization": token}):
                response = client.request(method, path, json=body, headers=header)
                assert response.status_code == 401, (method, path, header)
                assert response.headers["www-authenticate"] == "Bearer"
                error = response.json()["error"]
                assert error.startswith(f"{method} {path} changes the node and came with "), error
                assert "api-token" in error and token not in error
        assert not agent._stop.is_set()
        after = client.get("/status").json()
        assert after["targets"] == before["targets"] == []
        # with the token, the same requests reach the node
        answer = client.post("/connect", json=body, headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 200, answer.text
        assert client.get("/status").json()["targets"][0]["peer"] == "198.18.0.12:6783"
        stop = client.post("/stop", headers={"Authorization": f"Bearer {token}"})
        assert stop.status_code == 202 and agent._stop.is_set()


def test_reads_need_no_token_and_show_none(tmp_path: Path) -> None:
    agent = make_agent(tmp_path)
    token = agent.prepared.api_token
    with TestClient(build_app(agent.control, token), backend="trio",
                    raise_server_exceptions=False, base_url="http://127.0.0.1:6784") as client:
        for path in ("/status", "/status/config", "/report", "/healthz"):
            response = client.get(path)
            assert response.status_code == 200, path
            assert token not in response.text, path
        assert client.get("/readyz").status_code == 503  # not ready, but answered
        assert token not in json.dumps(agent.config.to_public_dict())
