"""``benchmarks/gpu_check.sh --cpu-smoke``: the GPU check runs every one of its steps here on the CPU
(tiny model, bfloat16), so the script cannot rot between the rare runs on a GPU machine."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_check_runs_every_step_and_prints_its_figures(tmp_path: Path) -> None:
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-smoke", "--logs", str(tmp_path)],
                          capture_output=True, text=True, timeout=280, stdin=subprocess.DEVNULL)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    for step in ("gpu-tests", "train", "generate", "hop"):
        assert (tmp_path / f"{step}.log").stat().st_size > 0, f"{step} wrote nothing"
    figures = output[output.index("==> figures"):]
    train = re.search(r"training:\s+ratio swarm/local: ([0-9.]+)", figures)
    decode = re.search(r"generation: ratio swarm/local decode tokens/s: ([0-9.]+)", figures)
    hop = re.search(r"stage forward minus compute / raw TCP echo: ([0-9.]+)x", figures)
    assert train and decode and hop, figures
    assert float(train.group(1)) > 0 and float(decode.group(1)) > 0 and float(hop.group(1)) > 0, figures
    # the gpu tests were collected and skipped here (no CUDA), not deselected into "no tests ran"
    assert re.search(r"\d+ skipped", (tmp_path / "gpu-tests.log").read_text()), output
