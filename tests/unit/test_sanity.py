"""Numbers from other machines: sanity checks, robust averaging, and spot checks, over the in-memory
transport. A replica returning absurd outputs, a poisoning replica in the averaging, and a replica that
corrupts its outputs slightly (only a spot check can tell) must not change the loss curve."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from peers.training.averaging import LocalGradientSync
from peers.training.executor import StageExecutor
from peers.training.sanity import insanity, robust_mean
from core.errors import BadRequest, InvalidOutput, Recovery, recovery_for
from trainer.spotcheck import agree
from tests.unit.test_fault_tolerance import (
    LR,
    ReplicatedSwarm,
    _assert_close_losses,
    _batches,
    _train_step,
)
from tests.helpers import reference_losses


@pytest.mark.parametrize("values, problem", [
    ([1.0, -2.0, 3.0], None),
    ([1.0, float("nan")], "1 of 2 values are NaN or infinite"),
    ([float("inf"), -float("inf"), 0.0], "2 of 3 values are NaN or infinite"),
    ([1.0, 2e6], "values up to 2e+06"),
    ([-5e7], "values up to 5e+07"),
])
def test_insanity_names_what_is_wrong(values, problem):
    found = insanity(torch.tensor(values))
    assert found == problem if problem is None else problem in found
    assert insanity(torch.tensor([2**40])) is None  # integer tensors (masks, positions) are not values


def _parts(*scales: float) -> list[torch.Tensor]:
    base = torch.arange(1.0, 5.0)
    return [base * s for s in scales]


@pytest.mark.parametrize("parts, expected, outliers", [
    (_parts(1, 1, 1), torch.arange(1.0, 5.0), []),  # equal: the plain mean
    (_parts(1, 2, 3), torch.arange(1.0, 5.0) * 2, []),  # within 8x the median: the plain mean
    (_parts(1, 1, 1e6), torch.arange(1.0, 5.0) * (2 + 8) / 3, [(2, 8e-6)]),  # clipped to 8x the median
    ([*_parts(1, 1), torch.full((4,), float("nan"))], torch.arange(1.0, 5.0) * 2 / 3, [(2, 0.0)]),  # counts as 0
    (_parts(0, 1, 1), torch.arange(1.0, 5.0) * 2 / 3, []),  # a replica with no work is no reference
    (_parts(1, 20), torch.arange(1.0, 5.0) * (1 + 8) / 2, [(1, 0.4)]),  # two: the smaller is the reference
])
def test_robust_mean_table(parts, expected, outliers):
    mean, found = robust_mean(parts)
    assert torch.allclose(mean, expected, rtol=1e-6)
    assert [(o.index, round(o.scale, 6)) for o in found] == outliers


def test_a_poisoning_replica_cannot_steer_the_averaged_step():
    """Three replicas sum their gradients (``LocalGradientSync``, the same rule as hivemind's all-reduce
    here): a NaN contribution counts as zero, a 1e6-times one as 8 honest ones at most."""
    honest = [torch.randn(64, generator=torch.Generator().manual_seed(i)) for i in range(2)]

    def run(poison: torch.Tensor) -> list[torch.Tensor]:
        sync, results = LocalGradientSync(), {}
        contributions = {"a": honest[0], "b": honest[1], "evil": poison}

        def member(name: str) -> None:
            results[name] = sync.sum([contributions[name]], step=0, members=list(contributions), me=name,
                                     scheduled_time=0.0, timeout=5.0)[0]

        threads = [threading.Thread(target=member, args=(name,)) for name in contributions]
        [t.start() for t in threads]
        [t.join(10) for t in threads]
        assert all(torch.equal(results["a"], r) for r in results.values())  # every member applies the same
        return results["a"]

    assert torch.allclose(run(torch.full((64,), float("nan"))), honest[0] + honest[1], atol=1e-6)
    poisoned = run(honest[0] * -1e6)
    bound = 8 * max(h.norm() for h in honest)  # 8 x the median of the three norms
    assert torch.isfinite(poisoned).all() and (poisoned - honest[0] - honest[1]).norm() <= bound * 1.0001


def test_a_stage_refuses_absurd_inputs_and_gradients(model_factory):
    from shards import LayerRange, load_stage
    from dht.schemas import OptimizerSettings

    layers = LayerRange(start=0, end=1)
    module = load_stage(str(model_factory("gpt2", num_layers=2, hidden_size=32, num_heads=4)), layers)
    executor = StageExecutor(module, 0, layers, OptimizerSettings(lr=1e-3), max_abs=1e3)
    good = torch.randn(1, 4, 32)
    assert executor.check_hidden(good, "hidden_states") is good
    for bad, words in ((good * float("nan"), "NaN or infinite"), (good + 1e4, "values up to")):
        with pytest.raises(BadRequest, match=f"hidden_states refused: .*{words}"):
            executor.check_inputs([bad], False, False)
        with pytest.raises(BadRequest, match=f"grad_output refused: .*{words}"):
            executor.check_hidden(bad, "grad_output")


def test_invalid_outputs_reroute_without_retrying_the_same_peer():
    assert recovery_for(InvalidOutput("x")) is Recovery.REROUTE


def _train(swarm: ReplicatedSwarm, model_dir, steps: int = 4, overlapped: bool = False) -> list[float]:
    """``steps`` steps of 4 sequences in microbatches of 1, whose losses must follow transformers
    trained locally on the same batches."""
    batches = _batches(steps, swarm.source.config.vocab_size)
    optimizer = torch.optim.AdamW(swarm.local.parameters(), lr=LR)
    losses = [asyncio.run(_train_step(swarm.pipeline, swarm.local, optimizer, ids, overlapped=overlapped))
              for ids in batches]
    _assert_close_losses(losses, reference_losses(model_dir, batches, lr=LR))
    return losses


def test_a_replica_returning_absurd_values_is_banned_and_its_work_replayed(model_factory):
    model_dir = model_factory("llama", num_layers=4, hidden_size=32, num_kv_heads=2)
    swarm = ReplicatedSwarm(model_dir, [2, 2])
    try:
        swarm.pipeline.spot_check.rate = 0.0
        swarm.services["s1a"].executor.corrupt = 1e9  # outputs and gradients far beyond max_abs
        _train(swarm, model_dir)
        assert "s1a" in swarm.pipeline.banned() and swarm.pipeline.penalties["s1a"] >= 1
        assert swarm.services["s1b"].executor.optimizer_step == 4
    finally:
        swarm.close()


@pytest.mark.parametrize("rate", [1.0, 0.5])
def test_spot_checks_catch_a_replica_that_corrupts_its_outputs(model_factory, rate):
    """Noise of 0.05 passes every value check; the spot check catches it within 2 checks (a third
    replica decides) and publishes one report, and the loss curve follows local training as if the
    liar had never been there. At 50% (seeded) it is caught part-way through the first step, after it
    had computed microbatch 0 unchecked: that one is computed again before the loss."""
    model_dir = model_factory("llama", num_layers=4, hidden_size=32, num_kv_heads=2)
    swarm = ReplicatedSwarm(model_dir, [3, 1])
    reports = []

    async def report(ban):
        reports.append(ban)

    try:
        checker = swarm.pipeline.spot_check
        checker.rate, checker._report = rate, report
        swarm.services["s0b"].executor.corrupt = 0.05
        recomputed = []
        tainted = swarm.pipeline.tainted
        swarm.pipeline.tainted = lambda traces: recomputed.extend(tainted(traces)) or tainted(traces)
        _train(swarm, model_dir, steps=4)
        assert recomputed == ([] if rate == 1.0 else [0])
        assert [peer for peer, _ in checker.caught] == ["s0b"] and [r.peer_id for r in reports] == ["s0b"]
        assert reports[0].stage == 0 and "differs from two other replicas" in reports[0].reason
        assert checker.caught[0][1] <= 2, f"caught after {checker.caught[0][1]} spot checks of its work"
        assert "s0b" in swarm.pipeline.banned()
        assert agree(torch.ones(3), torch.ones(3) + 1e-5) and not agree(torch.ones(3), torch.ones(3) + 0.05)
    finally:
        swarm.close()


def test_a_liar_caught_while_backwards_overlap_forwards_has_nothing_counted(model_factory):
    """Overlapped pushes (``train_microbatches``): no backward starts before the step's drawn spot
    checks are done, so the liar's unchecked microbatches are redone before anything of them is
    counted, and the loss curve is local training's (noise of 0.05 would move it far beyond 1e-4)."""
    model_dir = model_factory("llama", num_layers=4, hidden_size=32, num_kv_heads=2)
    swarm = ReplicatedSwarm(model_dir, [3, 1], push=True)
    try:
        checker = swarm.pipeline.spot_check
        checker.rate = 0.6  # seeded: the liar computes microbatch 0 unchecked and is caught in step 0
        swarm.services["s0b"].executor.corrupt = 0.05
        redone = []
        tainted = swarm.pipeline.tainted
        swarm.pipeline.tainted = lambda traces: redone.extend(tainted(traces)) or tainted(traces)
        _train(swarm, model_dir, steps=4, overlapped=True)
        assert [peer for peer, _ in checker.caught] == ["s0b"] and "s0b" in swarm.pipeline.banned()
        assert redone, "a microbatch the liar computed unchecked must have been redone"
    finally:
        swarm.close()


def test_refused_inputs_are_counted_against_their_sender(model_factory):
    from dht.schemas import OptimizerSettings
    from peers.training.service import StageService
    from net.transport import CALLER
    from shards import LayerRange, load_stage

    layers = LayerRange(start=0, end=1)
    module = load_stage(str(model_factory("gpt2", num_layers=2, hidden_size=32, num_heads=4)), layers)
    service = StageService(StageExecutor(module, 0, layers, OptimizerSettings(lr=1e-3)), "me")
    message = {"stage": 0, "layers": {"start": 0, "end": 1}, "request_id": "r"}

    async def forward(caller: str, hidden: torch.Tensor) -> dict:
        CALLER.set(caller)
        reply, _ = await service.handlers()["swarm.stage.forward"](message, [hidden])
        return reply

    try:
        nan = torch.full((1, 4, 32), float("nan"))
        assert "NaN" in asyncio.run(forward("bad", nan))["error"]["message"]
        asyncio.run(forward("bad", nan))
        assert "ok" in asyncio.run(forward("good", torch.randn(1, 4, 32)))
        assert service.refused_by == {"bad": 2}
    finally:
        service.shutdown()


@pytest.mark.parametrize("wire", ["float32", "float16", "bfloat16", "int8"])
def test_replicas_that_differ_in_the_last_bits_agree_after_any_wire_format(wire):
    """Two honest replicas differ in the last float32 bits, which rounding to the wire format can
    widen to a whole float16 step or int8 step; a corrupted output (noise of a tenth of the values'
    scale, above every format's precision) never agrees."""
    from net.wire import decode, encode

    torch.manual_seed(0)
    honest = torch.randn(4, 16, 64) * 3
    other = honest * (1 + 1e-6 * torch.randn_like(honest))  # another kernel's rounding
    corrupted = honest + 0.3 * torch.randn_like(honest)

    def crossed(t: torch.Tensor) -> torch.Tensor:
        return decode(encode(t, wire), wire, torch.float32, "hidden")

    assert agree(crossed(honest), crossed(other), wire=wire)
    assert not agree(crossed(honest), crossed(corrupted), wire=wire)
