#!/usr/bin/env python3
"""A shaped link between this network namespace and another, for benchmarks.

    delayline.py NETNS INDEX RATE RTT

Creates a point-to-point link of two TUN devices, `sl<INDEX>a` here
(10.77.INDEX.1) and `sl<INDEX>b` in NETNS (10.77.INDEX.2), and carries every
packet between them after the link's serialisation time at RATE (e.g.
`1gbit`, `100mbit`) plus half of RTT (e.g. `10ms`), in each direction, in
order: what `tc qdisc ... netem rate R delay D` does on a kernel that has
netem (this one may not: then a veth pair cannot be delayed). TCP runs end
to end through it, so its window, slow start and round trips are real; only
the packets' carrier is this program. The devices' MTU is 65000, so a
gigabit needs ~2,000 packets a second, which Python keeps up with.

The queue of each direction holds at most one second of the link's bytes;
past that packets are dropped, as a router's buffer would. The program
runs until killed (by its pid); the devices vanish with it.
"""

import ctypes
import fcntl
import heapq
import os
import select
import struct
import subprocess
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
CLONE_NEWNET = 0x40000000
MTU = 65000


def parse_rate(text):
    units = {"gbit": 1e9, "mbit": 1e6, "kbit": 1e3, "bit": 1.0}
    for unit, scale in units.items():
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    raise SystemExit(f"delayline: bad rate {text!r} (e.g. 1gbit, 100mbit)")


def parse_ms(text):
    if not text.endswith("ms"):
        raise SystemExit(f"delayline: bad round trip {text!r} (e.g. 10ms)")
    return float(text[:-2]) / 1000.0


def open_tun(name):
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def run(*args):
    subprocess.run(args, check=True)


def main():
    if len(sys.argv) != 5:
        raise SystemExit(__doc__)
    netns, index, rate, rtt = sys.argv[1], int(sys.argv[2]), parse_rate(sys.argv[3]), parse_ms(sys.argv[4])
    here, there = f"sl{index}a", f"sl{index}b"
    a = open_tun(here)
    run("ip", "addr", "add", f"10.77.{index}.1", "peer", f"10.77.{index}.2", "dev", here)
    run("ip", "link", "set", here, "mtu", str(MTU), "up")
    libc = ctypes.CDLL(None, use_errno=True)
    ns = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    if libc.setns(ns, CLONE_NEWNET) != 0:
        raise SystemExit(f"delayline: setns {netns}: {os.strerror(ctypes.get_errno())}")
    b = open_tun(there)
    run("ip", "addr", "add", f"10.77.{index}.2", "peer", f"10.77.{index}.1", "dev", there)
    run("ip", "link", "set", there, "mtu", str(MTU), "up")
    run("ip", "link", "set", "lo", "up")
    print("ready", flush=True)

    delay = rtt / 2.0
    # Per direction: when the link is next free, and the packets in flight
    # as (due, sequence, bytes) so that equal due times keep their order.
    free_at = {a: 0.0, b: 0.0}
    queue = []
    seq = 0
    peer = {a: b, b: a}
    while True:
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, dst, packet = heapq.heappop(queue)
            try:
                os.write(dst, packet)
            except BlockingIOError:
                pass  # the receiving side is full: the packet is lost
        timeout = max(0.0, queue[0][0] - now) if queue else None
        readable, _, _ = select.select([a, b], [], [], timeout)
        now = time.monotonic()
        for fd in readable:
            while True:
                try:
                    packet = os.read(fd, MTU + 64)
                except BlockingIOError:
                    break
                start = max(now, free_at[fd])
                if start - now > 1.0:
                    continue  # a full queue drops what arrives
                free_at[fd] = start + len(packet) * 8 / rate
                seq += 1
                heapq.heappush(queue, (free_at[fd] + delay, seq, peer[fd], packet))


if __name__ == "__main__":
    main()
