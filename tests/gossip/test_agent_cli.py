"""The standalone agent's command line, run as real processes on 127.0.0.1.

Bad flags cost one readable line and exit status 2; runtime failures one line and status 1;
events are JSON lines; SIGTERM and SIGINT leave gracefully (status 0) and peers see `leave`.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gossip.agent import main as agent_main
from tests.gossip.agentproc import REPO, AgentProcess

EVENT_FIELDS = {"event", "name", "addr", "port", "tags", "time"}


def run_cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gossip", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    started: list[AgentProcess] = []
    try:
        yield started
    finally:
        for agent in started:
            agent.stop()


def assert_one_line_error(result: subprocess.CompletedProcess[str], status: int) -> str:
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("gossip: error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("args", "mentions"),
    [
        (["agent", "--bind", "127.0.0.1:0"], "--name"),
        (["agent", "--name", "a"], "--bind"),
        (["agent", "--name", "a", "--bind", "localhost:1"], "--bind"),
        (["agent", "--name", "a", "--bind", "127.0.0.1:70000"], "out of range"),
        (["agent", "--name", "a", "--bind", "0.0.0.0:0"], "--advertise"),
        (["agent", "--name", "a", "--bind", "127.0.0.1:0", "--tag", "novalue"], "--tag"),
        (["agent", "--name", "a", "--bind", "127.0.0.1:0", "--tag", "k=" + "v" * 600], "512"),
        (["agent", "--name", "a", "--bind", "127.0.0.1:0", "--profile", "fast"], "--profile"),
        (["agent", "--name", "a", "--bind", "127.0.0.1:0", "--join", "h:x"], "--join"),
        (["agent", "--name", "a", "--bind", "127.0.0.1:0", "--keyring-file", "/nonexistent"],
         "--keyring-file"),
        (["agent", "--name", "a", "--bind", "127.0.0.1:0", "--bogus"], "--bogus"),
        (["launch"], "launch"),
    ],
)
def test_bad_flags_are_one_line_and_status_2(
    args: list[str], mentions: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # In-process for speed: the same `main` that `python -m gossip` runs.
    with pytest.raises(SystemExit) as exited:
        agent_main(args)
    captured = capsys.readouterr()
    status = exited.value.code
    assert isinstance(status, int)
    result = subprocess.CompletedProcess(args, status, captured.out, captured.err)
    line = assert_one_line_error(result, 2)
    assert mentions in line


@pytest.mark.timeout(20)
def test_bad_flag_in_a_real_process() -> None:
    line = assert_one_line_error(run_cli("agent", "--name", "a", "--bind", "nowhere"), 2)
    assert "--bind" in line


@pytest.mark.timeout(20)
def test_bad_keyring_file_is_one_line(tmp_path: Path) -> None:
    keyring = tmp_path / "keys.json"
    keyring.write_text('["not base64!"]')
    result = run_cli("agent", "--name", "a", "--bind", "127.0.0.1:0", "--keyring-file",
                     str(keyring))
    assert "--keyring-file" in assert_one_line_error(result, 2)


@pytest.mark.timeout(20)
def test_port_in_use_is_one_line_and_status_1() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("agent", "--name", "a", "--bind", f"127.0.0.1:{port}")
    assert "cannot bind" in assert_one_line_error(result, 1)


@pytest.mark.timeout(30)
def test_failed_join_is_one_line_and_status_1() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    result = run_cli("agent", "--name", "a", "--bind", "127.0.0.1:0", "--profile", "local",
                     "--join", f"127.0.0.1:{port}")
    assert "failed to join" in assert_one_line_error(result, 1)


def test_help_is_not_an_error() -> None:
    result = run_cli("agent", "--help")
    assert result.returncode == 0
    assert "--keyring-file" in result.stdout


@pytest.mark.timeout(40)
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_agents_print_events_and_leave_on_signal(
    tmp_path: Path, agents: list[AgentProcess], stop_signal: signal.Signals
) -> None:
    a = AgentProcess("a", tmp_path, tags={"role": "seed"}, profile="local")
    agents.append(a)
    a.wait_started()
    b = AgentProcess("b", tmp_path, join=[a.address], tags={"zone": "z1"}, profile="local")
    agents.append(b)
    b.wait_started()
    joined = a.wait_event(["join"], "b", 10)
    assert (joined.addr, joined.port, joined.tags) == ("127.0.0.1", b.port, {"zone": "z1"})
    assert b.wait_event(["join"], "a", 10).tags == {"role": "seed"}

    b.process.send_signal(stop_signal)
    assert b.process.wait(15) == 0
    a.wait_event(["leave"], "b", 10)

    # Every line on stdout is one JSON object with exactly the documented fields.
    assert a.terminate() == 0
    assert a.raw_lines, "a printed events"
    for line in a.raw_lines:
        event = json.loads(line)
        assert set(event) == EVENT_FIELDS
        assert event["event"] in {"join", "update", "suspect", "alive", "failed", "leave"}
        assert isinstance(event["time"], float) and isinstance(event["tags"], dict)
