"""An isolated lab of Linux network namespaces for real ``qisd start`` processes.

One *bridge* namespace holds a bridge that every public host's veth pair plugs into; each host
is a namespace of its own with one address in 198.18.0.0/24 (the benchmarking range, never
routed on the Internet) and no default route; *home* subnets (198.19.K.0/24) sit behind NAT
router namespaces that masquerade onto the bridge with nftables, their hosts' default route
pointing at the router, whose own table has no route out of the lab. Every namespace is
created with a per-lab prefix and deleted by name when the lab closes, also when a test fails.
Before any daemon starts, :meth:`Lab.check_isolated` asserts that no namespace of the lab has
a route to anything outside it.

Needs root and ``ip`` (iproute2); NAT also ``nft`` (nftables). :func:`unavailable` says why a
lab cannot be built here, for a skip reason. Links can be rate-limited with ``tc tbf`` (the
kernel here has no netem: delay and loss are the simulator's).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

LAB_NET = ipaddress.ip_network("198.18.0.0/24")
HOME_NETS = "198.19.{k}.0/24"
NAT_UDP_TIMEOUT = 8
"""Seconds a lab NAT keeps an idle UDP mapping (short, so a test sees it lapse)."""


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check)


def unavailable() -> str | None:
    """Why a lab cannot be built on this machine (None if it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed"
    probe = f"qlabprobe{os.getpid()}"
    made = _run("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    _run("ip", "netns", "delete", probe, check=False)
    return None


@dataclass
class Host:
    """One namespace and its address in the lab."""

    name: str
    address: str
    behind: str | None = None
    """The NAT router's namespace, for a home host."""

    def argv(self, *cmd: str) -> list[str]:
        """``cmd`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.name, *cmd]

    def counter(self, what: str = "rx_bytes", iface: str = "eth0") -> int:
        """A kernel interface counter of this host (bytes on the wire, not the daemon's)."""
        done = _run(*self.argv("cat", f"/sys/class/net/{iface}/statistics/{what}"))
        return int(done.stdout.strip())


@dataclass
class Lab:
    """A lab of namespaces (see the module docstring); a context manager that removes them."""

    prefix: str = field(default_factory=lambda: f"ql{os.getpid() % 100000}")
    hosts: list[Host] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)

    def __enter__(self) -> Lab:
        self.bridge = self._netns("br")
        self._ip(self.bridge, "link", "add", "br0", "type", "bridge")
        self._ip(self.bridge, "link", "set", "br0", "up")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Delete every namespace this lab made (their interfaces go with them)."""
        for name in reversed(self.namespaces):
            _run("ip", "netns", "delete", name, check=False)
        self.namespaces.clear()

    # -- building

    def _netns(self, suffix: str) -> str:
        name = f"{self.prefix}-{suffix}"
        _run("ip", "netns", "add", name)
        self.namespaces.append(name)
        self._ip(name, "link", "set", "lo", "up")
        return name

    @staticmethod
    def _ip(ns: str, *args: str) -> None:
        _run("ip", "-n", ns, *args)

    def _plug(self, ns: str, address: str, bridge_ns: str, bridge: str, tag: str) -> None:
        """A veth pair made inside the bridge namespace: one end on ``bridge``, the other
        moved into ``ns`` as eth0 with ``address`` (nothing touches the root namespace)."""
        peer = f"v{tag}"
        self._ip(
            bridge_ns, "link", "add", peer, "type", "veth", "peer", "name", "eth0", "netns", ns
        )
        self._ip(bridge_ns, "link", "set", peer, "master", bridge)
        self._ip(bridge_ns, "link", "set", peer, "up")
        self._ip(ns, "addr", "add", address, "dev", "eth0")
        self._ip(ns, "link", "set", "eth0", "up")

    def public_host(self) -> Host:
        """A host on the lab's bridge with the next address of 198.18.0.0/24."""
        n = len([h for h in self.hosts if h.behind is None]) + 1
        ns = self._netns(f"h{n}")
        address = str(LAB_NET.network_address + n)
        self._plug(ns, f"{address}/24", self.bridge, "br0", f"h{n}")
        host = Host(ns, address)
        self.hosts.append(host)
        return host

    def nat(self, k: int, homes: int, udp_timeout: int = NAT_UDP_TIMEOUT) -> list[Host]:
        """A NAT router (masquerade) on the bridge at 198.18.0.(200 + k), with ``homes``
        hosts behind it on 198.19.k.0/24; returns the home hosts. Its UDP mappings lapse
        after ``udp_timeout`` seconds idle (a home router's are 30 s or more)."""
        if shutil.which("nft") is None:
            raise RuntimeError("nftables ('nft') is not installed")
        router = self._netns(f"r{k}")
        outside = str(LAB_NET.network_address + 200 + k)
        self._plug(router, f"{outside}/24", self.bridge, "br0", f"r{k}")
        home_net = ipaddress.ip_network(HOME_NETS.format(k=k))
        self._ip(router, "link", "add", "home0", "type", "bridge")
        self._ip(router, "addr", "add", f"{home_net.network_address + 1}/24", "dev", "home0")
        self._ip(router, "link", "set", "home0", "up")
        _run("ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        rules = (
            "table ip qlab {\n"
            "  chain post { type nat hook postrouting priority 100; "
            f'oifname "eth0" ip saddr {home_net} masquerade; }}\n'
            "}\n"
        )
        subprocess.run(
            ["ip", "netns", "exec", router, "nft", "-f", "-"],
            input=rules,
            text=True,
            check=True,
            capture_output=True,
        )
        _run(
            "ip",
            "netns",
            "exec",
            router,
            "sysctl",
            "-qw",
            f"net.netfilter.nf_conntrack_udp_timeout={udp_timeout}",
            f"net.netfilter.nf_conntrack_udp_timeout_stream={udp_timeout}",
        )
        out = []
        for j in range(homes):
            ns = self._netns(f"r{k}h{j + 1}")
            address = str(home_net.network_address + 10 + j)
            self._plug(ns, f"{address}/24", router, "home0", f"r{k}h{j + 1}")
            self._ip(ns, "route", "add", "default", "via", str(home_net.network_address + 1))
            host = Host(ns, address, behind=router)
            self.hosts.append(host)
            out.append(host)
        return out

    def router_address(self, host: Host) -> str:
        """The outside address of the NAT router ``host`` sits behind."""
        assert host.behind is not None, f"{host.name} is behind no NAT"
        k = int(host.behind.rsplit("r", 1)[1])
        return str(LAB_NET.network_address + 200 + k)

    def limit(self, host: Host, rate: str = "1mbit") -> None:
        """Rate-limit ``host``'s outgoing traffic with a token bucket filter (``tc tbf``)."""
        _run(
            *host.argv(
                "tc",
                "qdisc",
                "add",
                "dev",
                "eth0",
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                "32kbit",
                "latency",
                "400ms",
            )
        )

    def bridge_port(self, host: Host) -> str:
        """The bridge's veth port ``host``'s frames cross (its router's, for a home host)."""
        ns = host.behind if host.behind is not None else host.name
        return f"v{ns.rsplit('-', 1)[1]}"

    def partition(self, left: list[Host], right: list[Host]) -> None:
        """Cut the bridge between ``left`` and ``right``: frames between their ports are
        dropped (nftables in the bridge namespace), as a broken link between two sites is."""
        a = ", ".join(sorted({f'"{self.bridge_port(h)}"' for h in left}))
        b = ", ".join(sorted({f'"{self.bridge_port(h)}"' for h in right}))
        rules = (
            "table bridge qcut {\n chain cut {\n  type filter hook forward priority 0;\n"
            f"  iifname {{ {a} }} oifname {{ {b} }} drop\n"
            f"  iifname {{ {b} }} oifname {{ {a} }} drop\n }}\n}}\n"
        )
        subprocess.run(
            ["ip", "netns", "exec", self.bridge, "nft", "-f", "-"],
            input=rules,
            text=True,
            check=True,
            capture_output=True,
        )

    def heal(self) -> None:
        """Undo :meth:`partition`."""
        _run("ip", "netns", "exec", self.bridge, "nft", "delete", "table", "bridge", "qcut")

    # -- checking

    def check_isolated(self) -> None:
        """Assert that no namespace of the lab routes anywhere outside the lab's networks.

        A public host and a router have only their connected routes; a home host's default
        route points at its router, which itself has none: a packet to any other address
        is dropped inside the lab.
        """
        lab_nets = [LAB_NET, ipaddress.ip_network("198.19.0.0/16")]
        for ns in self.namespaces:
            routes = _run("ip", "-n", ns, "-4", "route", "show").stdout.splitlines()
            for line in routes:
                dest = line.split()[0]
                if dest == "default":
                    via = line.split()[2]
                    router = ipaddress.ip_address(via)
                    assert any(router in net for net in lab_nets), (ns, line)
                    host = next(h for h in self.hosts if h.name == ns)
                    assert host.behind is not None, (ns, line)
                    router_routes = _run("ip", "-n", host.behind, "-4", "route", "show").stdout
                    assert "default" not in router_routes, (host.behind, router_routes)
                    continue
                net = ipaddress.ip_network(dest, strict=False)
                assert any(net.subnet_of(n) for n in lab_nets), (ns, line)


def data_dir(root: Path, host: Host) -> Path:
    """A data directory for the daemon of ``host`` under ``root``."""
    path = root / host.name
    path.mkdir(parents=True, exist_ok=True)
    return path
