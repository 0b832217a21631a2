"""Knowledge distillation on logits: train a compressed model to reproduce its float original's
output distribution (any method's QAT; ``CompressionTrainer(teacher_model=...)`` uses it)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def kl_distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
                         mask: Tensor | None = None) -> Tensor:
    """``T^2 mean_tokens KL(p_teacher || p_student)`` with ``p = softmax(logits / T)`` over the last
    axis: ``sum_v p_t (log p_t - log p_s)``, averaged over every other position, or over the
    positions where ``mask`` (an attention mask, the logits' shape without the last axis) is
    nonzero."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    vocab = student_logits.shape[-1]
    log_s = F.log_softmax(student_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    per_token = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)
    if mask is None:
        return temperature**2 * per_token.mean()
    if tuple(mask.shape) != tuple(student_logits.shape[:-1]):
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit logits of shape "
                         f"{tuple(student_logits.shape)}; expected {tuple(student_logits.shape[:-1])}")
    keep = mask.reshape(-1).to(per_token.dtype)
    return temperature**2 * (per_token * keep).sum() / keep.sum().clamp_min(1)
