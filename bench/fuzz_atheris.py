"""bench.fuzz_atheris: coverage-guided fuzzing (atheris, libFuzzer) of every decoder that reads
bytes from the network or from a runtime: gossip packets and streams (plain and inside a valid
encryption), IPAM messages, WireGuard datagrams, the CNI request parser and the CNI server.

The hypothesis tests (tests/fuzz, tests/gossip/test_fuzz_decoders.py, ...) check the same rules
with random and mutated input on every suite run; this run lets libFuzzer steer the mutations by
the branches they reach, for as long as asked. The rule for each target: the decoder raises
only its documented error type (or none), whatever the input. Anything else is a crash: the
input is saved under the work directory and the run reports it.

`python -m bench fuzz_atheris [--seconds 60] [--targets a,b]` runs each target in its own
process (atheris instruments the modules it imports and libFuzzer exits on the first crash).
There is no anchor to compare with: the numbers are executions, coverage and crashes.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKDIR = Path("/tmp/weavepy-fuzz-atheris")
GOLDEN = REPO / "tests" / "gossip" / "golden" / "serf_captures.json"
TARGETS = (
    "gossip_packet",
    "gossip_stream",
    "gossip_stream_encrypted",
    "ipam_message",
    "wireguard_datagram",
    "cni_request",
    "cni_server",
)
CNI_ENV = {
    "CNI_COMMAND": "ADD",
    "CNI_CONTAINERID": "c0ffee",
    "CNI_NETNS": "/var/run/netns/fuzz",
    "CNI_IFNAME": "eth0",
    "CNI_PATH": "/opt/cni/bin",
}
FUZZ_KEY = bytes(range(32))


# ---------------------------------------------------------------------------- targets
# Each builder imports what it tests (inside atheris.instrument_imports in a worker) and
# returns the function libFuzzer calls, plus seed inputs for the corpus.


def golden_captures(transport: str) -> list[bytes]:
    """The serf captures of one transport (tests/gossip/golden), decrypted where they were
    encrypted, so that mutations reach the layers below encryption."""
    from gossip.keyring import Keyring

    out = []
    for capture in json.loads(GOLDEN.read_text())["captures"]:
        if capture["transport"] != transport:
            continue
        data = bytes.fromhex(capture["hex"])
        if capture["key_b64"]:
            ring = Keyring([base64.b64decode(capture["key_b64"])])
            if transport == "udp":
                data = ring.decrypt_packet(data)
            else:
                data = ring.decrypt_stream_payload(data[:5], data[5:])
        out.append(data)
    return out


def _gossip_packet() -> tuple[Callable[[bytes], None], list[bytes]]:
    from gossip.messages import DecodeError
    from gossip.wire import PacketCodec, decode_message

    codec = PacketCodec(None, compression=True)

    def one(data: bytes) -> None:
        with contextlib.suppress(DecodeError):
            decode_message(data)
        result = codec.decode_parts(data)
        assert all(isinstance(e, DecodeError) for e in result.errors), result.errors

    return one, golden_captures("udp")


def _stream_feeder() -> Callable[[object, bytes, int], None]:
    from gossip.messages import DecodeError
    from gossip.wire import StreamDecoder

    def feed(keyring: object, data: bytes, chunk: int) -> None:
        decoder = StreamDecoder(keyring)  # type: ignore[arg-type]
        try:
            for at in range(0, len(data), chunk):
                decoder.feed(data[at : at + chunk])
            decoder.eof()
        except DecodeError as err:
            assert err.reason, err

    return feed


def _gossip_stream() -> tuple[Callable[[bytes], None], list[bytes]]:
    feed = _stream_feeder()

    def one(data: bytes) -> None:
        if data:  # the first byte chooses how the stream is cut into reads
            feed(None, data[1:], data[0] % 64 + 1)

    return one, [bytes([7]) + c for c in golden_captures("tcp")]


def _gossip_stream_encrypted() -> tuple[Callable[[bytes], None], list[bytes]]:
    from gossip.keyring import Keyring

    feed = _stream_feeder()
    ring = Keyring([FUZZ_KEY])

    def one(data: bytes) -> None:  # mutations land below a valid encryption
        feed(ring, ring.encrypt_stream(data), 1000)

    return one, golden_captures("tcp")


def _ipam_message() -> tuple[Callable[[bytes], None], list[bytes]]:
    from weavepy.ipam import wire
    from weavepy.ipam.errors import IpamDecodeError

    seeds = [
        wire.encode(wire.Envelope("c0ffee", (0, "", 0), "n2", 42, 1, 1, body))
        for body in (
            wire.Hello(0),
            wire.Prepare(7, (3, "n1", 1), (("n3", 2),)),
            wire.Accepted(7, (3, "n1", 1)),
            wire.Behind(6),
            wire.StateRequest(6),
        )
    ]

    def one(data: bytes) -> None:
        with contextlib.suppress(IpamDecodeError):
            wire.decode(data)

    return one, seeds


def _wireguard_datagram() -> tuple[Callable[[bytes], None], list[bytes]]:
    from tunnel.wireguard.core import Device, DeviceConfig, PeerConfig
    from tunnel.wireguard.keys import PrivateKey
    from tunnel.wireguard.plane import PlaneConfig, SetPeer
    from tunnel.wireguard.receive import RxEngine

    ours, theirs = PrivateKey(bytes(range(32))), PrivateKey(bytes(range(1, 33)))
    device = Device(DeviceConfig(ours))
    device.add_peer(PeerConfig(theirs.public_key, ("198.19.2.0/24",)))
    engine = RxEngine(PlaneConfig())
    engine.apply(SetPeer(theirs.public_key.raw, ("198.19.2.0/24",), None, True), 0.0)
    source = ("198.18.0.12", 51820)
    # seeds: a real handshake initiation towards us, and message-type prefixes
    initiator = Device(DeviceConfig(theirs))
    initiator.add_peer(PeerConfig(ours.public_key, ("198.19.1.0/24",), ("198.18.0.11", 51820)))
    initiator.request_handshake(ours.public_key, 0.0)
    seeds = [data for data, _ in initiator.datagrams_to_send()]
    seeds += [bytes([kind, 0, 0, 0]) + bytes(40) for kind in (1, 2, 3, 4, 0x77)]

    def one(data: bytes) -> None:
        device.receive_datagram(data, source, 0.0)
        device.datagrams_to_send()
        device.tun_writes()
        if data:  # the first byte is the GRO segment size's low bits
            engine.process(memoryview(bytearray(data[1:])), data[0] * 8, source, 0.0)
            engine.handshake_messages.clear()
            # process() counts its own exceptions as drops (and logs the traceback): a crash
            assert not engine.counters["engine_error_rx"], "RxEngine raised (traceback above)"

    return one, seeds


def _cni_request() -> tuple[Callable[[bytes], None], list[bytes]]:
    from weavepy.cni.protocol import CniError, parse_request

    conf = {"cniVersion": "1.0.0", "name": "weavepy", "type": "weavepy-cni"}

    def one(data: bytes) -> None:
        # the first byte picks the command, the rest is stdin
        env = dict(CNI_ENV)
        if data:
            env["CNI_COMMAND"] = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")[data[0] % 6]
        try:
            parse_request(env, data[1:])
        except CniError as exc:
            assert exc.to_json("1.0.0")["msg"], exc

    return one, [b"\x00" + json.dumps(conf).encode(), b"\x01" + json.dumps(conf).encode()]


def _cni_server() -> tuple[Callable[[bytes], None], list[bytes]]:
    from weavepy.cni.protocol import CniError, CniRequest, ErrorCode
    from weavepy.cni.server import answer

    class RefusingBackend:
        """Every command is refused: the target is the server's decoding, not IPAM."""

        def _refuse(self, request: CniRequest) -> object:
            raise CniError(ErrorCode.TRY_AGAIN_LATER, "refused by the fuzz backend")

        add = delete = check = status = gc = _refuse

        def close(self) -> None:
            pass

    backend = RefusingBackend()
    conf = json.dumps({"cniVersion": "1.1.0", "name": "weavepy", "type": "weavepy-cni"})

    def one(data: bytes) -> None:
        reply = answer(backend, data)  # type: ignore[arg-type]
        assert reply.code != ErrorCode.INTERNAL, reply.stdout  # internal = a decoder bug
        json.loads(reply.to_wire())

    seed = json.dumps({"wire": 1, "env": CNI_ENV, "stdin": conf}).encode()
    return one, [seed]


BUILDERS: dict[str, Callable[[], tuple[Callable[[bytes], None], list[bytes]]]] = {
    "gossip_packet": _gossip_packet,
    "gossip_stream": _gossip_stream,
    "gossip_stream_encrypted": _gossip_stream_encrypted,
    "ipam_message": _ipam_message,
    "wireguard_datagram": _wireguard_datagram,
    "cni_request": _cni_request,
    "cni_server": _cni_server,
}


# ---------------------------------------------------------------------------- worker


def worker(name: str, corpus: Path, libfuzzer_args: list[str]) -> None:
    """Runs in its own process: instrument, seed the corpus, hand over to libFuzzer."""
    import atheris

    sys.path.insert(0, str(REPO))
    with atheris.instrument_imports():
        one, seeds = BUILDERS[name]()
    corpus.mkdir(parents=True, exist_ok=True)
    for index, seed in enumerate(seeds):
        path = corpus / f"seed-{index}"
        if not path.exists():
            path.write_bytes(seed)
    atheris.Setup([sys.argv[0], *libfuzzer_args, str(corpus)], one)
    atheris.Fuzz()


_DONE = re.compile(r"#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+) corp: (\d+)")
_STATUS = re.compile(r"#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)")


@dataclass
class FuzzResult:
    target: str
    executions: int
    seconds: float
    coverage: int  # edges libFuzzer saw
    corpus: int
    crashed: bool
    returncode: int
    crash_files: list[str]
    excerpt: str  # the start of the uncaught exception's report, if any


def fuzz_target(name: str, seconds: float | None, runs: int | None, workdir: Path) -> FuzzResult:
    """One target in a child process; what libFuzzer reported, and any crash."""
    corpus = workdir / "corpus" / name
    artifacts = workdir / "crashes" / name
    artifacts.mkdir(parents=True, exist_ok=True)
    args = [f"-artifact_prefix={artifacts}/", "-rss_limit_mb=2048", "-timeout=10",
            "-print_final_stats=1"]
    if seconds is not None:
        args.append(f"-max_total_time={int(seconds)}")
    if runs is not None:
        args.append(f"-runs={runs}")
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.fuzz_atheris", "--worker", name, "--corpus", str(corpus),
         "--", *args],
        cwd=REPO, capture_output=True, text=True, errors="replace",
        timeout=(seconds or 60) + 120,
    )
    elapsed = time.monotonic() - started
    log = proc.stderr + proc.stdout
    done = _DONE.findall(log) or _STATUS.findall(log)
    executions, coverage, _, corpus_size = (int(x) for x in done[-1]) if done else (0,) * 4
    crashed = proc.returncode != 0
    crash_files = sorted(str(p) for p in artifacts.iterdir()) if crashed else []
    excerpt = ""
    if crashed:
        lines = [ln for ln in log.splitlines() if ln.strip()]
        start = next((i for i, ln in enumerate(lines) if "Uncaught Python exception" in ln), 0)
        excerpt = "\n".join(lines[start : start + 25])
    return FuzzResult(name, executions, elapsed, coverage, corpus_size, crashed,
                      proc.returncode, crash_files, excerpt)


def run(args: list[str]) -> str:
    parser = argparse.ArgumentParser(prog="python -m bench fuzz_atheris")
    parser.add_argument("--seconds", type=float, default=60.0, help="per target")
    parser.add_argument("--targets", default=",".join(TARGETS))
    options = parser.parse_args(args)
    names = [n for n in options.targets.split(",") if n]
    unknown = [n for n in names if n not in BUILDERS]
    if unknown:
        raise SystemExit(f"Error: unknown fuzz target(s) {', '.join(unknown)} "
                         f"(have: {', '.join(TARGETS)})")
    results = [fuzz_target(n, options.seconds, None, WORKDIR) for n in names]
    from bench.common import no_anchor, table

    rows = [
        [r.target, f"{r.executions:,}", f"{r.seconds:.0f}",
         f"{r.executions / max(r.seconds, 1e-9):,.0f}", str(r.coverage), str(r.corpus),
         "CRASH" if r.crashed else "none"]
        for r in results
    ]
    out = [
        no_anchor("The numbers are executions, coverage and crashes of weavepy's decoders."),
        "",
        f"atheris (libFuzzer) for {options.seconds:g} s per target, one process each; corpora "
        f"kept in {WORKDIR}/corpus (seeded with serf captures and encoded messages), so a "
        "rerun continues from there. Rule: only the decoder's documented error, whatever "
        "the input.",
        "",
        table(["target", "executions", "s", "exec/s", "coverage (edges)", "corpus", "crashes"],
              rows),
    ]
    for r in results:
        if r.crashed:
            out += ["", f"**{r.target}** crashed (exit {r.returncode}); inputs: "
                    f"{', '.join(r.crash_files)}", "", "```", r.excerpt, "```"]
    return "\n".join(out)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fuzz_atheris")
    parser.add_argument("--worker", choices=TARGETS, required=True)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("libfuzzer", nargs="*")
    options = parser.parse_args(argv)
    os.environ.setdefault("PYTHONHASHSEED", "0")
    worker(options.worker, options.corpus, options.libfuzzer)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
