"""Distillation losses.

Soft-target KD (Hinton, Vinyals, Dean 2015):

    L = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)

The T^2 factor keeps the soft term's gradient magnitude independent of T (the gradients of the soft term
scale as 1/T^2). The student is evaluated and deployed at T = 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch."""
    t = temperature
    log_p_student = F.log_softmax(student_logits / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits / t, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * (t * t)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
            temperature: float, alpha: float) -> torch.Tensor:
    """alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y).

    `labels` may be None (no hard labels: soft term only) or hold -1 for unlabelled samples, which then
    contribute only to the soft term.
    """
    soft = soft_target_loss(student_logits, teacher_logits, temperature)
    if labels is None or alpha >= 1.0:
        return soft
    labelled = labels >= 0
    if labelled.any():
        hard = F.cross_entropy(student_logits[labelled], labels[labelled])
    else:
        hard = student_logits.sum() * 0.0
    return alpha * soft + (1.0 - alpha) * hard


class FeatureProjection(nn.Module):
    """Maps a student feature to the teacher feature's width: a 1x1 conv for maps, a linear layer for vectors.

    FitNets (Romero et al. 2015) hint loss: MSE(proj(student_feature), teacher_feature). Spatial sizes must
    match; widths (channels) may differ.
    """

    def __init__(self, student_width: int, teacher_width: int, spatial: bool) -> None:
        super().__init__()
        if student_width == teacher_width:
            self.proj: nn.Module = nn.Identity()
        elif spatial:
            self.proj = nn.Conv2d(student_width, teacher_width, 1, bias=False)
        else:
            self.proj = nn.Linear(student_width, teacher_width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def hint_loss(projected_student: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """FitNets hint: mean squared error between the projected student feature and the teacher's."""
    return F.mse_loss(projected_student, teacher_feature)
