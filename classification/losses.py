"""The classifiers' losses: cross-entropy (optionally label-smoothed) or focal loss (Lin et al. 2017), weighted."""

from __future__ import annotations

import torch
from torch import nn

from dermpipe.classification.config import ClassificationConfig


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): cross-entropy scaled by (1 - p)^gamma, with class weights and label smoothing."""

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.gamma = gamma
        self.label_smoothing = label_smoothing
        self.register_buffer("weight", weight if weight is not None else None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = torch.log_softmax(logits.float(), dim=1)
        n_classes = logits.shape[1]
        soft = torch.full_like(log_p, self.label_smoothing / n_classes)
        soft.scatter_(1, target[:, None], 1.0 - self.label_smoothing + self.label_smoothing / n_classes)
        per_class = -soft * (1.0 - log_p.exp()).pow(self.gamma) * log_p
        if self.weight is None:
            return per_class.sum(dim=1).mean()
        # Weighted as torch's cross-entropy is, so gamma = 0 gives exactly CrossEntropyLoss(weight, label_smoothing).
        return (per_class * self.weight).sum() / self.weight[target].sum().clamp_min(1e-12)


def build_loss(cfg: ClassificationConfig, weights: torch.Tensor | None) -> nn.Module:
    """Cross-entropy (optionally label-smoothed) or focal loss, weighted per class when ``weights`` is given."""
    t = cfg.train
    if t.loss == "focal":
        return FocalLoss(t.focal_gamma, weights, t.label_smoothing)
    return nn.CrossEntropyLoss(weight=weights, label_smoothing=t.label_smoothing)
