"""Service processes: N uvicorn workers, each accepting on its own SO_REUSEPORT socket, kept alive by the parent.

Uvicorn's own `workers=N` shares one listening socket, and whichever worker's event loop wakes first
accepts: 64 connections opened at once were split 50 / 14, 21 / 43 and 32 / 32 over three runs, and
the loaded worker's queue sets the latency while the other idles. With one SO_REUSEPORT socket per
worker the kernel spreads new connections over the workers by a hash of their addresses instead.
The price: connections still queued on a worker that dies are reset (clients retry), where a shared
queue would have handed them to another worker.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import IO

from service.config import Settings

log = logging.getLogger(__name__)
APP = "service.app:app_from_env"  # each worker builds its app from IMSEARCH_* (set by the parent)
RESTART_PAUSE_S = 1.0  # between restarts of a worker that died: a crash loop must not spin
PR_SET_PDEATHSIG = 1  # prctl option, linux/prctl.h


@dataclass(frozen=True)
class Listen:
    """Where and how the workers serve."""

    host: str
    port: int
    header_timeout_s: float = 10.0
    access_log: bool = True


def open_socket(host: str, port: int, listen: bool = True, reuse_port: bool = True) -> socket.socket:
    """A bound TCP socket, with SO_REUSEPORT unless `reuse_port` is False (listening unless `listen` is)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    if listen:
        sock.listen(2048)
    return sock


def claim_port(host: str, port: int) -> IO[bytes] | None:
    """Hold host:port for this supervisor's workers (keep the returned lock open); None if it is taken.

    A bind probe finds any socket without SO_REUSEPORT there. Another supervisor's workers would let
    ours join their group and share their traffic, so supervisors also take an exclusive lock per
    port, whatever the host: `localhost`, 127.0.0.1 and 0.0.0.0 name overlapping addresses.
    """
    lock = (Path(tempfile.gettempdir()) / f"imsearch-port-{port}.lock").open("wb")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        open_socket(host, port, listen=False).close()  # not listening: the kernel sends it no connection
    except OSError:
        lock.close()
        return None
    return lock


def _load_and_close(settings: Settings) -> tuple[list[str], str]:  # in check_settings' throwaway process
    from service.errors import StartupError
    from service.state import configure_process, load_engine

    configure_process(settings)
    try:
        engine = load_engine(settings)
    except StartupError as exc:
        return [], str(exc)
    names = list(engine.indexes)
    engine.close()
    return names, ""


def check_settings(settings: Settings) -> list[str]:
    """The served index names, after loading the whole engine once in a throwaway process: a bad index
    or model is refused (ValueError, saying why) before any worker starts, and the supervisor itself
    never imports torch (about 0.6 GiB of private memory per process here)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        names, refused = pool.submit(_load_and_close, settings).result()
    if refused:
        raise ValueError(refused)
    return names


def signal_on_parent_death(sig: int, parent: int) -> None:
    """Have the kernel send this process `sig` when its parent dies, even by SIGKILL (Linux; elsewhere
    nothing): an orphan would go on serving the port, or indexing beside the job's retry."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent or parent == 1:  # the parent died before the request above took effect
        os.kill(os.getpid(), sig)


def _worker(where: Listen, parent: int) -> None:  # the body of a spawned worker process
    import uvicorn

    from service.server import server_config

    signal_on_parent_death(signal.SIGTERM, parent)
    sock = open_socket(where.host, where.port)
    config = server_config(APP, where.host, where.port, where.header_timeout_s, where.access_log, factory=True)
    uvicorn.Server(config).run(sockets=[sock])


class Supervisor:
    """Starts the workers, restarts any that dies, and stops them all on SIGINT or SIGTERM."""

    def __init__(self, where: Listen, workers: int):
        self.where, self.count = where, workers
        self.context = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch state forked
        self.processes: list[BaseProcess] = []
        self.stopping = False

    def run(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._stop)
        self.processes = [self._start() for _ in range(self.count)]
        while not self.stopping:
            time.sleep(0.2)
            for i, proc in enumerate(self.processes):
                if not proc.is_alive() and not self.stopping:
                    log.warning("worker %s exited with %s; starting another", proc.pid, proc.exitcode)
                    time.sleep(RESTART_PAUSE_S)
                    self.processes[i] = self._start()
        self._shutdown()

    def _start(self) -> BaseProcess:
        proc = self.context.Process(target=_worker, args=(self.where, os.getpid()), name="imsearch-worker")
        proc.start()
        return proc

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def _shutdown(self, grace_s: float = 30.0) -> None:
        """SIGTERM to each worker (uvicorn finishes the requests in flight), then wait; kill stragglers."""
        for proc in self.processes:
            if proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + grace_s
        for proc in self.processes:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()
