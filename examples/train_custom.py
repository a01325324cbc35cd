"""Train a swarm's model from your own script: an ordinary PyTorch loop over SwarmModelForCausalLM.

Start a run and peers first (see the README), then:

    .venv/bin/python examples/train_custom.py --bootstrap /ip4/127.0.0.1/tcp/PORT/p2p/PEER_ID

The embeddings and LM head are ordinary local parameters, so any optimizer and any loss work; the
transformer layers run on the peers, which step their AdamW when the run's batch (``target_batch_size``
sequences) is complete. With several trainers on one run, use ``model.create_optimizer()`` instead: it
keeps the trainers' local parameters equal.
"""

from __future__ import annotations

import argparse

import torch

import swarm
from swarm.data import random_batches, stdlib_corpus


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True, help="the multiaddr `swarm bootstrap` printed")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--run", default="swarm", help="run id, if the bootstrap was given --run")
    args = parser.parse_args()

    with swarm.connect(args.bootstrap, run_id=args.run) as model:  # a torch nn.Module
        opt = model.manifest.optimizer
        optimizer = torch.optim.AdamW(model.parameters(), lr=opt.lr, weight_decay=opt.weight_decay)
        batches = random_batches(stdlib_corpus(), model.target_batch_size, 128)
        for step in range(args.steps):
            input_ids = next(batches)
            loss = model(input_ids, labels=input_ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            print(f"step {step:3d}  loss {loss.item():.3f}")


if __name__ == "__main__":
    main()
