"""The parity numbers every reward's test reports against its official implementation."""

from __future__ import annotations

import numpy as np


def summarize(official: np.ndarray, ours: np.ndarray, cosines: np.ndarray, **extra) -> dict:
    """The parity numbers every reward reports: feature cosine, score differences absolute and relative."""
    diff = np.abs(ours - official)
    spread = float(official.std())
    return {
        "images": int(len(official)),
        "image_feature_cosine_min": float(cosines.min()),
        "image_feature_cosine_mean": float(cosines.mean()),
        "official_score_mean": float(official.mean()),
        "official_score_std": spread,
        "score_abs_diff_mean": float(diff.mean()),
        "score_abs_diff_max": float(diff.max()),
        "score_abs_diff_mean_over_std": float(diff.mean() / spread),
        "score_abs_diff_max_over_std": float(diff.max() / spread),
        "score_rel_diff_mean": float((diff / np.abs(official)).mean()),
        **extra,
    }
