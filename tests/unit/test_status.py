"""`swarm status` decisions as tables, and the rendered frame at 80 columns."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError
from rich.console import Console

from dht.schemas import (DataProgress, DataRecord, EvalPoint, GpuStats, HardwareSummary, Manifest, MetricsRecord,
                         MetricsRole, PeerRecord, PeerState)
from core.types import LayerRange
from peers.telemetry.status import (
    STALE_AFTER,
    STATUS_VERSION,
    Status,
    build_status,
    marginal_contributions,
    run_state,
    status_warnings,
)
from swarm.status_view import describe_device, render_status, sparkline


@pytest.mark.parametrize("capacities, expected", [
    # one peer per stage: each takes the whole swarm with it
    ([{"a": 100.0}, {"b": 50.0}], {"a": 50.0, "b": 50.0}),
    # replicas on the bottleneck: each removes its own share, but only down to the next bottleneck
    ([{"a": 100.0}, {"b": 30.0, "c": 40.0}], {"a": 70.0, "b": 30.0, "c": 40.0}),
    # a replica on a stage with slack removes nothing
    ([{"a": 100.0, "d": 100.0}, {"b": 50.0}], {"a": 0.0, "b": 50.0, "d": 0.0}),
    # removing a fast replica makes its stage the bottleneck: the drop is only partial
    ([{"a": 60.0, "d": 30.0}, {"b": 50.0}], {"a": 20.0, "b": 50.0, "d": 0.0}),
    # a peer serving two stages is removed from both
    ([{"a": 10.0, "x": 5.0}, {"b": 10.0, "x": 5.0}], {"a": 10.0, "b": 10.0, "x": 5.0}),
    # an uncovered stage: throughput is already 0, nobody's absence changes it
    ([{"a": 100.0}, {}], {"a": 0.0}),
    ([], {}),
])
def test_marginal_contributions(capacities, expected):
    assert marginal_contributions(capacities) == expected


@pytest.mark.parametrize("online, trainer_ages, expected", [
    ([1, 1], [5.0], "training"),
    ([1, 1], [500.0], "idle"),
    ([1, 1], [], "idle"),
    ([2, 0], [5.0], "blocked"),
    ([], [], "blocked"),
])
def test_run_state(online, trainer_ages, expected):
    assert run_state(online, trainer_ages) == expected


@pytest.mark.parametrize("stages, ages, expected", [
    ([["p1", "p2"], ["p3", "p4"]], {"p1": 1.0}, []),
    ([["p1", "p2"], ["peer0003"]], {}, ["stage 1 has one replica (peer0003): if it leaves, training stops"]),
    ([[], ["p1", "p2"]], {}, ["stage 0 has no online peer: training is blocked"]),
    ([["p1", "p2"]], {"oldpeer1": STALE_AFTER + 10, "p1": 3.0},
     [f"peer oldpeer1 is stale: its record was last refreshed {STALE_AFTER + 10:.0f} s ago"]),
])
def test_status_warnings(stages, ages, expected):
    assert status_warnings(stages, ages) == expected


def test_sparkline_spans_lowest_to_highest():
    assert sparkline([5.0, 4.0, 3.0, 1.0]) == "█▆▅▁"
    assert sparkline([2.0, 2.0]) == "▁▁" and sparkline([]) == ""


NOW = 1_000_000.0
PEER = "12D3KooW" + "A" * 38


def _record(peer: str, stage: int, throughput: float, *, age: float = 1.0, state=PeerState.ONLINE, **extra):
    return PeerRecord(peer_id=peer, stage=stage, layers=LayerRange(start=2 * stage, end=2 * stage + 2),
                      state=state, throughput=throughput, updated=NOW - age,
                      hardware=HardwareSummary(cpu_count=8, ram_gib=32, cpu_percent=40, ram_used_gib=9), **extra)


def _scenario():
    manifest = Manifest(run_id="demo", model="/models/tiny-gpt2", config_hash="h", num_layers=6,
                        stages=[LayerRange(start=0, end=2), LayerRange(start=2, end=4), LayerRange(start=4, end=6)])
    records = {
        0: [_record(PEER[:-1] + "1", 0, 900.0), _record(PEER[:-1] + "2", 0, 600.0)],
        1: [_record(PEER[:-1] + "3", 1, 400.0, load=3)],
        2: [_record(PEER[:-1] + "4", 2, 800.0, age=STALE_AFTER + 20),
            _record(PEER[:-1] + "5", 2, 700.0, delegate_of=PEER[:-1] + "9"),
            _record(PEER[:-1] + "6", 2, 0.0, state=PeerState.OFFLINE)],
    }
    metrics = [
        MetricsRecord(role=MetricsRole.TRAINER, peer_id="trainer1", updated=NOW - 2, step=42, loss=2.5,
                      loss_trend=[4.0, 3.2, 2.9, 2.5], tokens_per_s=512.0),
        MetricsRecord(role=MetricsRole.PEER, peer_id=PEER[:-1] + "3", updated=NOW - 1, tokens=3000,
                      microbatches=30, requests_per_s=2.0, tokens_per_s=256.0, ledger_entries=4),
        MetricsRecord(role=MetricsRole.PEER, peer_id=PEER[:-1] + "1", updated=NOW - 1, tokens=1000, microbatches=10),
    ]
    return manifest, records, metrics


def test_build_status_from_records():
    status = build_status(*_scenario(), now=NOW).model_dump(mode="json")  # what --json and /api/status show
    assert status["version"] == STATUS_VERSION
    assert status["run"] == {"state": "training", "step": 42, "loss": 2.5, "loss_trend": [4.0, 3.2, 2.9, 2.5],
                             "tokens_per_s": 512.0, "trainers": 1}
    assert [s["throughput"] for s in status["stages"]] == [1500.0, 400.0, 1500.0]
    assert status["bottleneck_stage"] == 1 and status["swarm_throughput"] == 400.0
    peers = {p["peer_id"][-1]: p for p in status["peers"]}
    assert set(peers) == {"1", "2", "3", "4", "5"}  # the offline peer is gone
    assert peers["3"]["marginal"] == 400.0 and peers["3"]["marginal_share"] == 1.0
    assert peers["1"]["marginal"] == 0.0
    assert peers["3"]["contribution_share"] == 0.75 and peers["3"]["tokens"] == 3000
    assert peers["4"]["stale"] and not peers["5"]["stale"]
    assert status["delegations"] == [{"delegate": PEER[:-1] + "5", "delegator": PEER[:-1] + "9", "stage": 2,
                                      "gpu_count": 0}]
    assert status["warnings"] == [
        "stage 1 has one replica (AAAAAAA3): if it leaves, training stops",
        f"peer AAAAAAA4 is stale: its record was last refreshed {STALE_AFTER + 20:.0f} s ago",
    ]


def _screen(status, width=80) -> list[str]:
    console = Console(width=width, record=True, force_terminal=False, color_system=None)
    console.print(render_status(status))
    return console.export_text().splitlines()


def test_rendered_frame_fits_80_columns_and_shows_everything():
    lines = _screen(build_status(*_scenario(), now=NOW))
    text = "\n".join(lines)
    assert max(len(line) for line in lines) <= 80
    assert "training" in text and "step 42" in text and "loss 2.500 █▄▃▁" in text
    row = next(line for line in lines if "AAAAAAA3" in line and "1◀" in line)  # the bottleneck, marked
    assert "400" in row and "8cpu 40% 9/32G" in row
    assert "stale" in next(line for line in lines if "AAAAAAA4" in line)
    assert "delegation" in text and "AAAAAAA9" in text
    assert "! stage 1 has one replica" in text
    assert "-400 (100%)" in text  # the marginal contribution of the bottleneck's only peer


DATA = DataRecord(peer_id=PEER, progress=DataProgress(dataset_id="0123456789abcdef", source="/data/corpus",
                                                     num_shards=16, epoch=1, shards_done=5, shards_in_progress=2,
                                                     tokens=1_234_567),
                  eval=EvalPoint(step=40, loss=2.25, perplexity=9.4877, tokens=4096, at=NOW - 3))


def test_the_data_progress_and_the_last_evaluation_are_shown_when_the_run_has_them():
    lines = _screen(build_status(*_scenario(), now=NOW, data=DATA))
    assert max(len(line) for line in lines) <= 80
    text = "\n".join(lines)
    assert "data epoch 1  shards 5/16 done, 2 in progress  1,234,567 tokens seen" in text
    assert "eval loss 2.250  perplexity 9.49 (step 40)" in text
    plain = "\n".join(_screen(build_status(*_scenario(), now=NOW)))
    assert "data epoch" not in plain and "eval loss" not in plain


def test_delegation_section_only_when_there_are_links():
    manifest, records, metrics = _scenario()
    records[2] = records[2][:1]
    assert "delegation" not in "\n".join(_screen(build_status(manifest, records, metrics, now=NOW)))


def test_gpu_hardware_column():
    manifest, records, metrics = _scenario()
    gpu = HardwareSummary(gpu_name="NVIDIA H100", gpu_memory_gib=80, gpu_count=1, gpu_util_percent=87,
                          gpu_memory_used_gib=61, gpu_temperature_c=71)
    records[1] = [records[1][0].model_copy(update={"hardware": gpu})]
    lines = _screen(build_status(manifest, records, metrics, now=NOW))
    assert "1xGPU 87% 61/80G 71C" in next(line for line in lines if "AAAAAAA3" in line and "◀" in line)


def test_a_peer_serving_several_stages_is_one_peer_on_each_of_its_rows():
    """A span peer has a record per stage (each with its per-stage share): status lists it once with all
    its stages, counts it on each stage, and removing it costs every stage it holds."""
    manifest, _, metrics = _scenario()
    span, solo = PEER[:-1] + "7", PEER[:-1] + "8"
    records = {0: [_record(span, 0, 300.0)], 1: [_record(span, 1, 300.0), _record(solo, 1, 200.0)],
               2: [_record(solo, 2, 500.0)]}
    status = build_status(manifest, records, metrics, now=NOW)
    peers = {p.peer_id[-1]: p for p in status.peers}
    assert peers["7"].stages == [0, 1] and peers["8"].stages == [1, 2]
    assert [s.peers for s in status.stages] == [[span], [span, solo], [solo]]
    assert [s.throughput for s in status.stages] == [300.0, 500.0, 500.0]
    assert status.bottleneck_stage == 0 and peers["7"].marginal == 300.0 and peers["8"].marginal == 300.0
    lines = _screen(status)
    rows = [line for line in lines if "AAAAAAA7" in line and "online" in line]
    assert len(rows) == 2 and all("300" in row for row in rows)  # one row per stage it serves
    assert "[0, 2)" in rows[0] and "0◀" in rows[0]


def test_the_status_json_keeps_its_version_5_fields_and_round_trips():
    """``swarm status --json`` and ``/api/status`` are a protocol: the model's JSON has exactly the
    fields of version 5 (version 2's, then the data progress and the last evaluation (3), then each
    peer's ``latency_ms`` (4), then each peer's ``relay`` (5)), and reads back into an equal model (what a
    client of the API does)."""
    status = build_status(*_scenario(), now=NOW, data=DATA)
    data = json.loads(status.model_dump_json())
    assert list(data) == ["version", "time", "run_id", "step", "trainers", "model", "num_layers", "target_batch_size",
                          "run", "stages", "peers", "bottleneck_stage", "swarm_throughput", "delegations", "warnings",
                          "data", "eval"]
    assert list(data["data"]) == ["dataset_id", "source", "num_shards", "epoch", "shards_done", "shards_in_progress",
                                  "tokens"]
    assert list(data["eval"]) == ["step", "loss", "perplexity", "tokens", "at"]
    assert list(data["peers"][0]) == [
        "peer_id", "stages", "state", "throughput", "load", "maddrs", "hardware", "age", "delegate_of", "step",
        "requests_per_s", "tokens_per_s", "tokens", "microbatches", "ledger_entries", "marginal", "marginal_share",
        "stale", "contribution_share", "latency_ms", "relay"]
    assert data["version"] == 5
    assert Status.model_validate(data) == status
    with pytest.raises(ValidationError, match="extra"):
        Status.model_validate(data | {"surprise": 1})


def test_the_gpu_a_peer_serves_on_is_shown_with_its_own_figures():
    """A peer on cuda:1 shows that GPU (utilisation, memory, temperature, power) in its row, and its
    join line says the same; a CPU peer's join line says it has no GPU."""
    manifest, records, metrics = _scenario()
    gpu = HardwareSummary(device="cuda:1", gpu_name="NVIDIA H100", gpu_memory_gib=80, gpu_count=2,
                          gpus=[GpuStats(index=1, name="NVIDIA H100", util_percent=87, memory_used_gib=61,
                                         memory_total_gib=80, temperature_c=71, power_w=312)])
    records[1] = [records[1][0].model_copy(update={"hardware": gpu})]
    status = build_status(manifest, records, metrics, now=NOW)
    lines = _screen(status)
    assert "gpu1 87% 61/80G 71C 312W" in next(line for line in lines if "AAAAAAA3" in line and "◀" in line)
    assert describe_device(gpu) == "cuda:1 H100 87% 61/80G 71C 312W"
    assert describe_device(HardwareSummary(device="cpu")) == "cpu (no GPU)"
    assert json.loads(status.model_dump_json())["peers"][0]["hardware"]["gpus"] is not None


def test_a_peer_behind_nat_is_marked_with_its_relay():
    """A peer whose record announces a circuit address is marked "relayed" (the view) and carries the
    relay's id (the JSON); peers dialed directly carry none."""
    manifest, records, metrics = _scenario()
    home = records[1][0]
    relay = "12D3KooWRelayRelayRelay9"
    circuit = f"/ip4/10.0.0.1/tcp/31337/p2p/{relay}/p2p-circuit/p2p/{home.peer_id}"
    records[1] = [home.model_copy(update={"maddrs": ["/ip4/192.168.1.2/tcp/4000/p2p/" + home.peer_id, circuit]})]
    status = build_status(manifest, records, metrics, now=NOW)
    marked = {p.peer_id: p.relay for p in status.peers}
    assert marked[home.peer_id] == relay and all(r is None for p, r in marked.items() if p != home.peer_id)
    lines = _screen(status)
    assert any(f"{home.peer_id[-8:]} relayed" in line for line in lines)
    assert sum("relayed" in line for line in lines) == 1
