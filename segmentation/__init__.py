"""Stage 1: U-Net lesion segmentation, lesion boxes and crops."""
