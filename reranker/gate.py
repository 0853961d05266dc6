"""Reranker, gate: which queries rerank "auto" reranks, from the dual encoder's candidates alone."""

from __future__ import annotations

import numpy as np

# rerank "auto" reranks a query when its best two cosines are within this margin: fitted on the validation seed
# as the smallest that keeps 90 % of mid's R@1 gain over late (`imsearch eval gate --fit`)
AUTO_MARGIN = 0.0225


def gate(cosine: np.ndarray, margin: float = AUTO_MARGIN) -> bool:
    """Whether "auto" reranks: when the dual encoder's best two candidates are not clearly apart (their
    cosines within `margin`), which is where a twin or a near miss is likely to be ranked first."""
    return len(cosine) > 1 and float(cosine[0] - cosine[1]) < margin
