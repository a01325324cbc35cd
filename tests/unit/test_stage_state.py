"""Stage state as data: capture/apply round trips, every kind of mismatch refused by name, checkpoint
files (atomic, newest kept), the restore decision, and the state and checkpoint-store RPCs over the
in-memory transport."""

from __future__ import annotations

import asyncio

import pytest
import torch

from bootstrap.checkpoints import CheckpointStore, RunView
from dht.schemas import Manifest, OptimizerSettings, PeerRecord, StoreRecord, TrainerRecord
from peers.state.checkpoint_check import step_refusal
from peers.state.checkpoint_files import CheckpointDir
from peers.state.checkpoints import Checkpointer, checkpoint_due
from peers.training.client import StageClient
from peers.training.executor import StageExecutor
from peers.state.recovery import Restore, adopt_state, choose_restore, restore_order
from peers.training.service import StageService
from net.rpc import parse_reply
from peers.state.store_protocol import CHECKPOINT_PUT, PutRequest, PutResponse
from peers.state.snapshot import StateIdentity, StateMeta, apply_state, capture_state, check_state
from peers.state.store_client import StoreClient
from net.transport import InMemoryTransport
from shards.stage import load_stage
from core.types import LayerRange
from core.errors import AuthRejected, BadRequest, CheckpointMissing, StateMismatch, WrongStage
from net.rpc import Raw

ID = StateIdentity(run_id="run", config_hash="c0ffee")
LAYERS = LayerRange(start=0, end=2)


@pytest.fixture
def make_executor(model_factory):
    model_dir = model_factory("gpt2", num_layers=2, hidden_size=32, num_heads=4)

    def make() -> StageExecutor:
        return StageExecutor(load_stage(str(model_dir), LAYERS), 0, LAYERS, OptimizerSettings(lr=1e-2))

    return make


def _step(executor: StageExecutor, seed: int) -> None:
    hidden = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(seed))
    executor.module(hidden).pow(2).mean().backward()
    executor.optimizer.step()
    executor.optimizer.zero_grad()
    executor.optimizer_step += 1


def _capture(executor: StageExecutor, with_optimizer: bool = True):
    return capture_state(executor.module, executor.optimizer if with_optimizer else None, identity=ID,
                         step=executor.optimizer_step, stage=0, layers=LAYERS)


def test_apply_copies_parameters_and_optimizer_state_exactly(make_executor):
    trained, fresh = make_executor(), make_executor()
    for seed in range(2):
        _step(trained, seed)
    meta, tensors = _capture(trained)
    assert meta.step == 2 and meta.dtype == "float32" and meta.with_optimizer
    apply_state(fresh.module, fresh.optimizer, meta, tensors, identity=ID, stage=0, layers=LAYERS)
    for a, b in zip(trained.module.parameters(), fresh.module.parameters()):
        assert torch.equal(a, b)
    _step(trained, 9)
    _step(fresh, 9)  # the same next step only if the AdamW moments and step counts came along
    for a, b in zip(trained.module.parameters(), fresh.module.parameters()):
        assert torch.equal(a, b)


def _drop_one(tensors):
    return {k: v for i, (k, v) in enumerate(tensors.items()) if i}


CASES = [
    ("another run", lambda m, t: (m.model_copy(update={"run_id": "other"}), t), "run 'other'"),
    ("another model", lambda m, t: (m.model_copy(update={"config_hash": "beef"}), t), "model config beef"),
    ("another stage", lambda m, t: (m.model_copy(update={"stage": 1}), t), "stage-1"),
    ("other layers", lambda m, t: (m.model_copy(update={"layers": LayerRange(start=0, end=1)}), t), "[0, 1)"),
    ("newer format", lambda m, t: (m.model_copy(update={"version": 9}), t), "format version 9"),
    ("weights only", lambda m, t: (m.model_copy(update={"with_optimizer": False}), t), "no optimizer state"),
    ("a parameter missing", lambda m, t: (m, _drop_one(t)), "lacks 1 parameter"),
    ("an unknown tensor", lambda m, t: (m, t | {"param/blocks.9.w": torch.zeros(1)}), "does not"),
    ("a wrong shape", lambda m, t: (m, t | {"param/blocks.0.ln_1.weight": torch.zeros(3)}), "[3]"),
    ("a wrong dtype", lambda m, t: (m, t | {"param/blocks.0.ln_1.weight": torch.zeros(32).half()}), "float16"),
    ("half an optimizer state", lambda m, t: (m, {k: v for k, v in t.items() if not k.startswith("exp_avg_sq/")}),
     "incomplete"),
]


@pytest.mark.parametrize("mutate, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_state_that_does_not_fit_is_refused_by_name(mutate, words, make_executor):
    trained, fresh = make_executor(), make_executor()
    _step(trained, 0)
    meta, tensors = mutate(*_capture(trained))
    before = [p.clone() for p in fresh.module.parameters()]
    with pytest.raises(StateMismatch, match=None) as caught:
        apply_state(fresh.module, fresh.optimizer, meta, tensors, identity=ID, stage=0, layers=LAYERS)
    assert words in str(caught.value)
    assert all(torch.equal(a, b) for a, b in zip(before, fresh.module.parameters()))  # nothing changed
    assert not fresh.optimizer.state


def test_weights_only_state_passes_when_no_optimizer_is_needed(make_executor):
    executor = make_executor()
    meta, tensors = _capture(executor, with_optimizer=False)
    assert all(name.startswith("param/") for name in tensors)
    check_state(meta, tensors, executor.module, identity=ID, stage=0, layers=LAYERS, need_optimizer=False)


def test_checkpoint_dir_keeps_the_newest_two_and_skips_broken_ones(make_executor, tmp_path):
    executor, directory = make_executor(), CheckpointDir(tmp_path / "stage-0", keep=2)
    for seed in range(3):
        _step(executor, seed)
        directory.save(*_capture(executor))
    assert directory.steps() == [2, 3]
    (directory.root / "step-0000000009.safetensors.tmp").write_bytes(b"half a write")  # a crash mid-save
    assert directory.steps() == [2, 3] and directory.latest().step == 3
    meta, tensors = directory.load(3)
    assert torch.equal(tensors["param/blocks.0.ln_1.weight"], executor.module.blocks[0].ln_1.weight)
    (directory.root / "step-0000000003.json").write_text("{not json")
    assert directory.latest().step == 2
    with pytest.raises(StateMismatch, match="cannot read checkpoint"):
        directory.load(3)


def _meta(step: int, **update) -> StateMeta:
    base = dict(run_id="run", config_hash="c0ffee", stage=0, layers=LAYERS, step=step, dtype="float32")
    return StateMeta(**(base | update))


@pytest.mark.parametrize(
    "local, store, expected",
    [
        (None, None, None),
        (_meta(4), None, Restore("local", 4)),
        (None, ("s", 4), Restore("store", 4, "s")),
        (_meta(4), ("s", 6), Restore("store", 6, "s")),
        (_meta(6), ("s", 4), Restore("local", 6)),
        (_meta(4), ("s", 4), Restore("local", 4)),  # a tie needs no download
        (_meta(9, run_id="old-run"), ("s", 4), Restore("store", 4, "s")),  # another run's file is ignored
        (_meta(9, config_hash="other"), None, None),
        (_meta(9, stage=1, layers=LayerRange(start=2, end=4)), None, None),
    ],
)
def test_choose_restore(local, store, expected):
    assert choose_restore(local, store, ID, stage=0) == expected


@pytest.mark.parametrize(
    "step, last, every, due",
    [(0, 0, 50, False), (49, 0, 50, False), (50, 0, 50, True), (51, 0, 50, True), (99, 50, 50, False),
     (100, 50, 50, True), (7, 3, 1, True), (3, 3, 1, False)],
)
def test_checkpoint_due(step, last, every, due):
    assert checkpoint_due(step, last, every) is due


def test_state_rpc_sends_the_state_and_refuses_bad_requests(make_executor):
    async def scenario():
        hub, executor = InMemoryTransport(), make_executor()
        _step(executor, 0)
        service = StageService(executor, "peer", identity=ID)
        await service.register(hub.bind("peer"))
        client = StageClient(hub, attempts=1)
        meta, tensors = await client.fetch_state("peer", 0, LAYERS)
        check_state(meta, tensors, executor.module, identity=ID, stage=0, layers=LAYERS)
        assert meta.step == 1 and set(tensors) == set(_capture(executor)[1])
        weights = (await client.fetch_state("peer", 0, LAYERS, with_optimizer=False))[1]
        assert all(name.startswith("param/") for name in weights)
        with pytest.raises(WrongStage):
            await client.fetch_state("peer", 1, LayerRange(start=2, end=4))
        reply, _ = await hub.call("peer", "swarm.stage.state", Raw({"stage": "zero"}), [], timeout=5)
        assert reply["error"]["code"] == "BadRequest" and "stage" in reply["error"]["message"]
        reply, _ = await hub.call("peer", "swarm.stage.state", Raw({"stage": 0, "layers": {"start": 0, "end": 2}}),
                                  [torch.zeros(1)], timeout=5)
        assert "carries no tensors" in reply["error"]["message"]
        assert (await client.fetch_state("peer", 0, LAYERS))[0].step == 1  # still serving
        shy = StageService(executor, "shy")
        await shy.register(hub.bind("shy"))
        with pytest.raises(BadRequest, match="does not share"):
            await client.fetch_state("shy", 0, LAYERS)
        service.shutdown()
        shy.shutdown()

    asyncio.run(scenario())


def test_checkpoint_store_keeps_one_copy_per_step_and_refuses_foreign_checkpoints(make_executor, tmp_path):
    manifest = Manifest(run_id="run", model="m", config_hash="c0ffee", num_layers=2, stages=[LAYERS])

    async def scenario():
        hub, executor = InMemoryTransport(), make_executor()
        store = CheckpointStore(tmp_path / "store", manifest, config=executor.module.config, run=_run_at(1))
        await store.register(hub.bind("store"))
        client = StoreClient(hub.bind("uploader"), _stores(["store"]), attempts=1)
        assert await client.latest("stage-0") is None
        with pytest.raises(CheckpointMissing):
            await client.get("stage-0")
        _step(executor, 0)
        meta, tensors = _capture(executor)
        assert await client.put(meta, tensors) == 1
        assert await client.put(meta, tensors) == 0  # the second replica's upload is skipped
        assert await client.latest("stage-0") == ("store", 1)
        got_meta, got = await client.get("stage-0")
        assert got_meta == meta and all(torch.equal(got[k], tensors[k]) for k in tensors)
        for bad, words in [(meta.model_copy(update={"run_id": "other", "step": 5}), "run 'other'"),
                           (meta.model_copy(update={"stage": 3, "step": 5}), "no stage 3")]:
            with pytest.raises(BadRequest, match=words):
                await _raw_put(client, bad, tensors)
        renamed = {"weird": next(iter(tensors.values()))}
        with pytest.raises(BadRequest, match="lacks 24 parameter"):
            await _raw_put(client, meta.model_copy(update={"step": 2}), renamed)
        assert store.latest_step("stage-0") == 1  # nothing refused was stored

    asyncio.run(scenario())


def _run_at(step: int, peers: tuple[str, ...] = ("uploader",), trainers: tuple[str, ...] = ("trainer",)):
    """The run as the store sees it: ``peers`` announce stage 0 at ``step``, ``trainers`` train."""
    view = RunView({0: [PeerRecord(peer_id=p, stage=0, layers=LAYERS, step=step) for p in peers]},
                   [TrainerRecord(trainer_id=t, step=step) for t in trainers])

    async def run():
        return view

    return run


def _poisoned(tensors: dict, value: float) -> dict:
    return {k: (torch.full_like(t, value) if k.startswith("param/") else t) for k, t in tensors.items()}


@pytest.mark.parametrize("case, error, words", [
    ("honest", None, ""),
    ("step 10^9", BadRequest, "claims step 1000000000, but the run's records show step 1"),
    ("parameters 1e4", BadRequest, "values up to 1e\+04"),
    ("NaN moments", BadRequest, "exp_avg/.*NaN"),
    ("a misshapen tensor", BadRequest, "got torch.float32 \[3\]"),
    ("not serving the stage", AuthRejected, "does not serve stage 0"),
    ("the hub itself (unknown caller)", AuthRejected, "the uploader is not known"),
])
def test_the_store_keeps_only_checkpoints_from_the_stage_s_own_peers_that_pass_the_checks(
        make_executor, tmp_path, case, error, words):
    """Issue 22: ``checkpoint.put`` stored step 10^9 with parameters at 1e4 from anyone; honest
    uploads were skipped from then on."""
    manifest = Manifest(run_id="run", model="m", config_hash="c0ffee", num_layers=2, stages=[LAYERS])

    async def scenario():
        hub, executor = InMemoryTransport(), make_executor()
        store = CheckpointStore(tmp_path / "store", manifest, config=executor.module.config, run=_run_at(1))
        await store.register(hub.bind("store"))
        _step(executor, 0)
        meta, tensors = _capture(executor)
        uploader = {"not serving the stage": hub.bind("stranger"), "the hub itself (unknown caller)": hub}
        client = StoreClient(uploader.get(case, hub.bind("uploader")), _stores(["store"]), attempts=1)
        first = next(k for k in tensors if k.startswith("exp_avg/"))
        shapes = next(k for k in tensors if k.startswith("param/"))
        meta, tensors = {
            "step 10^9": (meta.model_copy(update={"step": 10**9}), tensors),
            "parameters 1e4": (meta, _poisoned(tensors, 1e4)),
            "NaN moments": (meta, {**tensors, first: torch.full_like(tensors[first], float("nan"))}),
            "a misshapen tensor": (meta, {**tensors, shapes: torch.zeros(3)}),
        }.get(case, (meta, tensors))
        if error is None:
            assert (await _raw_put(client, meta, tensors)).stored
            assert store.latest_step("stage-0") == 1
            return
        with pytest.raises(error, match=words):
            await _raw_put(client, meta, tensors)
        assert store.latest_step("stage-0") is None  # nothing refused was stored
        # and an honest upload from the stage's peer is still kept afterwards
        honest = StoreClient(hub.bind("uploader"), _stores(["store"]), attempts=1)
        assert await honest.put(*_capture(executor)) == 1

    asyncio.run(scenario())


@pytest.mark.parametrize("step, run_step, refused", [(0, 0, False), (3, 1, False), (4, 1, True), (10**9, 50, True)])
def test_step_refusal_table(step, run_step, refused):
    assert (step_refusal(step, run_step) is not None) == refused


async def _raw_put(client: StoreClient, meta: StateMeta, tensors: dict) -> PutResponse:
    """A put without the client's "has it already?" check, as a buggy or hostile uploader sends it."""
    request = PutRequest(meta=meta, names=list(tensors))
    reply, _ = await client._call("store", CHECKPOINT_PUT, request, list(tensors.values()))
    return parse_reply(PutResponse, reply)


def _stores(ids):
    async def stores():
        return [StoreRecord(peer_id=peer_id) for peer_id in ids]

    return stores


def test_a_checkpoint_cancelled_mid_upload_is_taken_again_when_the_peer_leaves(make_executor, tmp_path):
    """The periodic checkpoint is cancelled while its upload waits (the peer stops): ``final`` must
    upload that step again, not take it as done."""
    executor = make_executor()

    class SlowStore:
        def __init__(self) -> None:
            self.started, self.release, self.stored = asyncio.Event(), asyncio.Event(), []

        async def put(self, meta, tensors) -> int:
            self.started.set()
            await self.release.wait()
            self.stored.append(meta.step)
            return 1

    async def compute(fn, *args):
        return fn(*args)

    async def scenario() -> list[int]:
        store = SlowStore()
        checkpointer = Checkpointer(executor, ID, local=CheckpointDir(tmp_path), store=store, every=2, compute=compute)
        _step(executor, 0)
        _step(executor, 1)
        task = asyncio.create_task(checkpointer.checkpoint())
        await store.started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        store.release.set()
        await checkpointer.final(timeout=10)
        return store.stored

    assert asyncio.run(scenario()) == [2]


@pytest.mark.parametrize("local_steps, store, expected", [
    ([], None, []),
    ([3, 5], None, [Restore("local", 5), Restore("local", 3)]),
    ([3, 5], ("s", 5), [Restore("local", 5), Restore("store", 5, "s"), Restore("local", 3)]),
    ([3], ("s", 10**9), [Restore("store", 10**9, "s"), Restore("local", 3)]),  # tried first, checked, skipped
])
def test_restore_order(local_steps, store, expected):
    assert restore_order([_meta(step) for step in local_steps], store, ID, stage=0) == expected


def test_a_restore_skips_a_newer_checkpoint_that_fails_the_checks(make_executor, tmp_path):
    """Issue 22: a restore took the highest step number; a poisoned one (parameters at 1e4) must be
    passed over for the newest one that passes the checks."""
    source, target = make_executor(), make_executor()
    local = CheckpointDir(tmp_path / "ckpt", keep=3)
    _step(source, 0)
    honest_meta, honest = _capture(source)
    local.save(honest_meta, honest)
    local.save(honest_meta.model_copy(update={"step": 2}), _poisoned(honest, 1e4))

    async def compute(fn, *args):
        return fn(*args)

    where = asyncio.run(adopt_state(target, ID, replicas=[], client=None, store=None, local=local,
                                    compute=compute))
    assert where.endswith("step 1") and target.optimizer_step == 1
    assert all(torch.equal(p, honest[f"param/{n}"]) for n, p in target.module.named_parameters())
