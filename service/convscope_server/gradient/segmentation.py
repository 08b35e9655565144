"""Segmentation from a saliency map (Simonyan et al. 2014, section 3.1): GrabCut (Rother et al. 2004),
seeded with the most salient pixels as foreground and the least salient as background.
"""

from __future__ import annotations

import numpy as np

FOREGROUND_QUANTILE = 0.95   # above: definite foreground
PROBABLE_QUANTILE = 0.70     # above: probable foreground; the rest between: probable background
BACKGROUND_QUANTILE = 0.30   # below: definite background


def seed_mask(saliency: np.ndarray) -> np.ndarray:
    """GrabCut's initial labels (cv2.GC_*) from a (H, W) saliency map."""
    import cv2

    mask = np.full(saliency.shape, cv2.GC_PR_BGD, np.uint8)
    high, probable, low = np.quantile(saliency, [FOREGROUND_QUANTILE, PROBABLE_QUANTILE, BACKGROUND_QUANTILE])
    mask[saliency >= probable] = cv2.GC_PR_FGD
    mask[saliency >= high] = cv2.GC_FGD
    mask[saliency <= low] = cv2.GC_BGD
    return mask


def grabcut(image: np.ndarray, saliency: np.ndarray, iterations: int = 5) -> np.ndarray:
    """Foreground mask (H, W) bool of a uint8 RGB image, seeded by ``saliency`` of the same size."""
    import cv2

    mask = seed_mask(saliency)
    background, foreground = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    bgr = np.ascontiguousarray(image[..., ::-1])
    cv2.grabCut(bgr, mask, None, background, foreground, iterations, cv2.GC_INIT_WITH_MASK)
    return (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)
