"""Devices and precision on the CPU (issue 24): device names, the ``--devices`` fan-out plan, the run's
dtype, float16's gradient scaling, host-memory AdamW, and the memory a stage is counted for."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from core.config import load_settings
from core.errors import BadRequest, ConfigError
from core.types import LayerRange
from dht.schemas import HardwareSummary, OptimizerSettings
from peers.joining.measure import activation_bytes, queue_tokens, stage_bytes, stage_parameters
from peers.training.executor import ForwardInputs, StageExecutor
from peers.training.offload import HostAdamW, offload_wanted
from peers.training.protocol import BackwardRequest, ForwardRequest
from shards.devices import HopScaler, compute_dtype, device_list, local_precision, resolve_device
from shards.source import resolve_model
from shards.stage import load_stage
from swarm import cli
from swarm.device_peers import plan_device_peers
from swarm.join_view import device_line
from trainer.spotcheck import run_tolerance

LAYERS = LayerRange(start=0, end=2)
AUTO = "cuda:0" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("spec, expected", [("auto", AUTO), ("cpu", "cpu"), (" CPU ", "cpu")])
def test_resolve_device(spec, expected):
    assert str(resolve_device(spec)) == expected


@pytest.mark.parametrize("spec, message", [
    ("gpu", "'gpu' is not one of auto, cpu, cuda, cuda:N"),
    ("cuda:x", "'cuda:x' is not one of"),
    ("cuda:-1", "'cuda:-1' is not one of"),
    ("", "'' is not one of"),
    ("cuda:99", "'cuda:99': this machine has"),
])
def test_resolve_device_names_the_bad_value(spec, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        resolve_device(spec)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a GPU")
def test_cuda_on_a_machine_without_a_gpu_says_so():
    with pytest.raises(ConfigError, match="'cuda': this machine has no CUDA GPU"):
        resolve_device("cuda")


@pytest.mark.parametrize("spec, device, expected", [
    (None, "cpu", ["cpu"]),
    (None, "auto", [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else ["cpu"]),
    ("cpu,cpu", "auto", ["cpu", "cpu"]),
    (" cpu , cpu ", "auto", ["cpu", "cpu"]),
])
def test_device_list(spec, device, expected):
    assert device_list(spec, device) == expected


@pytest.mark.parametrize("spec, message", [
    ("cpu,,cpu", "expected a comma-separated list"),
    ("99", "'cuda:99': this machine has"),
    ("cpu,tpu", "'tpu' is not one of"),
])
def test_device_list_refuses_clearly(spec, message):
    with pytest.raises(ConfigError, match=message):
        device_list(spec)


def test_device_settings_refuse_a_bad_value_naming_it():
    with pytest.raises(ConfigError, match=r"setting peer\.device: .* \(got 'gpu0'\)"):
        load_settings(peer={"device": "gpu0"})
    with pytest.raises(ConfigError, match=r"setting trainer\.device: .* \(got 'tpu'\)"):
        load_settings(trainer={"device": "tpu"})
    with pytest.raises(ConfigError, match=r"setting peer\.offload_optimizer.* \(got 'maybe'\)"):
        load_settings(peer={"offload_optimizer": "maybe"})
    assert load_settings().peer.device == "auto" and load_settings().trainer.device == "cpu"
    assert [load_settings(peer={"offload_optimizer": v}).peer.offload_optimizer for v in ("true", "auto")] == [
        True, "auto"]
    with pytest.raises(ConfigError, match=r"setting peer\.devices: .* \(got '0,,1'\)"):
        load_settings(peer={"devices": "0,,1"})


@pytest.mark.parametrize("value, expected", [("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                             ("float16", torch.float16), (torch.bfloat16, torch.bfloat16)])
def test_compute_dtype(value, expected):
    assert compute_dtype(value) == expected


@pytest.mark.parametrize("value", ["fp8", "int8", "float64", torch.float64])
def test_compute_dtype_refuses_naming_the_value(value):
    with pytest.raises(ConfigError, match=str(value).removeprefix("torch.")):
        compute_dtype(value)


def test_float16_local_parts_compute_in_float32_others_in_the_run_dtype():
    assert [local_precision(d) for d in ("float32", "bfloat16", "float16")] == [
        torch.float32, torch.bfloat16, torch.float32]


def test_an_invalid_dtype_is_refused_by_swarm_bootstrap(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["swarm", "bootstrap", "--dtype", "fp8", "--state-dir", str(tmp_path)])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    assert "setting bootstrap.dtype" in err and "'fp8'" in err and "Traceback" not in err, err


# -- float16 gradient scaling ----------------------------------------------------------------------

def _half_graph():
    """A linear layer under float16 autocast on the CPU, its float32 twin, and an input gradient small
    enough (1e-8) that float16's backward flushes it to zero unless it is scaled."""
    layer = torch.nn.Linear(16, 16)
    x = torch.randn(4, 16, requires_grad=True, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.float16):
        out = layer(x)
    reference = layer(x)
    grad = torch.full((4, 16), 1e-8)
    return layer, x, out, reference, grad


def test_float16_backward_without_scaling_underflows_and_the_scaler_recovers_it():
    layer, x, out, reference, grad = _half_graph()
    wanted = torch.autograd.grad(reference, [x, layer.weight], grad)
    plain = torch.autograd.grad(out, [x, layer.weight], grad, retain_graph=True)
    assert float(plain[0].abs().max()) == 0.0  # float16 loses it all: why the hop scales
    scaler = HopScaler(True)
    scaled = scaler.backward(out, grad, [x, layer.weight])
    assert all(g.dtype == torch.float32 for g in scaled)
    for got, want in zip(scaled, wanted):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-10)


def test_the_scaler_halves_on_overflow_and_grows_after_clean_backwards():
    layer, x, out, reference, _ = _half_graph()
    grad = torch.ones(4, 16)
    scaler = HopScaler(True, scale=2.0 ** 30, growth_interval=2)
    first = scaler.backward(out, grad, [x, layer.weight])
    assert scaler.overflows > 0 and scaler.scale < 2.0 ** 30
    torch.testing.assert_close(first[1], torch.autograd.grad(reference, layer.weight, grad)[0], rtol=2e-2, atol=1e-3)
    settled = scaler.scale
    with torch.autocast("cpu", dtype=torch.float16):
        again = layer(x)
    scaler.backward(again, grad, [x, layer.weight])
    assert scaler.scale == settled * 2  # two clean backwards in a row: the scale doubles


def test_a_backward_that_overflows_at_every_scale_is_refused():
    layer, x, out, _, grad = _half_graph()
    with pytest.raises(BadRequest, match="overflows float16 at every scale"):
        HopScaler(True, retries=2).backward(out, torch.full((4, 16), float("inf")), [x, layer.weight])


def test_bfloat16_and_float32_do_not_scale():
    assert HopScaler(False).scale == 1.0 and not HopScaler(False).enabled


def _executor(model_factory, precision: torch.dtype, **kwargs) -> StageExecutor:
    source = resolve_model(str(model_factory("llama", num_layers=2, hidden_size=32)))
    return StageExecutor(load_stage(source, LAYERS), 0, LAYERS, OptimizerSettings(lr=1e-3), precision=precision,
                         **kwargs)


def _pass(executor: StageExecutor, hidden: torch.Tensor, grad: torch.Tensor, request_id: str) -> torch.Tensor:
    inputs = ForwardInputs(hidden, None, None)
    executor.forward(ForwardRequest(stage=0, layers=LAYERS, request_id=request_id, train=True), inputs)
    executor.backward(BackwardRequest(stage=0, layers=LAYERS, request_id=request_id, num_samples=1), grad, None)
    return next(executor.module.parameters()).grad.clone()


def test_a_float16_stage_scales_its_backward_and_keeps_float32_masters(model_factory):
    """The gradient a float16 stage receives from a trainer is tiny (a mean loss over many tokens);
    unscaled, float16 would return zeros. The stage's parameter gradients match float32's."""
    hidden = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    grad = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2)) * 1e-6
    half, full = _executor(model_factory, torch.float16), _executor(model_factory, torch.float32)
    assert half.scaler.enabled and not full.scaler.enabled
    assert {p.dtype for p in half.module.parameters()} == {torch.float32}
    got, want = _pass(half, hidden, grad, "a"), _pass(full, hidden, grad, "a")
    assert float(got.abs().max()) > 0
    torch.testing.assert_close(got, want, rtol=0.1, atol=float(want.abs().max()) * 0.05)


def test_a_bfloat16_stage_computes_under_autocast_and_returns_float32(model_factory):
    hidden = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    half, full = _executor(model_factory, torch.bfloat16), _executor(model_factory, torch.float32)
    request = ForwardRequest(stage=0, layers=LAYERS, request_id="f", train=False)
    _, got = half.forward(request, ForwardInputs(hidden, None, None))
    _, want = full.forward(request, ForwardInputs(hidden, None, None))
    assert got.dtype == torch.float32 and not torch.equal(got, want)  # bfloat16 matmuls: not bit-equal
    torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2)


# -- AdamW in host memory --------------------------------------------------------------------------

def test_host_adamw_steps_exactly_as_adamw():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    b.load_state_dict(a.state_dict())
    plain = torch.optim.AdamW(a.parameters(), lr=1e-2, weight_decay=0.1)
    host = HostAdamW(b.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(3):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
        for model, optimizer in ((a, plain), (b, host)):
            model(x).square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(plain.state[p]["exp_avg_sq"], host.state[q]["exp_avg_sq"])
        assert host.state[q]["exp_avg"].device.type == "cpu"


def test_an_offloading_stage_uses_host_adamw(model_factory):
    assert isinstance(_executor(model_factory, torch.float32, offload_optimizer=True).optimizer, HostAdamW)
    assert type(_executor(model_factory, torch.float32).optimizer) is torch.optim.AdamW


@pytest.mark.parametrize("setting, free, resident, optimizer, expected", [
    (True, None, 1, 1, True),
    (False, 10, 100, 100, False),
    ("auto", None, 100, 100, False),      # the CPU: nowhere to offload to
    ("auto", 1000, 100, 100, False),      # everything fits
    ("auto", 150, 100, 100, True),        # only without AdamW's state
    ("auto", 50, 100, 100, False),        # not even then: placement refuses, offloading does not help
])
def test_offload_wanted(setting, free, resident, optimizer, expected):
    assert offload_wanted(setting, free=free, resident=resident, optimizer=optimizer) is expected


def test_offload_wanted_refuses_other_settings():
    with pytest.raises(ValueError, match="'sometimes'"):
        offload_wanted("sometimes", free=1, resident=1, optimizer=1)


# -- memory a stage is counted for -----------------------------------------------------------------

def test_stage_bytes_counts_masters_gradients_adamw_and_a_full_queue(model_factory):
    config = resolve_model(str(model_factory("llama", num_layers=2, hidden_size=32))).config
    params = stage_parameters(config, LAYERS)
    assert stage_bytes(config, LAYERS) == 16 * params  # float32 weights, gradients and two moments
    assert stage_bytes(config, LAYERS, torch.bfloat16) == 16 * params  # masters stay float32
    assert stage_bytes(config, LAYERS, offload_optimizer=True) == 8 * params
    queued = stage_bytes(config, LAYERS, torch.bfloat16, queue_tokens=1000)
    assert queued - 16 * params == activation_bytes(config, 2, 1000, torch.bfloat16) == 1000 * 2 * 17 * 32 * 2


@pytest.mark.parametrize("queue, cache, step_tokens, stages, expected", [
    (64, 64, 8 * 128, 2, 8 * 128),          # the README's batches: at most one step's tokens
    (64, 4, 100_000, 2, 4 * 1024),          # only the cached graphs count, each a microbatch at most
    (8, 64, 100_000, 2, 8 * 1024),          # ...and at most a queue of them
    (64, 64, 10_000 * 128, 2, 64 * 1024),   # a huge target batch still comes in microbatches
    (64, 64, 100, 1, 100),
])
def test_a_full_queue_holds_the_cached_microbatches_up_to_a_step(queue, cache, step_tokens, stages, expected):
    assert queue_tokens(queue, cache, step_tokens, stages) == expected


# -- swarm join --devices --------------------------------------------------------------------------

def test_plan_device_peers_gives_each_device_its_own_join():
    argv = ["join", "--bootstrap", "/ip4/1.2.3.4/tcp/5/p2p/X", "--devices", "cpu,cpu", "--device=cuda",
            "--state-dir", "/old", "--threads", "2"]
    plan = plan_device_peers(["cpu", "cpu"], argv, Path("/s"))
    assert [p.name for p in plan] == ["cpu-0", "cpu-1"]
    assert [p.state_dir for p in plan] == [Path("/s/cpu-0"), Path("/s/cpu-1")]
    assert plan[0].args == ("join", "--bootstrap", "/ip4/1.2.3.4/tcp/5/p2p/X", "--threads", "2", "--device", "cpu",
                            "--devices", "cpu", "--state-dir", "/s/cpu-0")
    gpus = plan_device_peers(["cuda:0", "cuda:3"], ["join", "--devices", "0,3"], Path("/s"))
    assert [(p.name, p.device) for p in gpus] == [("cuda0", "cuda:0"), ("cuda3", "cuda:3")]
    assert gpus[1].args == ("join", "--device", "cuda:3", "--devices", "cuda:3", "--state-dir", "/s/cuda3")


def test_plan_device_peers_needs_the_join_arguments():
    with pytest.raises(ValueError, match="swarm join"):
        plan_device_peers(["cpu"], ["train"], Path("/s"))


@pytest.mark.parametrize("dtype, setting, expected", [
    ("float32", None, None), ("bfloat16", None, 5e-2), ("float16", None, 1e-2), ("bfloat16", 1e-3, 1e-3)])
def test_spot_checks_allow_for_the_run_precision(dtype, setting, expected):
    """Outputs travel as float32 in every precision; replicas on other GPUs round their bfloat16 matmuls
    differently, so a bfloat16 run's spot checks must not hold them to float32's 1e-3."""
    assert run_tolerance(dtype, setting) == expected


@pytest.mark.parametrize("device, gpu, dtype, offload, expected", [
    ("cpu", None, "float32", False, "cpu (no GPU), float32"),
    ("cpu", None, "bfloat16", False, "cpu (no GPU), bfloat16 under autocast, float32 weights and AdamW state"),
    ("cuda:1", "NVIDIA H100", "float16", True,
     "cuda:1 (NVIDIA H100), float16 under autocast, float32 weights and AdamW state (AdamW in host memory)"),
])
def test_the_join_output_says_where_and_how_a_peer_computes(device, gpu, dtype, offload, expected):
    hardware = HardwareSummary(device=device, gpu_name=gpu)
    peer = SimpleNamespace(device=torch.device(device), telemetry=SimpleNamespace(hardware=lambda: hardware),
                           manifest=SimpleNamespace(dtype=dtype), offload_optimizer=offload)
    assert device_line(peer) == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a GPU")
def test_a_trainer_asking_for_a_missing_gpu_fails_before_joining():
    from trainer.model import SwarmModelForCausalLM

    with pytest.raises(ConfigError, match="device 'cuda:1': this machine has no CUDA GPU"):
        SwarmModelForCausalLM.from_pretrained(initial_peers=["/ip4/127.0.0.1/tcp/1/p2p/QmUnreachable"],
                                              device="cuda:1")
