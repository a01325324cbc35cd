"""Generation speed: decode tokens/s and time to first token of (a) transformers' ``generate`` locally
and (b) ``SwarmModelForCausalLM.generate`` through a 2-peer swarm on loopback (KV cache on the peers),
side by side in one run, with their ratios.

    .venv/bin/python benchmarks/generate_throughput.py          # Llama-style, width 512, 8 layers, batch 8
    .venv/bin/python benchmarks/generate_throughput.py --batch 1 --new-tokens 128
    .venv/bin/python benchmarks/generate_throughput.py --device cuda --dtype bfloat16 --layers 16 --hidden 1024

Both sides greedy-decode the same prompts for exactly ``--new-tokens`` tokens (the local side with
``min_new_tokens``, the swarm side without an end token). Time to first token is from the call to the
first new token (prefill included); decode tokens/s is ``batch * (new - 1)`` over the time from the
first to the last token. Rounds alternate local and swarm so a noisy minute hits both; the medians
are reported. Every process (local, client, each peer) uses ``--threads`` torch threads.

``--no-channel`` sends every call over libp2p streams (the peers' and the client's data channel off,
``net.channel``), to compare with the default. The load average is printed before and after.

``--breakdown`` adds, for each swarm round, where a decode step's time went: the sessions' open
(route planning included), and per step (medians) each hop's round trip as the client saw it, the
peer's compute in it (``StepResponse.compute_ms``), the rest of that round trip (the transport, both
processes' Python, the hand-overs to the compute thread), and what the client spent outside the hops
(head, sampling, embedding, its thread hand-overs).

``--device`` puts the peers, the swarm's client (embeddings, head) and the local model on that device
(default cpu); ``--dtype`` is the run's precision, the local model generating under the same autocast.
"""

from __future__ import annotations

import harness  # before any project module: this checkout first on sys.path

import os
import statistics
import time
from typing import Callable

import torch
from transformers import AutoModelForCausalLM

from shards.devices import compute_context, resolve_device
from trainer.model import SwarmModelForCausalLM


class _Clock:
    """A transformers streamer that notes when each new token arrives (the first ``put`` is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, tokens: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _measure(generate: Callable[[_Clock], torch.Tensor], batch: int, new_tokens: int) -> tuple[float, float]:
    """(time to first token in s, decode tokens/s) of one generation."""
    clock = _Clock()
    started = time.perf_counter()
    out = generate(clock)
    new = clock.times[1:]
    assert len(new) == new_tokens and out.shape[0] == batch, f"generated {len(new)} tokens, not {new_tokens}"
    return new[0] - started, batch * (new_tokens - 1) / (new[-1] - new[0])


def _breakdown(session, hops: list[tuple[float, float]], times: list[float]) -> str:
    """One line: the sessions' open, and the medians of a decode step's parts (``--breakdown``)."""
    per_step = len(session.stages)
    decode = hops[per_step:]  # the first step of each hop is the prefill
    step_ms = statistics.median((b - a) * 1000 for a, b in zip(times[1:], times[2:]))
    trip = statistics.median(t for t, _ in decode)
    compute = statistics.median(c for _, c in decode)
    return (f"  breakdown: open {session.open_seconds * 1000:.1f} ms; decode step {step_ms:.2f} ms = {per_step} hops x "
            f"(round trip {trip:.2f} ms: peer compute {compute:.2f} + rest {trip - compute:.2f}) + client outside "
            f"the hops {step_ms - per_step * trip:.2f} ms (medians)")


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens per row")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-channel", action="store_true", help="libp2p streams only (no direct data channel)")
    parser.add_argument("--breakdown", action="store_true", help="per swarm round: open, and per step each hop's "
                        "round trip, the peer's compute in it and the client's time outside the hops")
    harness.add_device_flags(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)

    root, model_dir = harness.workspace("swarm-bench-generate-", "llama", num_layers=args.layers,
                                        hidden_size=args.hidden, num_heads=args.hidden // 64,
                                        max_positions=args.prompt + args.new_tokens + 8)
    prompts = torch.randint(0, 256, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
    print(f"model: Llama-style, {args.layers} layers, width {args.hidden}; batch {args.batch}, prompt {args.prompt}, "
          f"{args.new_tokens} new tokens (greedy); {args.rounds} interleaved rounds after a warm-up; "
          f"torch threads {args.threads}; device {args.device}, dtype {args.dtype}; "
          f"{'libp2p only' if args.no_channel else 'data channel'}; load average {os.getloadavg()[0]:.1f}")

    local_model = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    on_device = prompts.to(device)

    def local(clock: _Clock) -> torch.Tensor:
        with compute_context(device, getattr(torch, args.dtype)):
            return local_model.generate(on_device, attention_mask=torch.ones_like(on_device),
                                        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                        do_sample=False, streamer=clock)

    results: dict[str, list[tuple[float, float]]] = {"local": [], "swarm": []}
    with harness.local_swarm(root, model_dir, num_stages=2, num_peers=2, threads=args.threads,
                             bootstrap_args=["--dtype", args.dtype],
                             peer_env={**harness.peer_env(args.device),
                                       **({"SWARM_NETWORK__CHANNEL": "false"} if args.no_channel else {})}) as (_, address):
        with SwarmModelForCausalLM.from_pretrained(initial_peers=[address], device=args.device,
                                                   channel=not args.no_channel) as remote:

            hops: list[tuple[float, float]] = []  # (round trip, peer compute) in ms of each step, every hop
            remote.inference_client.on_step = lambda peer, seconds, reply: hops.append(
                (seconds * 1000, reply.compute_ms))

            def swarm(clock: _Clock) -> torch.Tensor:
                hops.clear()
                out = remote.generate(prompts, max_new_tokens=args.new_tokens, eos_token_id=[], streamer=clock)
                if args.breakdown:
                    print(_breakdown(remote.last_session, hops, clock.times))
                return out

            sides = {"local": local, "swarm": swarm}
            for name, run in sides.items():  # warm-up: first calls allocate, connect and fill caches
                _measure(run, args.batch, args.new_tokens)
            for round_ in range(args.rounds):
                for name, run in sides.items():
                    results[name].append(_measure(run, args.batch, args.new_tokens))
                (lt, ld), (st, sd) = results["local"][-1], results["swarm"][-1]
                print(f"round {round_ + 1}: local TTFT {lt * 1000:6.0f} ms, {ld:7.1f} tok/s | swarm TTFT "
                      f"{st * 1000:6.0f} ms, {sd:7.1f} tok/s | decode ratio {sd / ld:.2f}")

    ttft = {name: statistics.median(r[0] for r in rows) for name, rows in results.items()}
    decode = {name: statistics.median(r[1] for r in rows) for name, rows in results.items()}
    for name in ("local", "swarm"):
        print(f"{name:6s} decode {decode[name]:8.1f} tokens/s, time to first token {ttft[name] * 1000:6.0f} ms "
              f"(medians)")
    print(f"ratio swarm/local decode tokens/s: {decode['swarm'] / decode['local']:.2f}")
    print(f"ratio swarm/local time to first token: {ttft['swarm'] / ttft['local']:.2f} (targets: decode >= 0.8, "
          f"TTFT <= 1.2); load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
