"""Fine-tune a swarm's model on a local jsonl file, from your own loop.

Start a run and peers first (see the README), then:

    .venv/bin/python examples/finetune_jsonl.py --bootstrap /ip4/127.0.0.1/tcp/PORT/p2p/PEER_ID \\
        --data my_texts.jsonl --steps 100

Each line of the file is a JSON object with a ``text`` field (``--text-column`` for another name). The
file is read through Hugging Face ``datasets``, tokenized with the model's tokenizer (bytes for the
demo's byte-level models), packed into ``--seq-len`` sequences with an end-of-sequence token between
documents, and cut into shards that the run's bootstrap leases to trainers: start this script on two
machines (each with a copy of the file at the same path) and they train on different samples.
``data.commit(step)`` after each step tells the bootstrap how far this trainer read, so a trainer that
takes the shard over after a crash goes on from there.
"""

from __future__ import annotations

import argparse
import itertools

import swarm
from swarm import AssignedBatches, DatasetSpec
from swarm.evaluation import eval_batches, evaluate
from swarm.serving import codec_of


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True, help="the multiaddr `swarm bootstrap` printed")
    parser.add_argument("--data", required=True, help="a .jsonl file with one {\"text\": ...} per line")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--shards", type=int, default=8, help="shards the file is cut into (more than trainers)")
    parser.add_argument("--run", default="swarm", help="run id, if the bootstrap was given --run")
    args = parser.parse_args()

    spec = DatasetSpec(source=args.data, text_column=args.text_column, num_shards=args.shards)
    with swarm.connect(args.bootstrap, run_id=args.run) as model:  # a torch nn.Module
        optimizer = model.create_optimizer()
        held_out = eval_batches(spec, codec_of(model), batch_size=model.target_batch_size, seq_len=args.seq_len,
                                batches=1)  # the file's first sequences, the same every time
        with AssignedBatches.for_model(model, spec, batch_size=model.target_batch_size, seq_len=args.seq_len) as data:
            for step, input_ids in enumerate(itertools.islice(data, args.steps)):
                loss = model(input_ids, labels=input_ids).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                data.commit(model.step)
                print(f"step {step:3d}  loss {loss.item():.3f}  shard {data.lease.shard} of epoch {data.lease.epoch}")
        result = evaluate(model, held_out)
        print(f"loss on the file's first {result.tokens} tokens: {result.loss:.3f} "
              f"(perplexity {result.perplexity:.1f})")


if __name__ == "__main__":
    main()
