"""What one collection round of metrics reports amounts to (a pure function, tested with tables)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dht.schemas import MetricsReport

__all__ = ["RoundSummary", "summarize"]


@dataclass(frozen=True)
class RoundSummary:
    """The collaborative step (the furthest any trainer or stage got), the trainers' mean loss and
    summed tokens/s, how many peers report, and each reporter's running total of samples."""

    step: int
    loss: float | None
    tokens_per_second: float | None
    peers: int
    samples: dict[str, int] = field(default_factory=dict)


def summarize(reports: list[MetricsReport]) -> RoundSummary | None:
    if not reports:
        return None
    trainers = [r for r in reports if r.role == "trainer"]
    losses = [r.loss for r in trainers if r.loss is not None]
    return RoundSummary(
        step=max(r.step for r in reports),
        loss=round(sum(losses) / len(losses), 6) if losses else None,
        tokens_per_second=round(sum(r.tokens_per_second for r in trainers), 1) if trainers else None,
        peers=len({r.peer_id for r in reports if r.role == "peer"}),
        samples={r.peer_id: r.samples for r in reports},
    )
