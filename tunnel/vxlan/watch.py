"""tunnel.vxlan.watch: tells the agent at once when our VXLAN device is deleted or set down.

It owns `watch_device` (an RTMGRP_LINK subscription) and `device_events`, the pure filter from
link notifications to `DeviceEvent`s. The rule it keeps: once `nursery.start` returns, no
deletion is missed; a notification overflow is itself an event (anything may have happened).
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from dataclasses import dataclass

import trio

from tunnel.netlink import IFF_UP, RTMGRP_LINK, RtnlEvent, open_monitor_socket, parse_events

__all__ = ["DeviceEvent", "device_events", "watch_device"]


@dataclass(frozen=True)
class DeviceEvent:
    """Something happened to our device that calls for a reconcile now.

    reason: "deleted", "down", or "overflow" (the kernel dropped notifications, so anything
    may have happened).
    """

    device: str
    reason: str


def device_events(events: Iterable[RtnlEvent], device: str) -> list[DeviceEvent]:
    """The link notifications about `device` that need a reconcile (pure)."""
    found: list[DeviceEvent] = []
    for event in events:
        if event.kind != "link" or event.key != device:
            continue
        if event.action == "del":
            found.append(DeviceEvent(device, "deleted"))
        elif not int(event.detail.get("flags", "0")) & IFF_UP:
            found.append(DeviceEvent(device, "down"))
    return found


async def watch_device(
    device: str,
    send_channel: trio.MemorySendChannel[DeviceEvent],
    *,
    netns: str | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Send a DeviceEvent whenever `device` is deleted or set down (RTMGRP_LINK monitor).

    Start it with `await nursery.start(watch_device, name, send)`: it reports started once the
    subscription is live, so no deletion after that point is missed. Runs until cancelled.
    """
    sock = await trio.to_thread.run_sync(open_monitor_socket, RTMGRP_LINK, netns)
    with trio.socket.from_stdlib_socket(sock) as tsock:
        task_status.started()
        while True:
            try:
                data = await tsock.recv(1 << 16)
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    await send_channel.send(DeviceEvent(device, "overflow"))
                    continue
                raise
            for event in device_events(parse_events(data), device):
                await send_channel.send(event)
