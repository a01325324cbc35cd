"""``swarm train``: train the run's model through the swarm, with a live bar.

The data is the dataset the trainer names (``[data]``, ``--dataset``), else the run's (the manifest's),
read from the shards the run leases to this trainer (``swarm.assigned``) and committed after every
step; a run with no dataset trains on the Python stdlib's source as bytes (the demo). With
``eval_every``, the held-out split is evaluated through the swarm every that many steps and the
result sent to the bootstrap.

This is the loop a researcher would write with ``SwarmModelForCausalLM``; the demo runs it as its
trainer process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from core.config import DataSettings, MonitorSettings, TrainerSettings
from dht.schemas import DatasetSpec
from peers.data.client import DataClient, find_data_service
from peers.data.spec import spec_from_settings
from swarm.assigned import AssignedBatches
from swarm.data import decode_bytes, random_batches, stdlib_corpus
from swarm.evaluation import eval_batches, evaluate
from swarm.serving import codec_of
from core.errors import ConfigError, RunStopped, SwarmError
from trainer.generation import max_positions
from trainer.model import SwarmModelForCausalLM
from trainer.reporting import TrainerReporter

__all__ = ["TrainResult", "train"]

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)
    run_step: int = 0  # the collaborative step counter after the last batch
    tokens_per_second: float = 0.0
    sample: str = ""
    data: dict = field(default_factory=dict)  # the dataset and the spans of its shards this trainer committed
    evals: list[dict] = field(default_factory=list)  # {step, loss, perplexity, tokens} of each evaluation

    @property
    def first_loss(self) -> float:
        return self.losses[0]

    @property
    def last_loss(self) -> float:
        """Mean of the last few steps, so one noisy batch does not decide."""
        tail = self.losses[-min(10, len(self.losses)) :]
        return sum(tail) / len(tail)


def train(
    initial_peers: list[str],
    *,
    run_id: str = "swarm",
    steps: int = 200,
    seq_len: int = 128,
    batch_size: int | None = None,
    seed: int = 0,
    sample_tokens: int = 120,
    trainer: TrainerSettings = TrainerSettings(),
    result_path: Path | None = None,
    console: Console | None = None,
    monitor: MonitorSettings | None = None,
    key: str | None = None,
    data: DataSettings = DataSettings(),
) -> TrainResult:
    """Train ``steps`` batches; ``result_path`` (JSON) is rewritten after every step, so whoever
    watches the run (the demo, the churn test) sees how far it got. ``trainer``: how the model calls
    the stages and waits for them, and how often the local parts are uploaded (``checkpoint_every``).
    ``data``: the dataset (default: the run's) and the evaluation."""
    if data.eval_every and not data.eval_split:
        raise ConfigError("--eval-every needs --eval-split (the held-out split to evaluate on)")
    console = console or Console()
    torch.manual_seed(seed)
    with console.status("joining the swarm and loading the local layers..."):
        model = SwarmModelForCausalLM.from_pretrained(initial_peers=initial_peers, run_id=run_id, key=key,
                                                      **trainer.model_dump(exclude={"checkpoint_every"}))
    with model, TrainerReporter.for_model(model, monitor) as reporter:
        manifest = model.manifest
        batch_size = batch_size or manifest.target_batch_size
        if batch_size != manifest.target_batch_size:
            logger.info("batch %d != the run's target batch %d: a step closes every %d sequences, "
                        "from this trainer and any others", batch_size, manifest.target_batch_size,
                        manifest.target_batch_size)
        console.print(f"training {escape(manifest.model)} ({manifest.num_layers} layers in {manifest.num_stages} "
                      f"stages) for {steps} steps of {batch_size}x{seq_len} tokens")
        spec = spec_from_settings(data) or manifest.dataset
        with _batches(model, spec, batch_size, seq_len, seed, console) as batches:
            loop = _Loop(model, reporter, batches, TrainResult(steps=steps), result_path, trainer.checkpoint_every)
            if data.eval_every:
                loop.evaluator = _Evaluator.for_model(model, spec, data, batch_size, seq_len)
            result = loop.run(steps, console)
        if not result.losses:
            console.print("no step was trained")
            return result
        result.sample = _sample(model, sample_tokens, seed)
    console.print(f"first loss [bold]{result.first_loss:.3f}[/], last loss [bold]{result.last_loss:.3f}[/] "
                  f"(mean of the last 10 steps), {result.tokens_per_second:,.0f} tokens/s")
    console.rule("sample")
    console.print(result.sample, markup=False, highlight=False)
    console.rule()
    if result_path is not None:
        _write_result(result_path, result)
    return result


@contextlib.contextmanager
def _batches(model: SwarmModelForCausalLM, spec: DatasetSpec | None, batch_size: int, seq_len: int, seed: int,
             console: Console) -> Iterator[Iterator[torch.Tensor]]:
    """The leased shards of ``spec`` (given back at the end), or the stdlib corpus when there is none."""
    if spec is None:
        yield random_batches(stdlib_corpus(), batch_size, seq_len, seed=seed)
        return
    console.print(f"data: {escape(spec.source)} (split {escape(spec.split)}, {spec.num_shards} shards leased by the run)")
    with AssignedBatches.for_model(model, spec, batch_size=batch_size, seq_len=seq_len) as batches:
        yield batches


@dataclass
class _Evaluator:
    """Every ``every`` steps: the held-out loss of the swarm's weights on fixed batches, sent to the
    bootstrap (``swarm status``, the dashboard, Prometheus)."""

    batches: list[torch.Tensor]
    client: DataClient
    dataset_id: str
    every: int

    @classmethod
    def for_model(cls, model: SwarmModelForCausalLM, spec: DatasetSpec | None, data: DataSettings, batch_size: int,
                  seq_len: int) -> "_Evaluator":
        if spec is None:
            raise ConfigError("--eval-split needs a dataset: --dataset, or a run started with one")
        held_out = spec.model_copy(update={"split": data.eval_split})
        batches = eval_batches(held_out, codec_of(model), batch_size=batch_size, seq_len=seq_len,
                               batches=data.eval_batches)
        client = DataClient(model.pipeline.client.transport, lambda: find_data_service(model.dht))
        return cls(batches, client, held_out.dataset_id, data.eval_every)

    def __call__(self, model: SwarmModelForCausalLM, result: TrainResult) -> None:
        found = evaluate(model, self.batches)
        point = {"step": model.step, "loss": round(found.loss, 6), "perplexity": round(found.perplexity, 4),
                 "tokens": found.tokens}
        result.evals.append(point)
        try:
            model.loop.run(self.client.report_eval(self.dataset_id, model.step, found.loss, found.tokens), timeout=120)
        except SwarmError as e:  # the figure is in the result; the bootstrap's copy is for people
            logger.warning("sending the evaluation at step %d to the bootstrap failed: %s", model.step, e)


class _Loop:
    """The README's loop (a step, the optimizer, the bar), with what a run needs around it: pauses
    and stops by the run owner, the result file, reports for ``swarm status``, uploads of local parts."""

    def __init__(self, model: SwarmModelForCausalLM, reporter: TrainerReporter, batches: Iterator[torch.Tensor],
                 result: TrainResult, result_path: Path | None, checkpoint_every: int):
        self.model, self.reporter, self.batches, self.result = model, reporter, batches, result
        self.result_path, self.checkpoint_every = result_path, checkpoint_every
        self.optimizer = model.create_optimizer()
        self.evaluator: _Evaluator | None = None

    def run(self, steps: int, console: Console) -> TrainResult:
        started, per_batch = time.perf_counter(), 0
        with Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("step {task.fields[step]}"),
                      TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                      TimeElapsedColumn(), console=console) as progress:
            task = progress.add_task("train", total=steps, loss="-", tps="-", step=0)
            for step in range(steps):
                try:
                    self.model.wait_while_paused(
                        on_pause=lambda: progress.update(task, tps="paused by the run owner"))
                except RunStopped:
                    console.print("[yellow]the run owner stopped the run[/]: training ends here")
                    self.result.steps = step
                    break
                per_batch = self._step(step, steps)
                tps = (step + 1) * per_batch / (time.perf_counter() - started)
                progress.update(task, advance=1, loss=f"{self.result.losses[-1]:.3f}", tps=f"{tps:,.0f}",
                                step=self.model.step)
                self.model.report_progress(self.model.step, self.result.losses[-1], round(tps, 1))
        if self.result.losses:
            self.result.tokens_per_second = round(self.result.steps * per_batch / (time.perf_counter() - started), 1)
        return self.result

    def _step(self, step: int, steps: int) -> int:
        """Train one batch; the tokens it held."""
        model, result = self.model, self.result
        input_ids = next(self.batches)
        loss = model.train_step(input_ids)  # = model(...).loss.backward(), backwards overlapping forwards
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        result.losses.append(loss.item())
        result.run_step = model.step
        if not math.isfinite(result.losses[-1]):
            raise FloatingPointError(f"loss became {result.losses[-1]} at step {step}")
        if isinstance(self.batches, AssignedBatches):
            self.batches.commit(model.step)
            result.data = _data_result(self.batches)
        if self.evaluator is not None and (step + 1) % self.evaluator.every == 0:
            self.evaluator(model, result)
        if self.result_path is not None:
            _write_result(self.result_path, result)
        self.reporter.report(model.step, result.losses[-1], input_ids.numel())
        if (step + 1) % self.checkpoint_every == 0 or step + 1 == steps:
            _upload_local_parts(model, model.step)
        return input_ids.numel()


def _data_result(batches: AssignedBatches) -> dict:
    spec = batches.spec
    return {"dataset_id": spec.dataset_id, "source": spec.source, "num_shards": spec.num_shards,
            "spans": [span.as_dict() for span in batches.spans]}


def _sample(model: SwarmModelForCausalLM, sample_tokens: int, seed: int) -> str:
    """A sample of what the model writes after ``def ``; empty if the swarm cannot generate now."""
    prompt = torch.tensor([list(b"def ")])
    room = min(sample_tokens, max_positions(model.local.config) - prompt.shape[1])
    try:
        generated = model.generate(prompt, max_new_tokens=room, do_sample=True, temperature=0.8,
                                   top_k=0, generator=torch.Generator().manual_seed(seed))
        return decode_bytes(generated[0])
    except SwarmError as e:  # the training is done and saved; a sample is a courtesy
        logger.warning("could not generate a sample after training: %s", e)
        return ""


def _write_result(path: Path, result: TrainResult) -> None:
    """Atomically (a reader never sees half a file)."""
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(asdict(result) | {"first_loss": result.first_loss, "last_loss": result.last_loss}))
    partial.replace(path)


def _upload_local_parts(model: SwarmModelForCausalLM, step: int) -> None:
    """The embeddings and head live only here: keep a copy in the checkpoint store for ``swarm export``."""
    try:
        model.upload_local_state(step)
    except SwarmError as e:  # the store being away must not stop training; the next upload retries
        logger.warning("uploading the local parts at step %d failed: %s", step, e)
