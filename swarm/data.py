"""A corpus every machine has: the Python standard library's own source, as byte-level tokens."""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Iterator

import torch

__all__ = ["stdlib_corpus", "random_batches", "decode_bytes"]


def stdlib_corpus(max_bytes: int = 4 << 20) -> torch.Tensor:
    """The first ``max_bytes`` of the stdlib's ``*.py`` files (sorted, so every machine gets the same
    bytes for the same Python version) as a 1-D tensor of token ids 0..255."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not chunks:
        raise FileNotFoundError(f"no Python sources under {root}")
    data = b"".join(chunks)[:max_bytes]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def random_batches(corpus: torch.Tensor, batch_size: int, seq_len: int, *, seed: int = 0) -> Iterator[torch.Tensor]:
    """Endless batches of random windows ``[batch_size, seq_len]`` of the corpus, reproducible by seed."""
    if corpus.numel() <= seq_len:
        raise ValueError(f"the corpus has {corpus.numel()} tokens, fewer than seq_len {seq_len}")
    generator = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, corpus.numel() - seq_len, (batch_size,), generator=generator)
        yield torch.stack([corpus[s : s + seq_len] for s in starts.tolist()])


def decode_bytes(tokens: torch.Tensor) -> str:
    return bytes(int(t) for t in tokens.tolist() if 0 <= int(t) < 256).decode("utf-8", errors="replace")
