"""Peers and trainers on a CUDA GPU (issue 24). Skipped without one (``tests/conftest.py``).

What they pin down: a stage's tensors are read straight onto the GPU; a peer serves (forward,
backward, AdamW state, KV caches) there; ``SwarmModelForCausalLM.to("cuda")`` and
``from_pretrained(device="cuda")`` put the local parts there like any module; a bfloat16 run on the
GPU trains like transformers' model under bfloat16 autocast on the same GPU; float16 trains with
its gradients scaled; AdamW's state offloaded to host memory gives the same steps.

Tolerances are not yet measured on a GPU: CUDA's embedding backward sums with atomics (not bit for
bit), so the bfloat16 comparison asserts a bound relative to the bfloat16-vs-float32 gap."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from core.types import LayerRange
from shards.placement import Span
from shards.source import resolve_model
from shards.stage import load_stage
from tests.helpers import local_adamw, max_difference, plain_loop

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

MODEL = dict(family="llama", num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2, vocab_size=128)
LR = 3e-3


def _batches(count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randint(0, 128, (8, 16), generator=generator) for _ in range(count)]


def _exported(model, path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(model.save_pretrained(path)).state_dict()


def test_a_stage_is_read_straight_onto_the_gpu(model_factory):
    source = resolve_model(str(model_factory(**MODEL)))
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    stage = load_stage(source, LayerRange(start=1, end=3), device="cuda:0")
    assert {p.device.type for p in stage.parameters()} == {"cuda"}
    assert {b.device.type for b in stage.buffers()} == {"cuda"}
    assert torch.cuda.memory_allocated() - before >= sum(p.numel() * 4 for p in stage.parameters())
    names = [n for n in source.tensor_names() if ".layers.1." in n]
    assert {t.device for t in source.load(names, device="cuda:0").values()} == {torch.device("cuda", 0)}
    hidden = torch.randn(2, 5, MODEL["hidden_size"], device="cuda")
    reference = load_stage(source, LayerRange(start=1, end=3))
    torch.testing.assert_close(stage(hidden).cpu(), reference(hidden.cpu()), rtol=1e-4, atol=1e-4)


def test_peers_serve_on_the_gpu_and_a_cuda_trainer_trains_like_local(model_factory, swarm_factory, tmp_path):
    model_dir = model_factory(**MODEL)
    batches = _batches(4)
    swarm = swarm_factory(model_dir, num_stages=2, num_peers=0, pin_stages=False, target_batch_size=8, lr=LR,
                          peer_settings={"device": "cuda"})
    peers = swarm.add_peers_at_once(2)
    assert sorted(p.span for p in peers) == [Span(0, 1), Span(1, 1)]
    for peer in peers:
        slot = next(iter(peer.slots.values()))
        executor = slot.service.executor
        assert peer.device == torch.device("cuda", 0) and executor.device == torch.device("cuda", 0)
        assert {p.device.type for p in executor.module.parameters()} == {"cuda"}
        assert slot.inference.sessions.device.type == "cuda"
        assert slot.record.hardware.device == "cuda:0"
    with swarm.client(device="cuda", microbatch_size=8) as model:
        assert model.device.type == "cuda"
        plain_loop(model, model.create_optimizer(), batches)
        optimizer_state = [s for p in peers for slot in p.slots.values()
                           for s in slot.service.executor.optimizer.state.values()]
        assert optimizer_state and all(s["exp_avg"].device.type == "cuda" for s in optimizer_state)
        out = model.generate(torch.tensor([[1, 2, 3]], device="cuda"), max_new_tokens=4)
        assert out.device.type == "cuda" and out.shape == (1, 7)
        exported = _exported(model, tmp_path / "out")
    assert max_difference(exported, local_adamw(model_dir, batches, lr=LR, device="cuda")) <= 1e-3


def test_a_trainer_moves_to_the_gpu_with_to(model_factory, swarm_factory):
    swarm = swarm_factory(model_factory(**MODEL), num_stages=2, num_peers=2, target_batch_size=8, lr=LR)
    with swarm.client() as model:
        assert model.device.type == "cpu"  # as any nn.Module until asked
        assert model.to("cuda") is model and model.device.type == "cuda"
        assert {p.device.type for p in model.parameters()} == {"cuda"}
        ids = _batches(1)[0]
        output = model(ids, labels=ids)  # a host batch is moved to the model's device once
        assert output.logits.device.type == "cuda"
        output.loss.backward()
        assert all(p.grad is not None and p.grad.device.type == "cuda" for p in model.parameters())
        loss = model.train_step(ids)
        assert torch.isfinite(loss)


def test_bfloat16_training_on_the_gpu_follows_local_bfloat16(model_factory, swarm_factory, tmp_path):
    model_dir = model_factory(**MODEL)
    batches = _batches(8)
    swarm = swarm_factory(model_dir, num_stages=2, num_peers=0, pin_stages=False, target_batch_size=8, lr=LR,
                          dtype="bfloat16", peer_settings={"device": "cuda"})
    swarm.add_peers_at_once(2)
    with swarm.client(device="cuda", microbatch_size=8) as model:
        plain_loop(model, model.create_optimizer(), batches)
        exported = _exported(model, tmp_path / "out")
    bf16, fp32 = (local_adamw(model_dir, batches, lr=LR, dtype=dtype, device="cuda")
                  for dtype in (torch.bfloat16, torch.float32))
    to_bf16, to_fp32 = max_difference(exported, bf16), max_difference(exported, fp32)
    print(f"cuda: max |swarm - local bf16| {to_bf16:.2e}, |swarm - local fp32| {to_fp32:.2e}")
    assert to_bf16 <= 5e-3 and to_bf16 <= to_fp32 / 4


def test_float16_trains_with_scaled_gradients_and_offloaded_adamw(model_factory, swarm_factory, tmp_path):
    """float16 on the GPU, AdamW's state in host memory: the stages scale their backward (their
    gradients are far below float16's smallest normal), the weights move and stay within float16's
    reach of local float32 training (on the CPU: 7.9e-3, tests/integration/test_mixed_precision.py)."""
    model_dir = model_factory(**MODEL)
    batches = _batches(8)
    swarm = swarm_factory(model_dir, num_stages=2, num_peers=0, pin_stages=False, target_batch_size=8, lr=LR,
                          dtype="float16", peer_settings={"device": "cuda", "offload_optimizer": True})
    peers = swarm.add_peers_at_once(2)
    executors = [slot.service.executor for p in peers for slot in p.slots.values()]
    assert all(e.scaler.enabled and e.precision == torch.float16 for e in executors)
    with swarm.client(device="cuda", microbatch_size=8) as model:
        losses = plain_loop(model, model.create_optimizer(), batches)
        exported = _exported(model, tmp_path / "out")
    assert all(torch.isfinite(torch.tensor(losses)))
    assert max_difference(exported, AutoModelForCausalLM.from_pretrained(model_dir).state_dict()) > 1e-2
    for executor in executors:
        assert all(s["exp_avg"].device.type == "cpu" for s in executor.optimizer.state.values())
        assert {p.device.type for p in executor.module.parameters()} == {"cuda"}
    assert max_difference(exported, local_adamw(model_dir, batches, lr=LR, device="cuda")) <= 2e-2
