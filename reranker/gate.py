"""Reranker, gate: which queries rerank "auto" reranks, and how deep, from the dual encoder's candidates alone."""

from __future__ import annotations

import numpy as np

# rerank "auto" reranks the candidates whose cosine is within this margin of the best one's, when there are two
# or more: fitted on the validation seed as the smallest that keeps 90 % of mid's R@1 gain over late at k = 16
# (`imsearch eval gate --fit`)
AUTO_MARGIN = 0.0275


def auto_depth(cosine: np.ndarray, margin: float = AUTO_MARGIN) -> int:
    """How many of the best candidates "auto" reranks: those within `margin` of the best cosine, where a twin or
    a near miss may be ranked first; 0 (the dual encoder's answer stands) when the best is clearly apart."""
    close = int(np.count_nonzero(cosine[0] - cosine < margin)) if len(cosine) else 0
    return close if close > 1 else 0
