"""A small run of the placement simulator (the real placement functions, 200 peers, 16 stages): the
swarm's rule ends near the optimum, beats Petals' rule after a stage is wiped out, and never leaves a
stage empty for a rebalancing period. The 10 000-peer run is ``benchmarks/placement_sim.py``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "placement_sim.py"


@pytest.fixture(scope="module")
def sim():
    # the simulator imports its sibling ``harness`` as a script does, from its own folder
    sys.path.insert(0, str(_PATH.parent))
    spec = importlib.util.spec_from_file_location("placement_sim", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["placement_sim"] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("placement_sim", None)
        sys.modules.pop("harness", None)
        sys.path.remove(str(_PATH.parent))


def _args(sim, **overrides) -> list[str]:
    argv = ["--peers", "200", "--stages", "16", "--periods", "20", "--shock", "12.5", "--seed", "0"]
    for key, value in overrides.items():
        argv += [f"--{key}", str(value)]
    return argv


def test_small_swarm_ends_near_the_optimum_and_fills_the_wiped_stage(sim, capsys):
    code = sim.main(_args(sim) + ["--verbose"])
    out = capsys.readouterr().out
    ours = _figures(out, "swarm")
    petals = _figures(out, "petals")
    assert ours["offline"] <= ours["upper"]
    assert ours["bottleneck"] >= 0.8 * ours["upper"], out
    assert ours["bottleneck"] >= 1.2 * petals["bottleneck"], out
    assert ours["empty"] <= 1.0 and ours["moves"] > 0
    assert 1.0 <= ours["routing"] <= 1.3  # plan_routes keeps the bottleneck stage's replicas evenly busy
    assert "shock" in out and "VERDICT:" in out.splitlines()[-1]
    assert code in (0, 1)


def test_no_moves_in_a_quiet_swarm(sim):
    args = sim.main.__globals__["argparse"].Namespace(
        peers=150, stages=8, periods=8, arrive=3.0, lifetime=1e9, shock=1e9, load_time=0.3, margin=0.15,
        seed=3, verbose=False, averaging=0.0, step_tokens=262_144)
    result = sim.simulate(args, "swarm")
    assert result.max_empty == 0.0
    assert result.bottleneck >= 0.85 * result.upper_bound
    assert result.moves <= 5  # joins place peers well; a quiet swarm barely moves


def _figures(out: str, rule: str) -> dict[str, float]:
    line = next(line for line in out.splitlines() if line.strip().startswith(f"{rule} "))
    def number(after: str) -> float:
        return float(line.split(after, 1)[1].split()[0].replace(",", ""))
    return {"bottleneck": number("bottleneck"), "offline": number("offline solver"), "upper": number("upper bound"),
            "moves": number("moves"), "empty": number("longest empty stage"),
            "routing": float(line.split("routing", 1)[1].split("x")[0])}


def test_with_averaging_paid_swarm_trains_at_least_as_fast_as_petals(sim, capsys):
    code = sim.main(_args(sim) + ["--averaging", "0.5"])
    out = capsys.readouterr().out
    assert "effective (averaging paid)" in out and code == 0, out
