"""Hosts in Linux network namespaces, for the benchmarks and tests that need real networks: a router
namespace forwarding between "public" hosts, "homes" behind a NAT router of their own, and the swarm
processes run in them. Needs root (``ip netns``) and, for homes, ``nft`` (scripts/install.sh).

Topology. Every public host ``<prefix><name>`` has one veth link ``<net>.<i>.2/24`` to the router
``<prefix>router`` (``<net>.<i>.1``). A home ``<prefix><home>`` is a public host too, but a router:
it masquerades the subnet ``192.168.<j>.0/24`` behind it (its hosts, ``<prefix><home>-<name>``, at
``192.168.<j>.<k>``) and drops every new connection coming in from outside, with no port forwarding,
as a home router does. Its hosts can dial out; nobody outside can dial them.

Everything is removed by ``close()`` (also what a ``with`` block does on its way out): the processes
in the namespaces are killed, the namespaces deleted. Traffic stays inside: the namespaces have no
link to the machine's own network.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["Network", "Processes", "sh", "in_ns", "netns_unavailable"]


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


def in_ns(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh("ip", "netns", "exec", ns, *args, check=check)


def netns_unavailable(nat: bool = False) -> str | None:
    """Why namespaces (and with ``nat``, NAT routers) cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root to make network namespaces (ip netns)"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip`"
    if nat and shutil.which("nft") is None:
        return "needs nftables' `nft` for the NAT routers (scripts/install.sh installs it as root)"
    return None


class Network:
    """Namespaces named ``prefix`` + host, public hosts on ``net``.<i>.0/24 behind one router."""

    def __init__(self, prefix: str, net: str = "10.77", mtu: int = 1500):
        self.prefix, self.net, self.mtu = prefix, net, mtu
        self.router = f"{prefix}router"
        self.namespaces: list[str] = []
        self.links = 0  # public links made so far
        self.homes = 0
        self._ips: dict[str, str] = {}
        self._devs: dict[str, str] = {}
        self.public: list[str] = []  # the hosts on the router (a home's router among them)

    def ns(self, host: str) -> str:
        return f"{self.prefix}{host}"

    def ip(self, host: str) -> str:
        return self._ips[host]

    def router_dev(self, host: str) -> str:
        """The router's end of a public host's link (where shaping and policy rules go)."""
        return self._devs[host]

    def __enter__(self) -> "Network":
        self.close()  # leftovers of an earlier run that was killed hard
        self._add_ns(self.router)
        for key in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"):
            in_ns(self.router, "sysctl", "-qw", key)
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _add_ns(self, ns: str) -> None:
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        in_ns(ns, "ip", "link", "set", "lo", "up")

    def _link(self, outer: str, outer_ip: str | None, inner: str, inner_ip: str, name: str) -> None:
        """A veth between namespaces ``outer`` (the router side, ``swr<name>``, at ``outer_ip`` unless
        it is bridged) and ``inner`` (``eth0``)."""
        here, there = f"swr{name}", f"swh{name}"
        sh("ip", "link", "add", here, "mtu", str(self.mtu), "type", "veth", "peer", "name", there, "mtu", str(self.mtu))
        sh("ip", "link", "set", here, "netns", outer)
        sh("ip", "link", "set", there, "netns", inner)
        if outer_ip:
            in_ns(outer, "ip", "addr", "add", outer_ip, "dev", here)
        in_ns(outer, "ip", "link", "set", here, "up")
        in_ns(inner, "ip", "link", "set", there, "name", "eth0")
        in_ns(inner, "ip", "addr", "add", inner_ip, "dev", "eth0")
        in_ns(inner, "ip", "link", "set", "eth0", "up")

    def add_host(self, host: str) -> str:
        """A public host; returns its address."""
        i = self.links = self.links + 1
        self._add_ns(self.ns(host))
        self._link(self.router, f"{self.net}.{i}.1/24", self.ns(host), f"{self.net}.{i}.2/24", f"{self.prefix[:3]}{i}")
        in_ns(self.ns(host), "ip", "route", "add", "default", "via", f"{self.net}.{i}.1")
        self._ips[host] = f"{self.net}.{i}.2"
        self._devs[host] = f"swr{self.prefix[:3]}{i}"
        self.public.append(host)
        return self._ips[host]

    def add_home(self, home: str, hosts: list[str]) -> list[str]:
        """A NAT router ``home`` on the public network and ``hosts`` behind it (named ``home-host``);
        returns their (private) addresses."""
        router = self.ns(home)
        self.add_host(home)
        in_ns(router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        j = self.homes = self.homes + 1
        # the home's LAN: one bridge in the home router, a veth per host to it
        in_ns(router, "ip", "link", "add", "lan", "type", "bridge")
        in_ns(router, "ip", "addr", "add", f"192.168.{j}.1/24", "dev", "lan")
        in_ns(router, "ip", "link", "set", "lan", "up")
        addresses = []
        for k, host in enumerate(hosts, start=2):
            name = f"{home}-{host}"
            self._add_ns(self.ns(name))
            self._link(router, None, self.ns(name), f"192.168.{j}.{k}/24",
                       f"{self.prefix[:3]}h{j}{k}")
            in_ns(router, "ip", "link", "set", f"swr{self.prefix[:3]}h{j}{k}", "master", "lan")
            in_ns(self.ns(name), "ip", "route", "add", "default", "via", f"192.168.{j}.1")
            self._ips[name] = f"192.168.{j}.{k}"
            addresses.append(self._ips[name])
        rules = (f"table ip home {{\n"
                 f"  chain forward {{ type filter hook forward priority 0; policy accept;\n"
                 f"    iifname \"eth0\" ct state new drop;\n"
                 f"    iifname \"eth0\" ct state invalid drop;\n  }}\n"
                 f"  chain input {{ type filter hook input priority 0; policy accept;\n"
                 f"    iifname \"eth0\" ct state new drop;\n  }}\n"
                 f"  chain postrouting {{ type nat hook postrouting priority 100;\n"
                 f"    oifname \"eth0\" ip saddr 192.168.{j}.0/24 masquerade;\n  }}\n"
                 f"}}\n")
        subprocess.run(["ip", "netns", "exec", router, "nft", "-f", "-"], input=rules, text=True, check=True,
                       capture_output=True)
        return addresses

    def close(self) -> None:
        """Kill every process in the namespaces and delete them (also those of an earlier run with
        this prefix)."""
        listed = sh("ip", "netns", "list", check=False).stdout.split("\n")
        names = {line.split()[0] for line in listed if line.startswith(self.prefix)} | set(self.namespaces)
        for ns in names:
            for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        for ns in names:
            sh("ip", "netns", "del", ns, check=False)
        self.namespaces = []


class Processes:
    """Python processes started in the namespaces of a ``Network``, each logging to ``root/<host>.log``;
    ``stop()`` ends them all (SIGINT, then SIGKILL after 30 s)."""

    def __init__(self, network: Network, root: Path):
        self.network, self.root = network, root
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, host: str, argv: list[str], **popen) -> subprocess.Popen:
        log = open(self.root / f"{host}.log", "w")
        popen.setdefault("stdout", log)
        proc = subprocess.Popen(["ip", "netns", "exec", self.network.ns(host), sys.executable, *argv], stderr=log,
                                env=os.environ | {"PYTHONUNBUFFERED": "1"}, start_new_session=True, **popen)
        self.procs.append((host, proc))
        return proc

    def wait_line(self, host: str, needle: str, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        path = self.root / f"{host}.log"
        while time.monotonic() < deadline:
            for line in path.read_text(errors="replace").splitlines():
                if needle in line:
                    return line
            time.sleep(0.1)
        raise TimeoutError(f"{host} did not print {needle!r}; see {path}")

    def kill(self, host: str) -> None:
        """SIGKILL ``host``'s process and everything it started (its DHT child, p2pd)."""
        for name, proc in self.procs:
            if name == host and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
