"""Placement at scale: 10 000 simulated peers on an 80-stage model, driven by the real decision
functions (``shards.placement.choose_stages`` / ``should_move``, ``peers.training.routing.plan_routes``,
``peers.joining.measure.stage_bytes`` / ``network_tokens_per_second``), against Petals' rule and an offline bound.

    .venv/bin/python benchmarks/placement_sim.py                 # 10 000 peers, 80 stages, ~40 s
    .venv/bin/python benchmarks/placement_sim.py --peers 200 --stages 16 --periods 20

What is simulated (time in rebalancing periods):

* Peers arrive over the first ``--arrive`` periods and leave after an exponential lifetime (mean
  ``--lifetime`` periods); until the shock each departure is replaced by a newcomer. At ``--shock``
  every peer holding one stage leaves at once (a region goes down) and nobody new arrives after it:
  only moves can fill that stage (the hard case for rebalancing).
* A peer's machine is drawn from a mix of GPUs and CPUs (compute tokens/s for one stage, free memory,
  link speed, each with noise). Its memory and the model's stage size (parameters + gradients + AdamW
  state, from a Llama-style config on the meta device) bound how many stages it may hold.
* A joining peer claims by the rule under test. Every serving peer wakes once per period at a random
  time; if the rule says move, it waits a delay that shrinks with its gain (so the peer that gains most
  goes first), looks again at the *current* loads and moves only if the move still holds. A claim counts
  at once (the peer announces ``loading``); the stage serves after ``--load-time`` periods.

Figures: the bottleneck (min over stages of the throughput of online peers) for swarm's rule and for
Petals' rule (a server takes as many blocks as fit, at the window whose sorted throughputs are
lexicographically least; it moves when its re-chosen window would raise the swarm's minimum by
1/balance_quality = 1/0.75), the number of moves, the longest time a stage had no peer, and two bounds
on the optimum of the final swarm: the offline solver's placement (all final peers known at once, placed
greedily by ``choose_stages``, largest first), a lower bound; and the relaxation
bound (every peer's full capacity ``min(compute, stages * network)`` spread evenly), an upper bound.
Being within 5% of the upper bound means being within 5% of the optimum.

With ``--averaging SECONDS`` a replica costs what it costs in training (``shards.placement.ReplicaCost``):
each step (``--step-tokens``) the replicas of a stage average its parameters (a quarter of the stage's
bytes) in a round of that many seconds plus the traffic over the peer's link. Swarm's rule then
places by effective loads, and both rules are also reported by their *effective* bottleneck (tokens/s
a stage trains once its averaging is paid), the figure training sees.
"""

from __future__ import annotations

import harness  # noqa: F401  (before any project module: this checkout first on sys.path)

import argparse
import functools
import heapq
import math
import random
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from core.errors import InsufficientMemory
from shards.placement import (
    PlacedPeer,
    ReplicaCost,
    Span,
    choose_stages,
    effective_loads,
    contribution,
    rebalancing_needed,
    should_move,
    spans_that_fit,
)

GIB = 2**30

# name, share of peers, compute tokens/s for one stage (fwd+bwd), memory GiB, link Mbps (median)
MACHINES = [
    ("H100 80GB", 0.03, 70_000, 80, 5_000),
    ("A100 80GB", 0.04, 40_000, 80, 2_000),
    ("A100 40GB", 0.03, 38_000, 40, 2_000),
    ("RTX 4090", 0.15, 25_000, 24, 300),
    ("RTX 3090", 0.15, 12_000, 24, 200),
    ("RTX 3060", 0.10, 4_000, 12, 100),
    ("T4", 0.10, 2_500, 16, 500),
    ("CPU 64 GiB", 0.10, 250, 64, 500),
    ("CPU 32 GiB", 0.15, 150, 32, 100),
    ("CPU 16 GiB", 0.15, 80, 16, 50),
]


@dataclass
class SimPeer:
    peer_id: str
    compute: float
    network: float  # tokens/s the link carries
    memory: int
    link: float = math.inf  # bytes/s of its link (averaging traffic)
    span: Span | None = None
    online_at: float = math.inf
    alive: bool = True
    longest: int = 1  # stages its memory holds
    rebalancing: bool = False  # this peer's hysteresis state (``rebalancing_needed``)

    def placed(self) -> PlacedPeer:
        return PlacedPeer(self.peer_id, self.compute, self.span, self.network)

    def share(self) -> float:
        return contribution(self.compute, self.span.count, self.network)


@dataclass
class Result:
    rule: str
    bottleneck: float
    upper_bound: float
    offline: float
    moves: int
    joins: int
    refused: int
    max_empty: float
    empty_time: float
    series: list[tuple[int, float, float]] = field(default_factory=list)  # (period, bottleneck, upper bound)
    routing: float = 1.0  # bottleneck stage: makespan of microbatches spread by plan_routes over the ideal
    effective: float = 0.0  # the bottleneck once replicas' averaging is paid (``--averaging``)

    @property
    def vs_upper(self) -> float:
        return self.bottleneck / self.upper_bound if self.upper_bound else 0.0


# -- the model and the machines ----------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def model_stage_bytes(num_stages: int) -> list[int]:
    """Stage sizes of a Llama-style model of ``num_stages`` layers (hidden 4096, MLP 11008), one layer a
    stage, counted by the real ``peers.joining.measure.stage_bytes`` (fp32 parameters, gradients, AdamW)."""
    import torch
    from transformers import LlamaConfig

    from peers.joining.measure import stage_bytes
    from core.types import LayerRange

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                         num_hidden_layers=num_stages, vocab_size=32000)
    one = stage_bytes(config, LayerRange(start=0, end=1), torch.float32)
    return [one] * num_stages


def draw_machine(seed: int, peer_id: str) -> SimPeer:
    """The machine of ``peer_id``: the same under every rule (its own RNG, seeded by run and name)."""
    import torch

    from peers.joining.measure import network_tokens_per_second

    rng = random.Random(f"{seed}:{peer_id}")
    name, _, compute, memory, link = rng.choices(MACHINES, weights=[m[1] for m in MACHINES])[0]
    mbps = link * rng.lognormvariate(0, 0.5)
    return SimPeer(
        peer_id=peer_id,
        compute=compute * rng.lognormvariate(0, 0.25),
        network=network_tokens_per_second(mbps, 4096, torch.float16),  # activations travel as float16
        memory=int(memory * GIB * rng.uniform(0.6, 0.85)),
        link=mbps * 1e6 / 8,
    )


# -- Petals' rule, for comparison --------------------------------------------------------------------


def petals_choose(loads: np.ndarray, sizes: list[int], peer: SimPeer) -> Span:
    """Petals: as many blocks as memory allows, at the window whose sorted throughputs are least
    (lexicographically; ties to the lowest start)."""
    count = peer.longest
    windows = np.sort(np.lib.stride_tricks.sliding_window_view(loads, count), axis=1)
    best = int(np.lexsort(windows.T[::-1])[0])  # lexsort's last key is the primary one
    return Span(best, count)


def petals_should_move(loads: np.ndarray, sizes: list[int], peer: SimPeer, balance_quality: float = 0.75):
    # a server holding k stages leaves at least one of the k+1 least-served stages as it is: when even
    # that one is within balance_quality of the minimum, no window can pass the test (exact shortcut)
    if len(loads) > peer.longest and np.partition(loads, peer.longest)[peer.longest] * balance_quality <= loads.min():
        return None
    # nor when even the least-served stage, given all this server brings, stays within balance_quality
    low = loads.min()
    if (low + contribution(peer.compute, peer.longest, peer.network)) * balance_quality <= low:
        return None
    without = loads.copy()
    without[peer.span.start:peer.span.start + peer.span.count] -= peer.share()
    new = petals_choose(without, sizes, peer)
    if new == peer.span:
        return None
    after = without.copy()
    after[new.start:new.start + new.count] += contribution(peer.compute, new.count, peer.network)
    return new if after.min() * balance_quality > loads.min() else None


# -- the event loop ----------------------------------------------------------------------------------


class Simulation:
    """One run of arrivals, departures, a shock and periodic re-evaluation under one placement rule."""

    def __init__(self, args: argparse.Namespace, rule: str):
        self.args, self.rule = args, rule
        self.rng = random.Random(args.seed)  # decisions and wake-up times
        self.fate = random.Random(args.seed + 1)  # arrivals and departures: the same under every rule
        self.sizes = list(model_stage_bytes(args.stages))
        self.loads = np.zeros(args.stages)  # claimed (loading + online)
        self.claimers = np.zeros(args.stages, dtype=np.int64)
        self.peers: dict[str, SimPeer] = {}
        self.events: list[tuple[float, int, str, str]] = []
        self.counter = 0
        self.moves = self.joins = self.refused = 0
        self.empty_since: dict[int, float] = {}
        self.max_empty = self.empty_time = 0.0
        self.now = 0.0
        self._gate: dict[bool, bool] = {}  # rebalancing_needed(loads, margin, active) until loads change

    # events
    def push(self, when: float, kind: str, peer_id: str) -> None:
        self.counter += 1
        heapq.heappush(self.events, (when, self.counter, kind, peer_id))

    def run(self) -> Result:
        args = self.args
        for i in range(args.peers):
            self.push(self.fate.uniform(0, args.arrive), "arrive", f"p{i}")
        self.push(args.shock, "shock", "")
        series = []
        for period in range(args.periods):
            end = float(period + 1)
            while self.events and self.events[0][0] < end:
                self.now, _, kind, peer_id = heapq.heappop(self.events)
                getattr(self, f"_on_{kind}")(peer_id)
            self.now = end
            self.loads = self._recount()  # no floating drift from many small updates
            self._gate.clear()
            series.append((period, self._online_bottleneck(), self._upper_bound()))
            if self.args.verbose:
                print(f"    [{self.rule}] period {period}: {len(self.peers)} peers, bottleneck "
                      f"{series[-1][1] / series[-1][2]:.3f} of bound, claimed {self.loads.min() / series[-1][2]:.3f}, "
                      f"moves so far {self.moves}")
        self._close_empty()
        return Result(self.rule, series[-1][1], series[-1][2], self._offline(), self.moves, self.joins, self.refused,
                      self.max_empty, self.empty_time, series, self.routing_spread(), self._effective())

    def _on_arrive(self, peer_id: str) -> None:
        peer = draw_machine(self.args.seed, peer_id)
        try:
            peer.longest = spans_that_fit(self.sizes, peer.memory)
            span = self._choose(peer)
        except InsufficientMemory:  # this machine cannot hold a stage: it does not join
            self.refused += 1
            return
        self.peers[peer_id] = peer
        self.joins += 1
        self._claim(peer, span)
        lifetime = random.Random(f"{self.args.seed}:life:{peer_id}").expovariate(1 / self.args.lifetime)
        self.push(self.now + lifetime, "leave", peer_id)
        self.push(math.floor(self.now) + 1 + self.rng.random(), "wake", peer_id)

    def _on_leave(self, peer_id: str) -> None:
        peer = self.peers.get(peer_id)
        if peer is None or not peer.alive:
            return
        self._release(peer)
        peer.alive = False
        del self.peers[peer_id]
        if self.args.arrive < self.now < self.args.shock:  # someone new takes the place of who left
            self.push(self.now + random.Random(f"{self.args.seed}:next:{peer_id}").uniform(0, 1), "arrive",
                      f"{peer_id}+")

    def _on_shock(self, _: str) -> None:
        stage = self.args.stages // 2
        gone = [p for p in self.peers.values() if stage in p.span.stages]
        for peer in gone:
            self._on_leave(peer.peer_id)
        print(f"  [{self.rule}] period {self.now:.0f}: shock, {len(gone)} peers holding stage {stage} left")

    def _on_wake(self, peer_id: str) -> None:
        peer = self.peers.get(peer_id)
        if peer is None:
            return
        self.push(self.now + 1, "wake", peer_id)  # once a period, at this peer's random phase
        if self.now < peer.online_at:
            return  # still loading: no decision on a half-made move
        move = self._should_move(peer)
        if move is not None:
            gain = getattr(move, "gain", 1.0)
            delay = 0.25 * self.rng.random() / (1 + min(gain, 10.0))
            self.push(self.now + delay, "confirm", peer_id)

    def _on_confirm(self, peer_id: str) -> None:
        peer = self.peers.get(peer_id)
        if peer is None or self.now < peer.online_at:
            return
        move = self._should_move(peer)  # the loads may have changed while this peer waited
        if move is None:
            return
        new = move.new if hasattr(move, "new") else move
        kept = peer.span.start <= new.start and new.end <= peer.span.end  # a shrink: nothing to load
        self._release(peer)
        self._claim(peer, new, load=not kept)
        self.moves += 1

    # the rules
    def _cost(self, link: float) -> ReplicaCost | None:
        """What a replica costs in training, as a peer with this link sees it (None: ``--averaging 0``)."""
        if not self.args.averaging:
            return None
        return ReplicaCost(step_tokens=self.args.step_tokens, round_seconds=self.args.averaging,
                           param_bytes=tuple(size / 4 for size in self.sizes), bandwidth=link)

    def _effective(self) -> float:
        """The final swarm's bottleneck once every stage's averaging is paid (over the median link)."""
        if not self.args.averaging:
            return self._online_bottleneck()
        links = sorted(p.link for p in self.peers.values())
        return float(effective_loads(self._recount(), self.claimers, self._cost(links[len(links) // 2])).min())

    def _choose(self, peer: SimPeer) -> Span:
        if self.rule == "petals":
            return petals_choose(self.loads, self.sizes, peer)
        return choose_stages(self.loads, self.sizes, compute=peer.compute, memory_bytes=peer.memory,
                             network=peer.network, rng=self.rng, replicas=self.claimers, cost=self._cost(peer.link))

    def _should_move(self, peer: SimPeer):
        if self.rule == "petals":
            return petals_should_move(self.loads, self.sizes, peer)
        if self.args.averaging:  # effective loads differ per peer (its link): no shared cache
            return should_move(self.loads, self.sizes, peer.placed(), memory_bytes=peer.memory,
                               margin=self.args.margin, replicas=self.claimers, cost=self._cost(peer.link))
        peer.rebalancing = self._needed(peer.rebalancing)
        if not peer.rebalancing:
            return None  # should_move's own first check would answer the same; this one is cached
        return should_move(self.loads, self.sizes, peer.placed(), memory_bytes=peer.memory,
                           margin=self.args.margin, active=peer.rebalancing)

    def _needed(self, active: bool) -> bool:
        if active not in self._gate:
            self._gate[active] = rebalancing_needed(self.loads, self.args.margin, active)
        return self._gate[active]

    # bookkeeping
    def _claim(self, peer: SimPeer, span: Span, *, load: bool = True) -> None:
        self._gate.clear()
        peer.span = span
        peer.online_at = self.now + (self.args.load_time if load else 0.0)
        self.loads[span.start:span.start + span.count] += peer.share()
        self.claimers[span.start:span.start + span.count] += 1
        for stage in span.stages:
            started = self.empty_since.pop(stage, None)
            if started is not None:
                self._empty_for(self.now - started)

    def _release(self, peer: SimPeer) -> None:
        self._gate.clear()
        span = peer.span
        self.loads[span.start:span.start + span.count] -= peer.share()
        self.claimers[span.start:span.start + span.count] -= 1
        for stage in span.stages:
            if self.claimers[stage] == 0 and self.now > self.args.arrive:
                self.empty_since.setdefault(stage, self.now)

    def _empty_for(self, duration: float) -> None:
        self.max_empty = max(self.max_empty, duration)
        self.empty_time += duration

    def _close_empty(self) -> None:
        for started in self.empty_since.values():
            self._empty_for(self.now - started)

    def _recount(self) -> np.ndarray:
        loads = np.zeros(self.args.stages)
        for peer in self.peers.values():
            loads[peer.span.start:peer.span.start + peer.span.count] += peer.share()
        return loads

    def _online_bottleneck(self) -> float:
        loads = np.zeros(self.args.stages)
        for peer in self.peers.values():
            if peer.online_at <= self.now:
                loads[peer.span.start:peer.span.start + peer.span.count] += peer.share()
        return float(loads.min())

    def _upper_bound(self) -> float:
        total = sum(min(p.compute, p.longest * p.network) for p in self.peers.values())
        return total / self.args.stages

    def routing_spread(self, tokens: int = 2048) -> float:
        """Run ``plan_routes`` over the final swarm's records of the bottleneck stage, three microbatches
        per replica, and return the makespan over the ideal (every replica busy in parallel, each by its
        throughput): 1.0 is perfect."""
        from dht.schemas import PeerRecord, PeerState
        from peers.training.routing import plan_routes
        from core.types import LayerRange

        stage = int(np.argmin(self._recount()))
        layers = LayerRange(start=stage, end=stage + 1)
        records = [PeerRecord(peer_id=p.peer_id, stage=0, layers=layers, state=PeerState.ONLINE,
                              throughput=p.share()) for p in self.peers.values() if stage in p.span.stages]
        microbatches = 3 * len(records)
        routes = plan_routes([layers], {0: records}, microbatches, tokens=tokens, rng=self.rng)
        speed = {r.peer_id: r.throughput for r in records}
        given: dict[str, int] = {}
        for route in routes:
            given[route[0].peer_id] = given.get(route[0].peer_id, 0) + 1
        slowest = max(count * tokens / speed[peer] for peer, count in given.items())
        return slowest / (microbatches * tokens / sum(speed.values()))

    def _offline(self) -> float:
        """All final peers known at once: largest capacity first, each placed by ``choose_stages``. A
        feasible placement, so a lower bound on the optimum."""
        peers = sorted(self.peers.values(), key=lambda p: -min(p.compute, p.network))
        loads = np.zeros(self.args.stages)
        for peer in peers:
            span = choose_stages(loads, self.sizes, compute=peer.compute, memory_bytes=peer.memory,
                                 network=peer.network)
            loads[span.start:span.start + span.count] += contribution(peer.compute, span.count, peer.network)
        return float(loads.min())


# -- reporting ---------------------------------------------------------------------------------------


def simulate(args: argparse.Namespace, rule: str) -> Result:
    return Simulation(args, rule).run()


def verdict(ours: Result, petals: Result, *, target: float = 0.95, averaging: bool = False) -> tuple[bool, str]:
    if averaging:  # the raw bound does not count averaging: judge what training sees, against Petals' rule
        ok = ours.effective >= petals.effective and ours.max_empty <= 1.0
        return ok, (f"VERDICT: {'PASS' if ok else 'FAIL'}: effective bottleneck (averaging paid) "
                    f"{ours.effective:,.0f} tok/s, {ours.effective / max(petals.effective, 1e-9):.2f}x Petals' rule "
                    f"(target >= 1), longest empty stage {ours.max_empty:.2f} periods (target <= 1), {ours.moves} moves")
    within = ours.vs_upper >= target
    filled = ours.max_empty <= 1.0
    ok = within and filled
    return ok, (
        f"VERDICT: {'PASS' if ok else 'FAIL'}: bottleneck {ours.vs_upper:.1%} of the upper bound on the optimum "
        f"(target >= {target:.0%}), {ours.bottleneck / max(petals.bottleneck, 1e-9):.2f}x Petals' rule, "
        f"longest empty stage {ours.max_empty:.2f} periods (target <= 1), {ours.moves} moves"
    )


def _print(result: Result, seconds: float) -> None:
    print(f"  {result.rule:7s} bottleneck {result.bottleneck:12,.0f} tok/s | offline solver {result.offline:12,.0f} | "
          f"upper bound {result.upper_bound:12,.0f} | {result.vs_upper:6.1%} of bound | moves {result.moves:6d} | "
          f"joins {result.joins} (refused {result.refused}) | longest empty stage {result.max_empty:.2f} periods, "
          f"total {result.empty_time:.2f} | routing {result.routing:.2f}x ideal | effective (averaging paid) "
          f"{result.effective:,.0f} tok/s | {seconds:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=10_000)
    parser.add_argument("--stages", type=int, default=80)
    parser.add_argument("--periods", type=int, default=24, help="rebalancing periods simulated")
    parser.add_argument("--arrive", type=float, default=8.0, help="periods over which the first peers arrive")
    parser.add_argument("--lifetime", type=float, default=100.0, help="mean periods a peer stays")
    parser.add_argument("--shock", type=float, default=14.5, help="period when one stage's peers all leave")
    parser.add_argument("--load-time", type=float, default=0.3, help="periods to load a stage")
    parser.add_argument("--margin", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--averaging", type=float, default=0.0,
                        help="seconds of an averaging round beyond its traffic (0: replicas are free, the old model)")
    parser.add_argument("--step-tokens", type=float, default=262_144, help="tokens a training step holds")
    parser.add_argument("--verbose", action="store_true", help="print every period")
    args = parser.parse_args(argv)
    print(f"placement simulation: {args.peers} peers, {args.stages} stages, {args.periods} periods, "
          f"margin {args.margin:.0%}, seed {args.seed}")
    results, started_all = {}, time.perf_counter()
    for rule in ("swarm", "petals"):
        started = time.perf_counter()
        results[rule] = simulate(args, rule)
        _print(results[rule], time.perf_counter() - started)
    ours = results["swarm"]
    print("  bottleneck / upper bound by period (swarm, petals): " + ", ".join(
        f"{p}: {a / u:.2f}/{b / u:.2f}" for (p, a, u), (_, b, _) in
        zip(ours.series, results["petals"].series) if u and p % 3 == 2))
    ok, line = verdict(ours, results["petals"], averaging=bool(args.averaging))
    print(f"  ran in {time.perf_counter() - started_all:.1f} s wall, {time.process_time():.1f} s CPU")
    print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
