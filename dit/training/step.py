"""One optimizer step: micro-batches with gradient accumulation, and the non-finite rule, as a function a test
can call with any strategy.

A rank whose loss is not finite backpropagates NaN gradients (``poison_nonfinite``), so its non-finite loss shows
in the global gradient norm, which every strategy computes before its update: one rule, no extra collective, and
every rank skips the same steps. A skipped step leaves weights, optimizer state and EMA as they were."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dit.distributed.strategies import Strategy


class _PoisonNonfinite(torch.autograd.Function):
    """Identity forward; the backward turns the gradient into NaN when the forward value was not finite."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, loss: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(loss.detach())
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        (loss,) = ctx.saved_tensors
        return torch.where(torch.isfinite(loss), grad, torch.full_like(grad, float("nan")))


def poison_nonfinite(loss: torch.Tensor) -> torch.Tensor:
    """``loss`` unchanged; a non-finite loss gives NaN gradients (without a host sync to find out)."""
    return _PoisonNonfinite.apply(loss)


@dataclass
class StepResult:
    loss: torch.Tensor  # this rank's mean loss over the micro-batches (detached)
    grad_norm: float  # global gradient norm before clipping (non-finite when the step was skipped)
    applied: bool  # False: a non-finite loss or gradient somewhere; nothing was updated


def train_step(strategy: Strategy, micro_loss: Callable[[int], torch.Tensor], micro_batches: int = 1) -> StepResult:
    """``micro_loss(i)`` runs the forward pass of micro-batch ``i`` and returns its loss; gradients are
    synchronised after the last micro-batch only. The EMA is not updated here (the loop does it when applied)."""
    losses = []
    for i in range(micro_batches):
        with strategy.no_sync(i < micro_batches - 1):
            with strategy.autocast():
                loss = micro_loss(i)
            losses.append(loss.detach())
            strategy.backward(poison_nonfinite(loss / micro_batches if micro_batches > 1 else loss))
    report = strategy.step()
    return StepResult(torch.stack(losses).mean() if micro_batches > 1 else losses[0], report.grad_norm,
                      report.applied)
