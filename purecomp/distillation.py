"""Knowledge distillation on logits: train a compressed model to reproduce its float original's
output distribution (any method's QAT; ``CompressionTrainer(teacher_model=...)`` uses it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def kl_distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``T^2 mean_tokens KL(p_teacher || p_student)`` with ``p = softmax(logits / T)`` over the last
    axis: ``sum_v p_t (log p_t - log p_s)``, averaged over every other position."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    vocab = student_logits.shape[-1]
    log_s = F.log_softmax(student_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    return temperature**2 * F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")


def teacher_logits(teacher: torch.nn.Module, **inputs: Tensor) -> Tensor:
    """The teacher's logits for ``inputs``, without a graph."""
    with torch.no_grad():
        return teacher(**inputs).logits
