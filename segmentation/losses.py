"""The U-Net's loss: soft Dice (per image, as ISIC scores) plus BCE, optionally plus a per-image Lovasz hinge."""

from __future__ import annotations

import segmentation_models_pytorch as smp
import torch


class DiceBCELoss(torch.nn.Module):
    """Soft Dice plus binary cross-entropy on the logits, optionally plus a per-image Lovasz hinge.

    Dice over the whole batch (smp's binary mode) lets a large lesion outweigh a missed small one; ``per_image``
    averages one soft Dice per image instead, as the ISIC score averages one Jaccard per image. ``lovasz_weight``
    adds smp's Lovasz hinge computed per image, a convex surrogate of the Jaccard index itself.
    """

    def __init__(
        self, dice_weight: float = 1.0, bce_weight: float = 1.0, per_image: bool = False, lovasz_weight: float = 0.0
    ) -> None:
        super().__init__()
        self.dice = smp.losses.DiceLoss(mode="binary", from_logits=True)
        self.bce = torch.nn.BCEWithLogitsLoss()
        self.lovasz = smp.losses.LovaszLoss(mode="binary", per_image=True, from_logits=True)
        self.dice_weight, self.bce_weight, self.per_image = dice_weight, bce_weight, per_image
        self.lovasz_weight = lovasz_weight

    def dice_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not self.per_image:
            return self.dice(logits, target)
        prob = torch.sigmoid(logits.float()).flatten(1)
        target = target.float().flatten(1)
        overlap = (prob * target).sum(1)
        total = prob.sum(1) + target.sum(1)
        return (1.0 - (2.0 * overlap + 1.0) / (total + 1.0)).mean()  # +1: an empty mask predicted empty scores 1

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.dice_weight * self.dice_loss(logits, target) + self.bce_weight * self.bce(logits, target)
        if self.lovasz_weight:
            loss = loss + self.lovasz_weight * self.lovasz(logits.float(), target)
        return loss
