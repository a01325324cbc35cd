"""``RemoteLayers``: the transformer layers between a trainer's local parts, computed by the swarm and
seen by torch as one differentiable function.

A batch is split into microbatches (``shards.schedule.microbatch_rows``) and run through
``RemotePipeline``: ``forward`` relays them and redoes those that went through a peer a spot check
caught later; under autograd (``apply``) the backward sends the gradients back through the same
peers and commits the batch's rows to the run's collaborative step. ``train`` is ``train_step``'s
pipelined path: each microbatch's loss is computed on the local head as soon as its output arrives,
and its backward starts while later microbatches are still going forward.

The local parts may be on a GPU (``SwarmModelForCausalLM.to("cuda")``): a batch's activations then
cross to the host once on the way out (``to_host``: a pinned buffer, one wait) and back once on the
way in (a non-blocking copy from pinned memory), and so do their gradients; the microbatches are
sliced from the host copy.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from typing import Callable, ContextManager

import torch

from shards.devices import to_device, to_host
from shards.local import LocalParts, causal_lm_loss_part, labelled_tokens
from shards.schedule import microbatch_rows
from core.loop import LoopThread
from trainer.pipeline import RemotePipeline, Trace

__all__ = ["RemoteLayers"]


class _RemoteStages(torch.autograd.Function):
    """Autograd bridge: forward runs the remote stages, backward sends gradients back through them."""

    @staticmethod
    def forward(ctx, hidden, layers, mask, positions):  # type: ignore[override]
        outputs, traces = layers.forward(hidden, mask, positions, train=True)
        ctx.layers, ctx.traces, ctx.device = layers, traces, hidden.device
        return outputs

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        return to_device(ctx.layers.backward(ctx.traces, grad_output), ctx.device), None, None, None


class RemoteLayers:
    """The remote layers of ``pipeline``'s run, called on ``runner``; ``microbatch_size`` rows per
    microbatch (None: as many microbatches as stages). ``local``'s head computes ``train``'s loss.
    ``close()`` stops the thread that does so."""

    def __init__(self, local: LocalParts, pipeline: RemotePipeline, runner: LoopThread,
                 microbatch_size: int | None = None, compute: Callable[[], ContextManager] = contextlib.nullcontext):
        """``compute()`` is the context the local head computes in (the run's autocast)."""
        self.local = local
        self.compute = compute
        self.pipeline = pipeline
        self.microbatch_size = microbatch_size
        self._runner = runner
        self._head_thread: concurrent.futures.ThreadPoolExecutor | None = None  # train's local loss

    def apply(self, hidden: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
        """The last stage's output for ``hidden``, with a backward that goes through the swarm."""
        return _RemoteStages.apply(hidden, self, mask, positions)

    def forward(self, hidden, mask, positions, *, train: bool) -> tuple[torch.Tensor, list[Trace]]:
        """The last stage's output for ``hidden`` (not differentiable) and, when ``train``, the traces
        its backward needs."""
        batches = self._microbatches(hidden.shape[0])
        device = hidden.device
        hidden, mask, positions = (None if t is None else to_host(t.detach()) for t in (hidden, mask, positions))

        def forward(indices: list[int]) -> list[tuple[torch.Tensor, Trace]]:
            parts = [(hidden[batches[i]].detach(), mask[batches[i]] if mask is not None else None,
                      positions[batches[i]]) for i in indices]
            return self._runner.run(self.pipeline.forward_microbatches(parts, train=train))

        done = forward(list(range(len(batches))))
        for _ in range(3):  # bounded: a recompute may meet (and catch) another liar
            tainted = self.pipeline.tainted([trace for _, trace in done])  # through a peer caught later on
            if not tainted:
                break
            for i, redone in zip(tainted, forward(tainted)):
                done[i] = redone
        return to_device(torch.cat([out for out, _ in done], dim=0), device), [trace for _, trace in done]

    def backward(self, traces: list[Trace], grad_output: torch.Tensor) -> torch.Tensor:
        """The gradient of ``forward``'s input (in host memory); the batch's rows are then committed
        to the step."""
        grad_output = to_host(grad_output)
        grads = [grad_output[rows].contiguous() for rows in self._microbatches(grad_output.shape[0])]
        grad_inputs = self._runner.run(self.pipeline.backward_microbatches(traces, grads))
        self._runner.run(self.pipeline.commit(grad_output.shape[0]))
        return torch.cat(grad_inputs, dim=0)

    def train(self, hidden: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None,
              position_ids: torch.Tensor) -> torch.Tensor:
        """Forward and backward of the causal LM loss of ``hidden`` (the embeddings) against
        ``labels`` through the swarm and the local head, microbatches pipelined; the batch's rows are
        then committed. Returns the loss, detached."""
        rows = self._microbatches(hidden.shape[0])
        count = labelled_tokens(labels)
        device = hidden.device
        host, mask, positions = (None if t is None else to_host(t.detach())
                                 for t in (hidden, attention_mask, position_ids))
        parts = [(host[r], mask[r] if mask is not None else None, positions[r]) for r in rows]
        losses: list[torch.Tensor] = [torch.zeros((), device=device)] * len(rows)

        def head(m: int, output: torch.Tensor) -> torch.Tensor:
            output = to_device(output, device).detach().requires_grad_()
            with self.compute():
                logits = self.local.head(output)
            part = causal_lm_loss_part(logits, labels[rows[m]], count)
            part.backward()
            losses[m] = part.detach()
            return to_host(output.grad)

        if self._head_thread is None:  # one thread: the head's gradients accumulate one part at a time
            self._head_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="swarm-head")
        thread = self._head_thread

        async def loss(m: int, output: torch.Tensor) -> torch.Tensor:
            return await asyncio.get_running_loop().run_in_executor(thread, head, m, output)

        grads = self._runner.run(self.pipeline.train_microbatches(parts, loss))
        grad_hidden = torch.empty_like(hidden)
        for r, grad in zip(rows, grads):
            grad_hidden[r] = to_device(grad, device)
        if hidden.requires_grad:
            hidden.backward(grad_hidden)
        self._runner.run(self.pipeline.commit(hidden.shape[0]))
        return torch.stack(losses).sum()

    def close(self) -> None:
        """Stop the loss thread (after the work it was given). Idempotent."""
        if self._head_thread is not None:
            self._head_thread.shutdown(wait=True)
            self._head_thread = None

    def _microbatches(self, batch: int) -> list[slice]:
        return microbatch_rows(batch, self.pipeline.manifest.num_stages, self.microbatch_size)
