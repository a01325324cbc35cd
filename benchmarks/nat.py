"""Training through peers behind NAT: tokens/s of the same 3-stage swarm with every peer public, with
the stage-1 peer behind a NAT router ("one home": its callers reach it through a relay), and with the
stage-1 and stage-2 peers behind two different NATs ("two homes": activations between them cross a
relay too), one configuration after the other in one run. Needs root (``ip netns``) and ``nft``.

    .venv/bin/python benchmarks/nat.py               # no WAN shaping
    .venv/bin/python benchmarks/nat.py --wan         # wan.py's WAN: 25 ms each way, 100 Mbit/s links

Topology and processes as ``wan.py`` (``benchmarks/netns.py``); a home is a router namespace that
masquerades its LAN and drops every new connection from outside. The relays are whatever the peers
pick (reachable peers first, then the bootstrap). Prints tokens/s per configuration (median of
``--rounds``), the ratio to the public run (target >= 0.8) and what the relay costs per hop: the extra
milliseconds a step takes, divided by the hops of a step that cross a relay (calls into a peer behind
NAT: its forward and its backward; it dials out directly). Everything is removed at the end.
"""

from __future__ import annotations

import harness  # before any project module: this checkout first on sys.path
from netns import Network, netns_unavailable

import json
import os
import signal
import statistics
import sys
import time

import wan

CONFIGS = {"public": (), "one home": ("peer2",), "two homes": ("peer2", "peer3")}
# the hops of a step that cross a relay: only calls *into* a peer behind NAT do (it dials out
# directly): the forward and the backward into stage 1, and with two homes those into stage 2 too
RELAYED_HOPS = {"public": 0, "one home": 2, "two homes": 4}


def build(config: str, mtu: int) -> tuple[Network, tuple[str, ...]]:
    """The network of ``config``: its peers' host names (homes' hosts are ``homeN-peer``)."""
    net = Network("swt-", net="11.85", mtu=mtu).__enter__()  # public-looking: a relay needs a public address (net.relay)
    for host in ("boot", "trainer", "peer1"):
        net.add_host(host)
    peers = ["peer1"]
    for k, host in enumerate(("peer2", "peer3"), start=1):
        if host in CONFIGS[config]:
            net.add_home(f"home{k}", ["peer"])
            peers.append(f"home{k}-peer")
        else:
            net.add_host(host)
            peers.append(host)
    return net, tuple(peers)


def measure(config: str, root, model_dir, args) -> list[float]:
    """tokens/s of ``args.rounds`` rounds of ``args.steps`` steps in ``config``."""
    net, peers = build(config, wan.MTU)
    swarm, delay = wan.Swarm(net, root, args), None
    try:
        if args.wan:
            delay = wan.start_delay(net, args.delay_ms)
        address = swarm.up(model_dir, peers)
        trainer = swarm.trainer(address)
        wan.shape(net, args.wan, delay is not None)
        tokens = args.steps * args.batch * args.seq

        def timed(steps: int) -> float:
            trainer.stdin.write(f"{steps}\n")
            trainer.stdin.flush()
            return json.loads(trainer.stdout.readline())["seconds"]

        timed(args.warmup)
        results = []
        for r in range(args.rounds):
            seconds = timed(args.steps)
            results.append(tokens / seconds)
            print(f"{config}, round {r + 1}: {tokens / seconds:8,.0f} tokens/s ({seconds / args.steps * 1000:.0f} "
                  f"ms/step)", flush=True)
        relayed = [line for host in peers for line in (root / f"{host}.log").read_text(errors="replace").splitlines()
                   if "reachable through relay" in line and "net.relay" in line]
        print(f"{config}: {len(relayed)} relay slot(s) taken: {'; '.join(r.split('net.relay: ')[1][:60] for r in relayed)}",
              flush=True)
        return results
    finally:
        wan.teardown(swarm, delay, net)


def main() -> None:
    parser = harness.parser(__doc__)
    wan.add_run_flags(parser)
    parser.add_argument("--wan", action="store_true", help="wan.py's WAN: 25 ms each way, 100 Mbit/s per link")
    args = parser.parse_args()
    args.relay = args.phased = False  # wan.Swarm's trainer: pushed peer to peer, backwards overlapping forwards
    if why := netns_unavailable(nat=True):
        sys.exit(f"nat.py {why}")

    from swarm.demo import DEMO_MODEL

    root, model_dir = harness.workspace("swarm-nat-", **DEMO_MODEL)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # finally: in measure() cleans up on a kill too
    print(f"demo model GPT-2 {DEMO_MODEL['num_layers']} x {DEMO_MODEL['hidden_size']}, 3 stages on 3 peers, batch "
          f"{args.batch}x{args.seq}, microbatch {args.microbatch}, wire {args.wire}, "
          f"{'WAN 25 ms each way + 100 Mbit/s' if args.wan else 'no WAN shaping'}; logs in {root}", flush=True)
    medians = {}
    for config in CONFIGS:
        folder = root / config.replace(" ", "-")
        folder.mkdir()
        medians[config] = statistics.median(measure(config, folder, model_dir, args))
        time.sleep(1)
    public = medians["public"]
    step_ms = {c: args.batch * args.seq / m * 1000 for c, m in medians.items()}
    for config, median in medians.items():
        hops = RELAYED_HOPS[config]
        cost = f"; the relay costs {(step_ms[config] - step_ms['public']) / hops:.1f} ms per relayed hop" if hops else ""
        print(f"{config:9}: {median:8,.0f} tokens/s  ratio to public {median / public:.2f} (target >= 0.8){cost}")
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
