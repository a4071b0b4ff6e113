"""One training step of R stacked runs (``hitnet.stacked_model``), each as its own run takes it:
its own loss (cross-entropy, plus distillation from the shared teacher), its own gradient-norm
clipping and its own SGD learning rate.

The runs' losses are summed before ``backward``: run r's parameters appear in run r's loss
only, so each gets exactly its own gradient.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from hitnet.distillation import Distillation, soft_target_loss


def per_run_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy per run: logits (R, T, B, vocab), targets (T, B); returns (R,)."""
    runs, vocab = logits.size(0), logits.size(-1)
    losses = F.cross_entropy(
        logits.reshape(-1, vocab), targets.reshape(-1).repeat(runs), reduction="none"
    )
    return losses.view(runs, -1).mean(1)


def per_run_training_loss(
    logits: Tensor,
    inputs: Tensor,
    targets: Tensor,
    distillation: Distillation | None = None,
    distill_weight: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Each run's training loss and its plain cross-entropy, both (R,), as
    ``LanguageModelTask.training_step`` computes them for one run."""
    cross_entropy = per_run_cross_entropy(logits, targets)
    if distillation is None:
        return cross_entropy, cross_entropy
    runs, vocab = logits.size(0), logits.size(-1)
    soft = soft_target_loss(
        logits.reshape(runs, -1, vocab),
        distillation.teacher_logits(inputs).reshape(-1, vocab),
        distillation.temperature,
    )
    return (1 - distill_weight) * cross_entropy + distill_weight * soft, cross_entropy


def _per_run(values: Tensor, like: Tensor) -> Tensor:
    """(R,) values shaped to broadcast over a stacked tensor (R, ...)."""
    return values.view(-1, *[1] * (like.dim() - 1))


def clip_grad_norm_per_run_(parameters: Iterable[Tensor], max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (2-norm) for each run on its own: run r's gradients
    (index r of every stacked parameter) are scaled so that their joint norm is at most
    ``max_norm``. Returns each run's norm before clipping, (R,).

    Hand-written: torch's clips one norm over all it is given, and a stacked parameter holds
    every run."""
    grads = [p.grad for p in parameters if p.grad is not None]
    per_parameter = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads])
    norms = torch.linalg.vector_norm(per_parameter, dim=0)
    # torch's coefficient: max_norm / (norm + 1e-6), never above 1
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for grad in grads:
        grad.mul_(_per_run(scale, grad))
    return norms


class StackedSGD(torch.optim.Optimizer):
    """Plain SGD (no momentum, no weight decay: the recipe's) with one lr per run: ``lr`` is a
    tensor (R,), and run r's slice of each stacked parameter descends by ``lr[r] * grad``.

    Hand-written: ``torch.optim.SGD`` takes one lr per parameter group, and a stacked parameter
    holds every run. Change a run's lr in place: ``param_groups[0]["lr"][r] = value``.
    """

    def __init__(self, params: Iterable[Tensor], lr: Tensor) -> None:
        if lr.dim() != 1 or not bool((lr > 0).all()):
            raise ValueError(f"lr must be a 1-d tensor of positive rates, one per run; got {lr}")
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.sub_(param.grad * _per_run(group["lr"], param))
