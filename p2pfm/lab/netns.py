"""Emulated hosts on one machine: one Linux network namespace per host, joined by a bridge.

Each host gets its own namespace with an ``eth0`` (one end of a veth pair
whose other end sits on a bridge in a hub namespace) and an address in
198.18.0.0/24 (RFC 2544's benchmarking range). The addresses exist only
inside the namespaces made here, and everything is deleted on exit. A host's
uplink can be limited with ``tc`` (:func:`limit_rate`: a token bucket, which
every kernel here has; ``netem`` is often missing).

Needs root and iproute2; :class:`NetnsUnavailable` says why not.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

SUBNET = "198.18.0"  # /24; hosts are .1, .2, ...
_TIMEOUT_S = 20


class NetnsUnavailable(RuntimeError):
    """Namespaces (or tc) cannot be used here: not root, no iproute2, or the kernel refused."""


@dataclass(frozen=True)
class Host:
    """One emulated host: a namespace and its address on the bridge."""

    namespace: str
    address: str

    def command(self, *argv: str) -> list[str]:
        """``argv`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.namespace, *argv]


def _ip(*args: str) -> None:
    try:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=_TIMEOUT_S)
    except FileNotFoundError as exc:
        raise NetnsUnavailable("iproute2 (`ip`) is not installed") from exc
    except subprocess.CalledProcessError as exc:
        raise NetnsUnavailable(f"`ip {' '.join(args)}` failed: {exc.stderr.strip()}") from exc


@contextmanager
def hosts(count: int, *, tag: str | None = None) -> Iterator[list[Host]]:
    """``count`` hosts on one bridge, deleted when the block ends (also on errors)."""
    if not 1 <= count <= 250:
        raise ValueError(f"hosts: count must be in 1..250, got {count}")
    tag = tag or f"p2pfm{os.getpid() % 100000}"
    hub = f"{tag}-hub"
    made = [Host(f"{tag}-h{i}", f"{SUBNET}.{i + 1}") for i in range(count)]
    try:
        _ip("netns", "add", hub)
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "link", "set", "br0", "up")
        for i, host in enumerate(made):
            _ip("netns", "add", host.namespace)
            hub_end, host_end = f"{tag}b{i}", f"{tag}n{i}"
            _ip("link", "add", hub_end, "type", "veth", "peer", "name", host_end)
            _ip("link", "set", hub_end, "netns", hub)
            _ip("-n", hub, "link", "set", hub_end, "master", "br0")
            _ip("-n", hub, "link", "set", hub_end, "up")
            _ip("link", "set", host_end, "netns", host.namespace)
            _ip("-n", host.namespace, "link", "set", host_end, "name", "eth0")
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", host.namespace, "link", "set", "eth0", "up")
            _ip("-n", host.namespace, "link", "set", "lo", "up")
        yield made
    finally:
        for namespace in [*(h.namespace for h in made), hub]:
            subprocess.run(
                ["ip", "netns", "del", namespace], capture_output=True, timeout=_TIMEOUT_S, check=False
            )


def limit_rate(
    host: Host, *, rate_bytes_per_s: float, burst_bytes: int = 32_768, latency_s: float = 10.0
) -> str:
    """Cap ``host``'s uplink (everything it sends) with a token bucket; returns the tc command used.

    The burst should be small against the messages, so that a message's
    transfer takes ``size / rate``; ``latency_s`` bounds how long a packet
    may queue before tbf drops it (TCP resends it; keep it long).
    """
    rate_bit_s = max(8, round(rate_bytes_per_s * 8))
    argv = [
        "tc", "qdisc", "add", "dev", "eth0", "root", "tbf",
        "rate", f"{rate_bit_s}bit", "burst", str(burst_bytes), "latency", f"{round(latency_s * 1000)}ms",
    ]  # fmt: skip
    result = subprocess.run(
        host.command(*argv), capture_output=True, text=True, timeout=_TIMEOUT_S, check=False
    )
    if result.returncode != 0:
        raise NetnsUnavailable(f"tc tbf failed in {host.namespace}: {result.stderr.strip()}")
    return " ".join(argv[4:])


def limit_links(host: Host, rates_bytes_per_s: dict[str, float], *, burst_bytes: int = 32_768) -> str:
    """Cap what ``host`` sends to each address at its own rate (one HTB class per destination).

    Each link gets its own bandwidth, as paths across a wide-area network do,
    where :func:`limit_rate` shares one uplink among all of them. Traffic to
    other addresses is not limited. Returns a summary of what was applied.
    """

    def tc(*argv: str) -> None:
        result = subprocess.run(
            host.command("tc", *argv), capture_output=True, text=True, timeout=_TIMEOUT_S, check=False
        )
        if result.returncode != 0:
            raise NetnsUnavailable(f"tc {' '.join(argv)} failed in {host.namespace}: {result.stderr.strip()}")

    tc("qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb", "default", "99")
    tc("class", "add", "dev", "eth0", "parent", "1:", "classid", "1:99", "htb", "rate", "10gbit")
    applied = []
    for index, (address, rate) in enumerate(sorted(rates_bytes_per_s.items()), start=10):
        rate_bit_s = max(8, round(rate * 8))
        tc("class", "add", "dev", "eth0", "parent", "1:", "classid", f"1:{index}", "htb",
           "rate", f"{rate_bit_s}bit", "ceil", f"{rate_bit_s}bit", "burst", str(burst_bytes))  # fmt: skip
        tc("filter", "add", "dev", "eth0", "parent", "1:", "protocol", "ip", "prio", "1", "u32",
           "match", "ip", "dst", f"{address}/32", "flowid", f"1:{index}")  # fmt: skip
        applied.append(f"{address} {rate_bit_s}bit")
    return "eth0 htb, per destination: " + ", ".join(applied)


def impair(host: Host, *, delay_ms: int = 40, loss_percent: float = 5.0) -> str:
    """A lossy, slow uplink: netem delay and loss where the kernel has netem, else a 100 kbit/s tbf.

    Returns what was applied. The project's CI kernel has no netem module;
    tbf is there, and at 100 kbit/s it delays every ~9 KB message by most
    of a second: a slow link in all but name.
    """
    argv = [
        "tc",
        "qdisc",
        "add",
        "dev",
        "eth0",
        "root",
        "netem",
        "delay",
        f"{delay_ms}ms",
        "loss",
        f"{loss_percent}%",
    ]
    netem = subprocess.run(
        host.command(*argv), capture_output=True, text=True, timeout=_TIMEOUT_S, check=False
    )
    if netem.returncode == 0:
        return f"netem delay {delay_ms}ms loss {loss_percent}%"
    try:
        limit_rate(host, rate_bytes_per_s=100_000 / 8, burst_bytes=2048, latency_s=2.0)
    except NetnsUnavailable as exc:
        raise NetnsUnavailable(
            f"neither tc netem ({netem.stderr.strip()}) nor tbf ({exc}) is available"
        ) from exc
    return f"tbf rate 100kbit (netem unavailable: {netem.stderr.strip()})"
