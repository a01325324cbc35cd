"""Fuzzing the checks issue 22 added: per-caller limits, the record-holder binding and the
checkpoint checks. Each must decide (a named refusal or a pass) for any input, never fail inside,
and keep its invariants. ``SWARM_FUZZ_EXAMPLES`` runs longer, as for ``tests/fuzzing.py``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dht.auth import holds
from net.admission import CallerLimits
from peers.state.checkpoint_check import check_checkpoint, part_module
from peers.state.snapshot import StateIdentity, capture_state
from shards.stage import load_stage
from core.types import LayerRange
from core.errors import BadRequest, CapacityExceeded
from tests.fuzzing import FUZZ_SETTINGS

ID = StateIdentity(run_id="run", config_hash="c0ffee")
LAYERS = LayerRange(start=0, end=2)

_actions = st.lists(st.tuples(st.sampled_from(["open", "reserve", "close"]), st.sampled_from(["a", "b"]),
                              st.integers(0, 300)), max_size=60)


@FUZZ_SETTINGS
@given(_actions)
def test_caller_limits_keep_their_bounds_for_any_sequence(actions):
    limits = CallerLimits(max_streams=3, max_bytes=200)
    tickets = {"a": [], "b": []}
    for action, caller, size in actions:
        try:
            if action == "open":
                tickets[caller].append(limits.open(caller, 250))
            elif action == "reserve" and tickets[caller]:
                tickets[caller][size % len(tickets[caller])].reserve(size)
            elif action == "close" and tickets[caller]:
                tickets[caller].pop(size % len(tickets[caller])).close()
        except CapacityExceeded:
            pass
        for who, held in tickets.items():
            assert limits.streams.get(who, 0) == len(held) <= 3
            assert limits.in_flight.get(who, 0) == sum(t.reserved for t in held)
            assert limits.in_flight.get(who, 0) <= 250  # over max_bytes only alone, up to its method's limit
    for held in tickets.values():
        for ticket in held:
            ticket.close()
    assert not limits.streams and not limits.in_flight


_field_values = st.one_of(st.none(), st.sampled_from(["peerA", "peerB", ""]), st.integers(), st.lists(st.text()))


@FUZZ_SETTINGS
@given(st.dictionaries(st.sampled_from(["peer_id", "delegate_of", "trainer_id", "reporter", "x"]), _field_values))
def test_holds_is_true_only_when_the_record_names_the_holder(value):
    for fields in (("peer_id", "delegate_of"), ("trainer_id",), ("reporter",), ("peer_id",)):
        named = [value.get(f) for f in fields]
        assert holds(value, "peerA", fields) == ("peerA" in named)


@pytest.fixture(scope="module")
def honest(model_factory):
    model_dir = model_factory("gpt2", num_layers=2, hidden_size=32, num_heads=4)
    stage = load_stage(str(model_dir), LAYERS)
    optimizer = torch.optim.AdamW(stage.parameters())
    stage(torch.randn(2, 5, 32)).pow(2).mean().backward()
    optimizer.step()
    meta, tensors = capture_state(stage, optimizer, identity=ID, step=1, stage=0, layers=LAYERS)
    return meta, tensors, part_module(stage.config, "float32", LAYERS)


_dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64])
_fills = st.sampled_from([0.0, 1.0, -1e4, 1e30, float("nan"), float("inf")])


@FUZZ_SETTINGS
@given(data=st.data())
def test_check_checkpoint_refuses_by_name_and_passes_only_the_part(honest, data):
    meta, tensors, module = honest
    tensors = dict(tensors)
    changed = False
    for name in data.draw(st.lists(st.sampled_from(sorted(tensors)), max_size=3, unique=True)):
        kind = data.draw(st.sampled_from(["drop", "dtype", "shape", "fill", "rename"]))
        t = tensors.pop(name)
        if kind == "dtype":
            tensors[name] = t.to(data.draw(_dtypes))
        elif kind == "shape":
            tensors[name] = torch.zeros(data.draw(st.lists(st.integers(0, 3), max_size=3)))
        elif kind == "fill":
            tensors[name] = torch.full_like(t, data.draw(_fills))
        elif kind == "rename":
            tensors[name + data.draw(st.text(max_size=4))] = t
        changed = True
    step = data.draw(st.integers(0, 10**12))
    run_step = data.draw(st.integers(0, 10))
    try:
        check_checkpoint(meta.model_copy(update={"step": step}), tensors, module, ID, run_step=run_step)
    except BadRequest as e:
        assert str(e).startswith("checkpoint of stage-0")
        return
    # passed: then it is the honest part, a harmless change of it, at a step the run could be at
    assert step <= run_step + 2
    assert {k.partition("/")[2] for k in tensors} == {n for n, _ in module.named_parameters()}
    assert not changed or all(torch.isfinite(t).all() and t.abs().max() <= 1e3 for k, t in tensors.items()
                              if k.startswith("param/") and t.is_floating_point())
