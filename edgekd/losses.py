"""Distillation losses.

Soft-target KD (Hinton, Vinyals, Dean 2015):

    L = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)

The T^2 factor keeps the soft term's gradient magnitude independent of T (the gradients of the soft term
scale as 1/T^2). The student is evaluated and deployed at T = 1. `edgekd.objective` weighs and sums the terms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgekd.augment import Mix


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch."""
    t = temperature
    log_p_student = F.log_softmax(student_logits / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits / t, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * (t * t)


def mixed_cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor, mix: Mix | None = None) -> torch.Tensor:
    """Cross-entropy over labelled samples (label -1: unlabelled, skipped).

    With a mixed batch, lam * CE(s, y) + (1 - lam) * CE(s, y[perm]), each part counted only where its label
    exists and normalized by the weight of the parts that were counted. 0 (with a graph) when nothing is labelled.
    """
    ce = F.cross_entropy(student_logits, labels.clamp(min=0), reduction="none")
    weight = (labels >= 0).float()
    if mix is None:
        total, loss = weight.sum(), (weight * ce).sum()
    else:
        other = labels[mix.perm]
        ce_other = F.cross_entropy(student_logits, other.clamp(min=0), reduction="none")
        w_self, w_other = mix.lam * weight, (1.0 - mix.lam) * (other >= 0).float()
        total, loss = (w_self + w_other).sum(), (w_self * ce + w_other * ce_other).sum()
    return loss / total if total > 0 else student_logits.sum() * 0.0


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


# --- Top-k targets (black-box teachers, labels from `edgekd label`, the teacher cache) --------


def topk_soft_target_loss(student_logits: torch.Tensor, topk_values: torch.Tensor, topk_indices: torch.Tensor,
                          temperature: float, *, values_are: str = "logits") -> torch.Tensor:
    """T^2 * KL(p || softmax(s/T)), averaged over the batch, for a teacher known only on k classes per sample.

    The teacher distribution p over all C classes:
      values_are="logits": the C - k unknown logits are filled with the smallest known one (an upper bound on
        each), then p = softmax(full / T). Zero mass on the unknown classes instead (renormalizing the top k)
        made a digits student far worse here (28% vs 62% with k = 5 of 10): it forces the student to be
        sharper at T than the teacher ever was. With k = C this is exactly `soft_target_loss`.
      values_are="probs": the values are the teacher's probabilities of the k classes, already at the
        temperature the caller wants (as `edgekd label` stores them); the rest of the mass, 1 - sum(values),
        is spread uniformly over the C - k other classes (the maximum-entropy completion). With k = C and
        values = softmax(t/T) this is again exactly `soft_target_loss(s, t, T)`.
    The student is softened at T; T^2 keeps the gradient scale independent of T. Indices must be distinct
    within a row.
    """
    t = temperature
    topk_indices = topk_indices.long()
    topk_values = topk_values.to(student_logits.dtype)
    log_q = F.log_softmax(student_logits / t, dim=-1)
    log_q_known = log_q.gather(1, topk_indices)
    if values_are == "logits":
        floor = topk_values.min(dim=1, keepdim=True).values
        full = floor.expand(-1, student_logits.shape[1]).clone().scatter(1, topk_indices, topk_values)
        log_p = F.log_softmax(full / t, dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(dim=1)
    elif values_are == "probs":
        p = topk_values.clamp(min=0.0)
        kl = (torch.xlogy(p, p) - p * log_q_known).sum(dim=1)
        others = student_logits.shape[1] - topk_indices.shape[1]
        if others > 0:
            rest = (1.0 - p.sum(dim=1)).clamp(min=0.0)
            each = rest / others
            log_q_others = log_q.sum(dim=1) - log_q_known.sum(dim=1)
            kl = kl + torch.xlogy(rest, each) - each * log_q_others
    else:
        raise ValueError(f"values_are={values_are!r}; expected 'logits' or 'probs'")
    return kl.mean() * (t * t)
