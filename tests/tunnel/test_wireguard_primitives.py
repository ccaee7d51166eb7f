"""Primitives, replay window, cookies and the handshake functions, against published vectors
and against each other. No I/O."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel.wireguard.cookie import CookieChecker, CookieGenerator, LoadMonitor, RateLimiter
from tunnel.wireguard.keys import (
    CryptoError,
    PrivateKey,
    PublicKey,
    WeakPublicKey,
    hchacha20,
    hmac_blake2s,
    kdf1,
    kdf2,
    kdf3,
    tai64n,
    xaead_open,
    xaead_seal,
)
from tunnel.wireguard.messages import CookieReply, Initiation, MalformedMessage, padded_length
from tunnel.wireguard.noise import (
    Handshake,
    HandshakeError,
    HandshakeState,
    consume_initiation,
    consume_response,
    create_initiation,
    create_response,
    derive_keys,
    open_initiation,
)
from tunnel.wireguard.replay import WINDOW_SIZE, ReplayWindow

LIMIT = (1 << 64) - (1 << 13) - 1


def test_hchacha20_matches_the_xchacha_draft_vector() -> None:
    # draft-irtf-cfrg-xchacha-03 section 2.2.1
    key = bytes(range(32))
    nonce = bytes.fromhex("000000090000004a0000000031415927")
    assert hchacha20(key, nonce).hex() == (
        "82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc"
    )


def test_xchacha20_poly1305_matches_the_draft_aead_vector() -> None:
    # draft-irtf-cfrg-xchacha-03 appendix A.3.1
    key = bytes(range(0x80, 0xA0))
    nonce = bytes(range(0x40, 0x58))
    aad = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
    plaintext = (
        b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for "
        b"the future, sunscreen would be it."
    )
    sealed = xaead_seal(key, nonce, plaintext, aad)
    assert sealed[:32].hex() == "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb"
    assert sealed[-16:].hex() == "c0875924c1c7987947deafd8780acf49"
    assert xaead_open(key, nonce, sealed, aad) == plaintext
    with pytest.raises(CryptoError):
        xaead_open(key, nonce, sealed, aad + b"x")


def test_hmac_and_kdf_follow_rfc5869_with_blake2s() -> None:
    key, data = b"k" * 32, b"input"
    assert hmac_blake2s(key, data) == hmac.new(key, data, hashlib.blake2s).digest()
    prk = hmac.new(key, data, hashlib.blake2s).digest()
    t1 = hmac.new(prk, b"\x01", hashlib.blake2s).digest()
    t2 = hmac.new(prk, t1 + b"\x02", hashlib.blake2s).digest()
    t3 = hmac.new(prk, t2 + b"\x03", hashlib.blake2s).digest()
    assert kdf1(key, data) == t1
    assert kdf2(key, data) == (t1, t2)
    assert kdf3(key, data) == (t1, t2, t3)


def test_keys_round_trip_base64_and_refuse_bad_input() -> None:
    private = PrivateKey.generate()
    again = PrivateKey.from_base64(private.to_base64())
    assert again.public_key == private.public_key
    assert PublicKey.from_base64(private.public_key.to_base64()) == private.public_key
    with pytest.raises(ValueError):
        PublicKey.from_base64("not base64!")
    with pytest.raises(ValueError):
        PublicKey(b"short")
    with pytest.raises(WeakPublicKey):
        private.exchange(PublicKey(bytes(32)))


def test_tai64n_is_ordered_and_whitened() -> None:
    a, b = tai64n(1_700_000_000.0), tai64n(1_700_000_000.5)
    assert len(a) == 12 and a < b
    assert int.from_bytes(a[8:], "big") & 0xFFFFFF == 0
    # two times within the whitening granularity (~16.8 ms) give the same label
    assert tai64n(1_700_000_000.001) == tai64n(1_700_000_000.002)


def test_padding_rounds_to_16_but_never_past_the_mtu() -> None:
    assert padded_length(0, 1420) == 0
    assert padded_length(1, 1420) == 16
    assert padded_length(1408, 1420) == 1408
    assert padded_length(1415, 1420) == 1420
    assert padded_length(1420, 1420) == 1420


# ---------------------------------------------------------------------------- replay window


def test_replay_window_accepts_each_counter_once() -> None:
    window = ReplayWindow()
    assert window.accept(0, LIMIT)
    assert not window.accept(0, LIMIT)
    assert window.accept(2, LIMIT)
    assert window.accept(1, LIMIT)
    assert not window.accept(1, LIMIT)
    assert not window.check(2, LIMIT)


def test_replay_window_edges_and_limit() -> None:
    window = ReplayWindow()
    top = WINDOW_SIZE + 100
    assert window.accept(top, LIMIT)
    assert window.accept(top - WINDOW_SIZE, LIMIT)  # the oldest counter still inside
    assert not window.accept(top - WINDOW_SIZE - 1, LIMIT)  # just behind the window
    assert window.accept(top + 10_000_000, LIMIT)  # big jump clears the ring
    assert not window.accept(top, LIMIT)
    assert not window.accept(LIMIT, LIMIT)
    assert not window.accept(LIMIT + 5, LIMIT)


@given(st.lists(st.integers(min_value=0, max_value=20_000), max_size=300))
def test_replay_window_matches_a_set_model(counters: list[int]) -> None:
    window = ReplayWindow()
    seen: set[int] = set()
    highest = -1
    for counter in counters:
        expected = counter not in seen and (highest < 0 or highest - counter <= WINDOW_SIZE)
        assert window.accept(counter, LIMIT) == expected
        if expected:
            seen.add(counter)
            highest = max(highest, counter)


# ---------------------------------------------------------------------------- handshake


def _pair() -> tuple[Handshake, Handshake, PrivateKey, PrivateKey]:
    a, b = PrivateKey.generate(), PrivateKey.generate()
    psk = bytes(range(32))
    return Handshake(a, b.public_key, psk), Handshake(b, a.public_key, psk), a, b


def test_full_handshake_derives_matching_keys() -> None:
    ini, res, _, b = _pair()
    init = create_initiation(ini, 1111, wall_time=1_700_000_000.0)
    opened = open_initiation(b, Initiation.parse(init.pack()))
    assert opened.remote_static == ini.local_static.public_key
    consume_initiation(res, opened, now=0.0, min_interval=0.02)
    response = create_response(res, 2222)
    responder_keys = derive_keys(res)
    consume_response(ini, response)
    initiator_keys = derive_keys(ini)
    assert initiator_keys.send_key == responder_keys.receive_key
    assert initiator_keys.receive_key == responder_keys.send_key
    assert initiator_keys.is_initiator and not responder_keys.is_initiator
    assert (initiator_keys.local_index, initiator_keys.remote_index) == (1111, 2222)
    assert (responder_keys.local_index, responder_keys.remote_index) == (2222, 1111)
    assert ini.state is HandshakeState.ZEROED and res.state is HandshakeState.ZEROED


def test_replayed_and_flooding_initiations_are_refused_without_state_change() -> None:
    ini, res, _, b = _pair()
    first = create_initiation(ini, 1, wall_time=1_700_000_000.0)
    consume_initiation(res, open_initiation(b, first), now=10.0, min_interval=0.02)
    state_after = (res.hash, res.chain_key, res.remote_index)
    with pytest.raises(HandshakeError) as replay:
        consume_initiation(res, open_initiation(b, first), now=20.0, min_interval=0.02)
    assert replay.value.reason == "handshake_replay"
    newer = create_initiation(ini, 2, wall_time=1_700_000_001.0)
    with pytest.raises(HandshakeError) as flood:
        consume_initiation(res, open_initiation(b, newer), now=10.01, min_interval=0.02)
    assert flood.value.reason == "handshake_flood"
    assert (res.hash, res.chain_key, res.remote_index) == state_after


def test_a_wrong_static_key_cannot_open_or_answer() -> None:
    ini, _, _, _ = _pair()
    stranger = PrivateKey.generate()
    init = create_initiation(ini, 1, wall_time=1_700_000_000.0)
    with pytest.raises(HandshakeError) as err:
        open_initiation(stranger, init)
    assert err.value.reason == "decrypt_failed"
    # a responder record that expects someone else refuses the initiation's timestamp
    _, res, _, b = _pair()
    with pytest.raises(HandshakeError):
        consume_initiation(res, open_initiation(b, init), now=0.0, min_interval=0.0)


def test_operations_out_of_order_are_refused() -> None:
    ini, res, _, _ = _pair()
    with pytest.raises(HandshakeError):
        create_response(res, 1)
    with pytest.raises(HandshakeError):
        derive_keys(ini)


def test_tampered_response_is_refused_and_state_kept() -> None:
    ini, res, _, b = _pair()
    init = create_initiation(ini, 7, wall_time=1_700_000_000.0)
    consume_initiation(res, open_initiation(b, init), now=0.0, min_interval=0.0)
    response = create_response(res, 8)
    forged = type(response)(response.sender, response.receiver, response.ephemeral, bytes(16))
    with pytest.raises(HandshakeError):
        consume_response(ini, forged)
    assert ini.state is HandshakeState.INITIATION_CREATED
    consume_response(ini, response)


# ---------------------------------------------------------------------------- cookies


def test_cookie_round_trip_gives_a_valid_mac2() -> None:
    responder = PrivateKey.generate()
    checker = CookieChecker(responder.public_key, refresh_time=120.0)
    generator = CookieGenerator(responder.public_key, refresh_time=120.0)
    source = ("198.18.0.11", 51820)
    message = generator.add_macs(bytes(148), now=0.0)
    assert checker.check_mac1(message)
    assert not checker.check_mac2(message, source, now=0.0)
    reply = CookieReply.parse(checker.create_reply(message, 42, source, now=0.0))
    assert reply.receiver == 42
    assert generator.consume_reply(reply, now=0.1)
    again = generator.add_macs(bytes(148), now=0.2)
    assert checker.check_mac2(again, source, now=0.2)
    assert not checker.check_mac2(again, ("198.18.0.12", 51820), now=0.2)
    # the cookie expires with the refresh time on both sides
    late = generator.add_macs(bytes(148), now=200.0)
    assert late[-16:] == bytes(16)
    # a corrupted mac1 fails
    assert not checker.check_mac1(message[:-20] + b"\x00" * 4 + message[-16:])


def test_load_monitor_and_rate_limiter() -> None:
    load = LoadMonitor(threshold_per_second=3, hold_time=1.0)
    for _ in range(3):
        load.note_handshake(0.0)
    assert not load.under_load(0.0)
    load.note_handshake(0.1)
    assert load.under_load(0.2) and load.under_load(1.05) and not load.under_load(1.2)
    limiter = RateLimiter(per_second=20, burst=5)
    allowed = sum(limiter.allow("198.18.0.11", 0.0) for _ in range(10))
    assert allowed == 5
    assert limiter.allow("198.18.0.12", 0.0)
    assert limiter.allow("198.18.0.11", 0.06)


def test_messages_refuse_wrong_lengths() -> None:
    with pytest.raises(MalformedMessage) as err:
        Initiation.parse(bytes(147))
    assert err.value.reason == "bad_length"


@given(
    st.lists(st.integers(min_value=0, max_value=300), max_size=20),
    st.integers(min_value=0, max_value=400),
    st.integers(min_value=1, max_value=64),
)
def test_replay_runs_match_single_accepts(before: list[int], first: int, count: int) -> None:
    single, batched = ReplayWindow(), ReplayWindow()
    for counter in before:
        single.accept(counter, LIMIT)
        batched.accept(counter, LIMIT)
    if batched.accepts_run(first, count, LIMIT):
        batched.accept_run(first, count)
        assert all(single.accept(c, LIMIT) for c in range(first, first + count))
        for probe in range(0, first + count + 70):
            assert single.check(probe, LIMIT) == batched.check(probe, LIMIT)
