"""Routes: batch-indexing jobs (start, watch, list, cancel); every one needs the API key."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from reranker.score import tier_entry
from service.deps import ApiKeyDep, EngineDep
from service.jobs.api import JobRejected, JobRequest, JobSpec, new_job_id
from service.jobs.policy import check_source

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[ApiKeyDep])


@router.post("/index", status_code=202)
async def start_index_job(body: JobRequest, engine: EngineDep) -> JSONResponse:
    """Queue a build, add or remove of a source under IMSEARCH_JOB_ROOTS into a served index.

    The same `job_id` twice starts one job (200 with its state the second time).
    """
    name, folder = engine.index_dir(body.index)
    source = check_source(body.source, engine.settings.job_roots)
    if body.mode == "build" and not body.replace:
        raise JobRejected(f"a build replaces index {name!r} with a new collection: pass \"replace\": true, "
                          "or use mode \"add\"", 409)
    settings = engine.settings
    spec = JobSpec(body.job_id or new_job_id(), str(source), body.mode, name, str(folder),
                   body.options.model_dump(), settings.model, settings.pretrained,
                   settings.device if engine.jobs.in_process else "", list(settings.job_roots),
                   [e for e in settings.rerankers if tier_entry(e)[0] in engine.feature_tiers])
    info, created = await run_in_threadpool(engine.jobs.submit, spec)
    return JSONResponse(status_code=202 if created else 200, content=asdict(info))


@router.get("")
async def list_jobs(engine: EngineDep, limit: int = 50) -> list[dict[str, Any]]:
    """Recent jobs, newest first."""
    return [asdict(j) for j in await run_in_threadpool(engine.jobs.recent, max(1, min(limit, 500)))]


@router.get("/{job_id}")
async def job_status(job_id: str, engine: EngineDep) -> dict[str, Any]:
    """Status (queued, running, succeeded, failed, cancelled), progress, result or error."""
    return asdict(await run_in_threadpool(engine.jobs.get, job_id))


@router.delete("/{job_id}")
async def cancel_job(job_id: str, engine: EngineDep) -> dict[str, Any]:
    """Cancel a queued or running job (a finished one is left as it is)."""
    return asdict(await run_in_threadpool(engine.jobs.cancel, job_id))
