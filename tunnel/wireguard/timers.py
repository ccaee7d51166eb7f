"""Every timer rule of the WireGuard protocol, in one place (whitepaper section 6).

Constants (`TimerConfig`, overridable so tests can shorten them):

    constant                  default        meaning
    ------------------------  -------------  --------------------------------------------------
    rekey_after_messages      2**60          initiator rekeys after sending this many messages
    reject_after_messages     2**64-2**13-1  a keypair never sends or accepts beyond this counter
    rekey_after_time          120 s          initiator rekeys a keypair this old when it sends
    reject_after_time         180 s          a keypair this old is never used again
    rekey_attempt_time        90 s           stop retrying an unanswered handshake after this
    rekey_timeout             5 s            retry an unanswered initiation after this (+jitter)
    rekey_timeout_jitter_max  0.334 s        uniform jitter added to retries and new handshakes
    keepalive_timeout         10 s           send a keepalive if we received data and sent none
    cookie_refresh_time       120 s          cookie secret / received cookie lifetime
    handshake_initiation_rate 1/50 s         at most one consumed initiation per peer this often
    under_load_after_time     1 s            how long "under load" lasts once triggered

Timers of one peer (`PeerTimers`), each a deadline or None, and what sets, clears and fires them:

    timer                 set by                                 cleared by       on expiry
    --------------------  -------------------------------------  ---------------  ---------------
    retransmit_handshake  initiation sent (rekey_timeout+jitter) handshake done   resend, or give
                                                                                  up after max
                                                                                  attempts
    send_keepalive        data received, unless pending (10 s)   any packet sent  keepalive
    new_handshake         data sent, unless pending              any packet       new handshake
                          (keepalive+rekey timeout+jitter)       received
    zero_key_material     session derived; giving up (3*reject)  -                zero all keys
    persistent_keepalive  any authenticated packet in or out     -                keepalive

Plus two send/receive rules that are checked inline, not timed (wireguard-go's keepKeyFresh):
the initiator of the current keypair starts a handshake when it sends on a keypair older than
rekey_after_time or past rekey_after_messages, and once when it receives on a keypair older than
reject_after_time - keepalive_timeout - rekey_timeout.

The rule it keeps: nothing here reads a clock or sends anything. Hooks record `now`; `expired`
returns the actions due, and the device performs them.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TimerConfig:
    rekey_after_messages: int = 1 << 60
    reject_after_messages: int = (1 << 64) - (1 << 13) - 1
    rekey_after_time: float = 120.0
    reject_after_time: float = 180.0
    rekey_attempt_time: float = 90.0
    rekey_timeout: float = 5.0
    rekey_timeout_jitter_max: float = 0.334
    keepalive_timeout: float = 10.0
    cookie_refresh_time: float = 120.0
    handshake_initiation_rate: float = 1.0 / 50
    under_load_after_time: float = 1.0

    @property
    def max_handshake_attempts(self) -> int:
        """Retries before giving up: rekey_attempt_time / rekey_timeout (18 by default)."""
        return int(self.rekey_attempt_time // self.rekey_timeout)


class TimerAction(enum.Enum):
    RETRANSMIT_HANDSHAKE = "retransmit handshake"
    GIVE_UP_HANDSHAKE = "give up handshake"
    SEND_KEEPALIVE = "send keepalive"
    NEW_HANDSHAKE = "new handshake"
    ZERO_KEY_MATERIAL = "zero key material"
    PERSISTENT_KEEPALIVE = "persistent keepalive"


class PeerTimers:
    """The five timers of one peer and the event hooks that move them."""

    __slots__ = (
        "_config",
        "_random",
        "handshake_attempts",
        "need_another_keepalive",
        "new_handshake",
        "persistent_keepalive",
        "persistent_keepalive_interval",
        "retransmit_handshake",
        "send_keepalive",
        "sent_last_minute_handshake",
        "zero_key_material",
    )

    def __init__(
        self, config: TimerConfig, rng: random.Random, persistent_keepalive_interval: float = 0
    ) -> None:
        self._config = config
        self._random = rng
        self.persistent_keepalive_interval = persistent_keepalive_interval
        self.retransmit_handshake: float | None = None
        self.send_keepalive: float | None = None
        self.new_handshake: float | None = None
        self.zero_key_material: float | None = None
        self.persistent_keepalive: float | None = None
        self.handshake_attempts = 0
        self.need_another_keepalive = False
        self.sent_last_minute_handshake = False

    def _jitter(self) -> float:
        return self._random.uniform(0.0, self._config.rekey_timeout_jitter_max)

    # ------------------------------------------------------------------ event hooks

    def data_sent(self, now: float) -> None:
        if self.new_handshake is None:
            c = self._config
            self.new_handshake = now + c.keepalive_timeout + c.rekey_timeout + self._jitter()

    def data_received(self, now: float) -> None:
        if self.send_keepalive is None:
            self.send_keepalive = now + self._config.keepalive_timeout
        else:
            self.need_another_keepalive = True

    def any_authenticated_packet_sent(self) -> None:
        self.send_keepalive = None

    def any_authenticated_packet_received(self) -> None:
        self.new_handshake = None

    def any_authenticated_packet_traversal(self, now: float) -> None:
        if self.persistent_keepalive_interval > 0:
            self.persistent_keepalive = now + self.persistent_keepalive_interval

    def handshake_initiated(self, now: float) -> None:
        self.retransmit_handshake = now + self._config.rekey_timeout + self._jitter()

    def handshake_complete(self) -> None:
        self.retransmit_handshake = None
        self.handshake_attempts = 0
        self.sent_last_minute_handshake = False

    def session_derived(self, now: float) -> None:
        self.zero_key_material = now + 3 * self._config.reject_after_time

    def keepalive_fired(self, now: float) -> None:
        """After the keepalive of SEND_KEEPALIVE went out: re-arm if more data came meanwhile."""
        if self.need_another_keepalive:
            self.need_another_keepalive = False
            self.send_keepalive = now + self._config.keepalive_timeout

    def stop(self) -> None:
        self.retransmit_handshake = self.send_keepalive = self.new_handshake = None
        self.zero_key_material = self.persistent_keepalive = None

    # ------------------------------------------------------------------ expiry

    def next_deadline(self) -> float | None:
        deadlines = [
            d
            for d in (
                self.retransmit_handshake,
                self.send_keepalive,
                self.new_handshake,
                self.zero_key_material,
                self.persistent_keepalive,
            )
            if d is not None
        ]
        return min(deadlines) if deadlines else None

    def expired(self, now: float) -> list[TimerAction]:
        """Fire every due timer (in wireguard-go's order) and return what the peer must do."""
        actions: list[TimerAction] = []
        if self.retransmit_handshake is not None and now >= self.retransmit_handshake:
            self.retransmit_handshake = None
            if self.handshake_attempts > self._config.max_handshake_attempts:
                self.send_keepalive = None
                if self.zero_key_material is None:
                    self.zero_key_material = now + 3 * self._config.reject_after_time
                actions.append(TimerAction.GIVE_UP_HANDSHAKE)
            else:
                self.handshake_attempts += 1
                actions.append(TimerAction.RETRANSMIT_HANDSHAKE)
        if self.send_keepalive is not None and now >= self.send_keepalive:
            self.send_keepalive = None
            actions.append(TimerAction.SEND_KEEPALIVE)  # then the device calls keepalive_fired
        if self.new_handshake is not None and now >= self.new_handshake:
            self.new_handshake = None
            actions.append(TimerAction.NEW_HANDSHAKE)
        if self.zero_key_material is not None and now >= self.zero_key_material:
            self.zero_key_material = None
            actions.append(TimerAction.ZERO_KEY_MATERIAL)
        if self.persistent_keepalive is not None and now >= self.persistent_keepalive:
            self.persistent_keepalive = None
            if self.persistent_keepalive_interval > 0:
                actions.append(TimerAction.PERSISTENT_KEEPALIVE)
        return actions
