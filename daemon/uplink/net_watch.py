"""Supervised component: tells the uplink when the network comes up, so returning coverage is used at once.

A modem that regains its data session, Wi-Fi that associates in the depot, a cable plugged in: each shows
up as rtnetlink messages (an interface up and running, an address or a route added). The uplink retries
with a backoff that grows to a minute, so without this a vehicle back in coverage could sit offline for most
of a minute. On such a change the watcher waits a moment for the burst to settle (addresses, routes and DNS
follow each other) and then cuts the uplink's backoff short. Changes that only take something away are
ignored: the uplink notices a dead link by itself.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# <linux/rtnetlink.h>, <linux/if.h>
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
GROUPS = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE
RTM_NEWLINK = 16
RTM_NEWADDR = 20
RTM_NEWROUTE = 24
IFF_UP = 0x1
IFF_RUNNING = 0x40
NLMSG_HDR = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, seq, pid
IFINFOMSG = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
SETTLE_S = 2.0


def comes_up(data: bytes) -> bool:
    """Whether a datagram of rtnetlink messages adds connectivity: a link up and running, a new address or a
    new route. A truncated or malformed message ends the walk (the rest is not trusted)."""
    offset = 0
    while offset + NLMSG_HDR.size <= len(data):
        length, kind, _flags, _seq, _pid = NLMSG_HDR.unpack_from(data, offset)
        if length < NLMSG_HDR.size or offset + length > len(data):
            return False
        if kind in (RTM_NEWADDR, RTM_NEWROUTE):
            return True
        if kind == RTM_NEWLINK and length >= NLMSG_HDR.size + IFINFOMSG.size:
            flags = IFINFOMSG.unpack_from(data, offset + NLMSG_HDR.size)[3]
            if flags & IFF_UP and flags & IFF_RUNNING:
                return True
        offset += (length + 3) & ~3  # NLMSG_ALIGN
    return False


class NetWatch:
    name = "net-watch"
    expected_errors = (OSError,)

    def __init__(self, on_up: Callable[[], Any], settle_s: float = SETTLE_S) -> None:
        self._on_up = on_up
        self._settle_s = settle_s

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        with socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, socket.NETLINK_ROUTE
        ) as sock:
            sock.bind((0, GROUPS))
            while True:
                try:
                    up = comes_up(await loop.sock_recv(sock, 65536))
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        raise
                    up = True  # the kernel dropped messages for us: something happened, assume the best
                if not up:
                    continue
                await asyncio.sleep(self._settle_s)
                _discard_pending(sock)
                woke = self._on_up()
                log.info("network came up", extra={"uplink_woken": bool(woke)})


def _discard_pending(sock: socket.socket) -> None:
    """What arrived while settling belongs to the same change."""
    while True:
        try:
            sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno != errno.ENOBUFS:
                raise
