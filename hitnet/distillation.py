"""Distillation from a frozen teacher (the full-precision model a ternary one starts from): its
softmax at temperature T is a second, soft target of the training loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hitnet.language_model import RecurrentState, RNNLanguageModel


class Distillation:
    """A frozen teacher run alongside training, its state carried across windows as the
    student's is; gives the soft-target term of the loss."""

    def __init__(self, teacher: RNNLanguageModel, temperature: float) -> None:
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature = temperature
        self._state: RecurrentState | None = None

    def start_epoch(self, device: torch.device) -> None:
        self.teacher.to(device)
        self._state = None

    def teacher_logits(self, inputs: Tensor) -> Tensor:
        """The teacher's logits for this window (its state carried from the last one)."""
        with torch.no_grad():
            if self._state is None:
                self._state = self.teacher.initial_state(inputs.size(1), inputs.device)
            logits, self._state = self.teacher(inputs, self._state)
        return logits

    def loss(self, inputs: Tensor, student_logits: Tensor) -> Tensor:
        """T^2 * KL(teacher || student) per token, on softmaxes at temperature T."""
        vocab = student_logits.size(-1)
        return soft_target_loss(
            student_logits.reshape(-1, vocab),
            self.teacher_logits(inputs).reshape(-1, vocab),
            self.temperature,
        )


def soft_target_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(teacher || student) per token, on softmaxes at temperature T.

    ``teacher_logits`` (tokens, vocab); ``student_logits`` (..., tokens, vocab): leading
    dimensions are stacked runs, each given its own loss against the one teacher.
    """
    t = temperature
    student = F.log_softmax(student_logits / t, dim=-1)
    teacher = F.log_softmax(teacher_logits / t, dim=-1).expand_as(student)
    divergence = F.kl_div(student, teacher, reduction="none", log_target=True)
    return divergence.sum((-2, -1)) / student.size(-2) * t * t
