"""Service jobs, path policy: a job reads only under the folders IMSEARCH_JOB_ROOTS allows."""

from __future__ import annotations

from pathlib import Path

from indexer.reader import within
from service.jobs.api import JobRejected


def check_source(source: str, roots: list[str]) -> Path:
    """The source, resolved (symlinks too), when it lies under an allowed root; else JobRejected.

    Only the source itself: each file it lists is checked again when the job reads it (indexer.reader).
    """
    if not roots:
        raise JobRejected("indexing jobs are disabled: set IMSEARCH_JOB_ROOTS to the folders jobs may read", 403)
    if "\0" in source:
        raise JobRejected("source must be a path (it holds a NUL character)")
    try:  # taken literally: "~" would name the server's account, which a client knows nothing of
        resolved = Path(source).resolve(strict=True)
    except (OSError, RuntimeError):
        raise JobRejected(f"source {source} does not exist") from None
    if not within(resolved, roots):
        raise JobRejected(f"source {source} is outside the allowed roots", 403)
    return resolved
