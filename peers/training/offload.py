"""AdamW with its state in host memory, for a stage whose device holds the weights and gradients but
not AdamW's two float32 moments as well (``peer.offload_optimizer``).

Each step copies a parameter and its gradient to the host, updates the host copy with torch's own
AdamW arithmetic (``torch.optim.adam.adam`` with decoupled weight decay, as ``torch.optim.AdamW``
runs it), and copies the result back: the moments never touch the device. The state is keyed by the
module's own parameters like any optimizer's, so a stage's snapshots (``peers.state.snapshot``)
read and write it unchanged; state loaded onto the device is moved to the host at the next step.

``offload_wanted`` decides when: an explicit setting wins; ``auto`` offloads only when the stage's
weights, gradients, AdamW state and a full queue's activations do not fit the device's free memory
but everything except AdamW's state does.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch.optim.adam import adam

__all__ = ["HostAdamW", "offload_wanted"]


class HostAdamW(torch.optim.Optimizer):
    """``torch.optim.AdamW`` (same defaults, same arithmetic) whose state stays on the CPU."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        if closure is not None:
            raise ValueError("HostAdamW takes no closure")
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group)
        return None

    def _update(self, param: torch.nn.Parameter, group: dict) -> None:
        host = param.detach().to("cpu", copy=True)
        grad = param.grad.detach().to("cpu", torch.float32)
        state = self.state[param]
        if not state:
            state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(host), exp_avg_sq=torch.zeros_like(host))
        for kind in ("step", "exp_avg", "exp_avg_sq"):
            if state[kind].device.type != "cpu":
                state[kind] = state[kind].cpu()
        beta1, beta2 = group["betas"]
        adam([host], [grad], [state["exp_avg"]], [state["exp_avg_sq"]], [], [state["step"]], foreach=False,
             decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
             weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
        param.copy_(host)


def offload_wanted(setting: bool | str, *, free: int | None, resident: int, optimizer: int) -> bool:
    """Whether AdamW's state goes to host memory: ``setting`` when it is a bool; for ``auto``, when
    ``free`` device bytes (None: the CPU, nothing to offload to) hold ``resident`` (weights,
    gradients, activations) but not ``resident + optimizer``."""
    if isinstance(setting, bool):
        return setting
    if setting != "auto":
        raise ValueError(f"offload_optimizer is true, false or auto, got {setting!r}")
    if free is None:
        return False
    return resident + optimizer > free >= resident
