"""Volunteers behind NAT, in Linux network namespaces (``benchmarks/netns.py``): the bootstrap, a
public peer and the trainer sit on a "public" network; the other peers each sit in a home behind a
router that masquerades their addresses and drops every new connection from outside, with no port
forwarding. Peers join as the README says (``swarm join --bootstrap ...``, no stage, no flag about
NAT); the trainer runs the README's plain loop. The yardstick: the exported weights equal those of
local AdamW training on the same batches.

Skips, saying why, where namespaces cannot be made (not root, no ``nft``). Every namespace and
process is removed at the end, also on a failure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from benchmarks.netns import Network, Processes, netns_unavailable
from shards.tiny import make_tiny_model
from tests.helpers import local_adamw, max_difference

pytestmark = [pytest.mark.slow, pytest.mark.skipif(netns_unavailable(nat=True) is not None,
                                                   reason=f"network namespaces: {netns_unavailable(nat=True)}")]

LR = 3e-3
MODEL = dict(family="gpt2", num_layers=4, hidden_size=64, num_heads=4, vocab_size=256, max_positions=64)
TOLERANCE = 1e-4  # as test_free_placement: a replica's sums in another order, AdamW's first steps
BOOT_PORT = 31337
# the "public" network on public-looking addresses, as on the internet: a relay serves with its own
# limits only once AutoNAT finds it public, which it never does on a private address (net.relay)
PUBLIC_NET = "11.83"

# the trainer, in its namespace: on each line "N" from stdin, N steps of the README's loop on the
# next saved batches, then "done"; at the end of stdin it uploads its state
TRAINER = """
import sys, torch, swarm
address, host, path = sys.argv[1:4]
batches = iter(torch.load(path))
with swarm.connect(address, host=host) as model:
    optimizer = model.create_optimizer()
    done = 0
    for line in sys.stdin:
        for _ in range(int(line)):
            ids = next(batches)
            loss = model(ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            done += 1
        print("done", done, flush=True)
    assert model.upload_local_state(done) >= 1
"""


def _batches(count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randint(0, 256, (8, 32), generator=generator) for _ in range(count)]


class _Run:
    """A bootstrap, peers and a trainer in a ``Network``; CLI calls made from the trainer's host."""

    def __init__(self, net: Network, root: Path, model_dir: Path, stages: int = 2):
        self.net, self.root, self.procs = net, root, Processes(net, root)
        boot = net.add_host("boot")
        self.trainer_ip = net.add_host("trainer")
        self.procs.start("boot", ["-m", "swarm.cli", "bootstrap", "--open", "--model", str(model_dir),
                                  "--num-stages", str(stages), "--host", boot, "--port", str(BOOT_PORT),
                                  "--state-dir", str(root / "boot"), "--lr", str(LR), "--target-batch-size", "8",
                                  "--dashboard-port", "0"])
        line = self.procs.wait_line("boot", "swarm join --bootstrap")
        self.address = line.split("--bootstrap", 1)[1].split()[0]

    def join(self, host: str, *extra: str) -> None:
        """``swarm join`` as the README has it, on ``host``'s own address."""
        self.procs.start(host, ["-m", "swarm.cli", "join", "--bootstrap", self.address, "--host", self.net.ip(host),
                                "--threads", "1", "--state-dir", str(self.root / host), *extra])

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        result = subprocess.run(["ip", "netns", "exec", self.net.ns("trainer"), sys.executable, "-m", "swarm.cli",
                                 *args, "--bootstrap", self.address], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    def peers(self) -> list[dict]:
        return json.loads(self.cli("status", "--json").stdout)["peers"]

    def trainer(self, batches: list[torch.Tensor]) -> subprocess.Popen:
        torch.save(batches, self.root / "batches.pt")
        return self.procs.start("trainer", ["-c", TRAINER, self.address, self.trainer_ip, str(self.root / "batches.pt")],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def exported(self, out: Path) -> dict[str, torch.Tensor]:
        self.cli("export", "--out", str(out))
        return AutoModelForCausalLM.from_pretrained(out).state_dict()


def _steps(trainer: subprocess.Popen, count: int) -> None:
    trainer.stdin.write(f"{count}\n")
    trainer.stdin.flush()
    line = trainer.stdout.readline()
    assert line.startswith("done"), f"the trainer stopped: {line!r}"


def _finish(trainer: subprocess.Popen) -> None:
    trainer.stdin.close()
    assert trainer.wait(timeout=120) == 0


def _train_and_export(run: _Run, batches: list[torch.Tensor], out: Path) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Every batch through the README's loop, then the exported weights and the peers status shows."""
    trainer = run.trainer(batches)
    _steps(trainer, len(batches))
    _finish(trainer)
    return run.exported(out), run.peers()


def _relayed(peers: list[dict], peer_id: str) -> list[str]:
    (peer,) = [p for p in peers if p["peer_id"] == peer_id]
    return [a for a in peer["maddrs"] if "/p2p-circuit" in a]


def _log(root: Path, host: str) -> str:
    """``host``'s log with its line breaks (rich wraps at 80 columns) taken out."""
    return " ".join((root / f"{host}.log").read_text(errors="replace").split())


@pytest.mark.timeout(600)
def test_a_peer_behind_nat_serves_the_trainer_through_a_relay_and_trains_like_local(tmp_path):
    model_dir = make_tiny_model(tmp_path / "model", **MODEL)
    batches = _batches(6)
    with Network("swn-", net=PUBLIC_NET) as net:
        run = _Run(net, tmp_path, model_dir)
        try:
            net.add_host("pub")
            net.add_home("home1", ["peer"])
            run.join("pub")
            run.join("home1-peer")
            run.procs.wait_line("home1-peer", "Ctrl+C to leave")
            served = {p["peer_id"]: p for p in run.peers()}
            exported, peers = _train_and_export(run, batches, tmp_path / "exported")
        finally:
            run.procs.stop()
    reach = _log(tmp_path, "home1-peer")
    assert len(served) == 2, served
    home = next(p for p in peers if any("192.168." in a for a in p["maddrs"]))
    relayed = _relayed(peers, home["peer_id"])
    assert relayed, f"the peer behind NAT announces no relayed address: {home['maddrs']}"
    relay = relayed[0].split("/p2p-circuit")[0].rsplit("/p2p/", 1)[1]
    assert f"behind NAT: reachable through relay {relay}" in reach, reach[-3000:]
    assert home["relay"] == relay and all(p["relay"] is None for p in peers if p is not home)  # what status marks
    assert not any(_relayed(peers, p["peer_id"]) for p in peers if p is not home)
    local = local_adamw(model_dir, batches, lr=LR)
    assert max_difference(exported, AutoModelForCausalLM.from_pretrained(model_dir).state_dict()) > 1e-3
    assert max_difference(exported, local) <= TOLERANCE


@pytest.mark.timeout(900)
def test_two_peers_behind_two_nats_pass_activations_and_outlive_their_relay(tmp_path):
    """Stages 1 and 2 on peers in two different homes: the stage-1 peer pushes its activations to the
    stage-2 peer through the latter's relay. Stage 0 has two public replicas, and the one that
    relays for a home is SIGKILLed mid-run: the home peers move to another relay, no step is lost."""
    model_dir = make_tiny_model(tmp_path / "model", **{**MODEL, "num_layers": 6})
    batches = _batches(8)
    with Network("swn-", net=PUBLIC_NET) as net:
        run = _Run(net, tmp_path, model_dir, stages=3)
        try:
            for host in ("pub1", "pub2"):
                net.add_host(host)
                run.join(host, "--stage", "0")
                run.procs.wait_line(host, "Ctrl+C to leave")
            net.add_home("home1", ["peer"])
            net.add_home("home2", ["peer"])
            run.join("home1-peer", "--stage", "1")
            run.join("home2-peer", "--stage", "2")
            for host in ("home1-peer", "home2-peer"):
                run.procs.wait_line(host, "Ctrl+C to leave")
            before = run.peers()
            ids = {p["peer_id"]: p for p in before}
            homes = [p["peer_id"] for p in before if any("192.168." in a for a in p["maddrs"])]
            relays = {home: _relayed(before, home)[0].split("/p2p-circuit")[0].rsplit("/p2p/", 1)[1] for home in homes}
            victim = next(iter(relays.values()))
            (victim_host,) = [h for h in ("pub1", "pub2") if f"identity peer {victim}" in _log(tmp_path, h)]
            trainer = run.trainer(batches)
            _steps(trainer, 4)
            run.procs.kill(victim_host)
            _steps(trainer, 4)
            _finish(trainer)
            exported = run.exported(tmp_path / "exported")
            after = run.peers()
        finally:
            run.procs.stop()
    assert len(homes) == 2 and victim in ids, (homes, relays)
    for home in homes:
        now = _relayed(after, home)
        assert now and victim not in now[0], f"{home[-8:]} still announces the dead relay: {now}"
    pushes = _log(tmp_path, "home2-peer")
    assert "were lost" not in pushes and "were lost" not in _log(tmp_path, "home1-peer")
    local = local_adamw(model_dir, batches, lr=LR)
    assert max_difference(exported, local) <= TOLERANCE


def _replicas(peers: list[dict], stages: int) -> dict[int, list[dict]]:
    return {stage: [p for p in peers if stage in p["stages"]] for stage in range(stages)}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("pinned", [False, True], ids=["unpinned", "both-replicas-behind-nat"])
def test_replicas_behind_nat_average_their_gradients_and_train_like_local(tmp_path, pinned):
    """A stage held by two replicas, one or both of them behind NAT: every optimizer step averages
    their gradients (hivemind's all-reduce, whose child process dials the other member by its peer id
    alone), so that round must reach a replica through its relay. Unpinned: a public peer and two
    homes join at once and placement decides; pinned: the two homes both hold stage 1, each behind
    its own NAT. Both replicas apply every step (routing may send every microbatch to the faster
    one: the other averages zeros in), and the weights equal local AdamW."""
    model_dir = make_tiny_model(tmp_path / "model", **MODEL)
    batches = _batches(6)
    with Network("swa-", net="11.84") as net:
        run = _Run(net, tmp_path, model_dir)
        try:
            net.add_host("pub")
            net.add_home("home1", ["peer"])
            net.add_home("home2", ["peer"])
            hosts = ("pub", "home1-peer", "home2-peer")
            for host in hosts:
                run.join(host, *(("--stage", "0" if host == "pub" else "1") if pinned else ()))
            for host in hosts:
                run.procs.wait_line(host, "Ctrl+C to leave")
            exported, peers = _train_and_export(run, batches, tmp_path / "exported")
        finally:
            run.procs.stop()
    homes = {p["peer_id"] for p in peers if any("192.168." in a for a in p["maddrs"])}
    # unpinned, placement decides: a home and another peer share a stage (a peer may serve both)
    pairs = [replicas for replicas in _replicas(peers, 2).values() if len(replicas) == 2]
    pairs = [pair for pair in pairs if homes & {p["peer_id"] for p in pair}]
    assert pairs, f"no stage with two replicas, one behind NAT: {peers}"
    if pinned:
        assert [{p["peer_id"] for p in pair} for pair in pairs] == [homes]
    for pair in pairs:  # each step's members are the stage's live replicas: both applied every step
        assert [p["step"] for p in pair] == [len(batches)] * 2, [(p["peer_id"][-8:], p["step"]) for p in pair]
        assert sum(p["microbatches"] for p in pair) > 0
    for host in hosts:
        assert "AveragingFailed" not in _log(tmp_path, host), _log(tmp_path, host)[-3000:]
    local = local_adamw(model_dir, batches, lr=LR)
    assert max_difference(exported, local) <= TOLERANCE
