"""Reranker: cross-attention image-text matching tiers that rescore the dual encoder's top candidates."""

# the tiers a service loads unless IMSEARCH_RERANKERS says otherwise, and so those an index stores features for
DEFAULT_TIERS = ("mid", "early")
