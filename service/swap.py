"""Service stage, live swap: follow new index versions (Redis pub/sub, plus polling) without dropping requests."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path

import redis

from indexer.store import Index
from indexer.versions import current_version
from service.names import VERSIONS_CHANNEL

log = logging.getLogger(__name__)
KEEP_OLD_S = 300.0  # a swapped-out version still answers its hits' image URLs this long


class IndexSwapper:
    """Holds the served index versions by name and replaces one when its folder publishes a new version.

    A request takes its version once, at its start, so it finishes on the version it began with;
    the swap is a single dict assignment. The result cache is keyed by version, so it needs no flush.
    """

    def __init__(self, dirs: dict[str, Path], indexes: dict[str, Index], open_index: Callable[[Path], Index],
                 held: set[str] | None = None):
        self.dirs = dirs
        self.held = held or set()  # served at a version named in the settings: never swapped
        self.indexes = indexes
        self.open_index = open_index
        self.lock = threading.Lock()
        self.swaps = 0
        self.old: dict[tuple[str, str], Index] = {}  # (name, version) → a version swapped out less than KEEP_OLD_S ago

    def version(self, name: str, version: str | None) -> Index:
        """The named version of a served index while it is current or recently swapped out, else the
        current one (ids are never reused within an index folder, so an id there is the same image)."""
        return self.old.get((name, version or ""), self.indexes[name])

    def _keep_old(self, name: str, index: Index) -> None:
        self.old[(name, index.version)] = index
        timer = threading.Timer(KEEP_OLD_S, self._forget, (name, index.version))
        timer.daemon = True
        timer.start()

    def _forget(self, name: str, version: str) -> None:
        old = self.old.pop((name, version), None)
        if old is not None:
            old.close()  # its shard files (a read in flight finishes first)

    def close(self) -> None:
        """Release every version held: the served ones and those kept after a swap."""
        for index in [*self.indexes.values(), *self.old.values()]:
            index.close()
        self.old.clear()

    def refresh(self) -> list[str]:
        """Open the CURRENT version of every served folder that moved on; returns the names swapped."""
        swapped = []
        with self.lock:  # pub/sub and polling may both notice the same version
            for name, folder in self.dirs.items():
                old = self.indexes[name]
                if name in self.held or current_version(folder) in (None, old.version):
                    continue
                try:
                    new = self.open_index(folder)
                except (OSError, ValueError) as exc:  # keep serving the old version
                    log.warning("could not open the new version of index %s: %s", name, exc)
                    continue
                self.indexes[name] = new
                self._keep_old(name, old)
                self.swaps += 1
                swapped.append(name)
                log.info("index %s: now serving version %s (was %s)", name, new.version, old.version)
        return swapped


class VersionWatcher:
    """Calls `refresh` on every announcement on Redis and every `poll_s` seconds (the fallback)."""

    def __init__(self, refresh: Callable[[], object], redis_url: str | None, poll_s: float):
        self.refresh = refresh
        self.redis_url = redis_url
        self.poll_s = poll_s
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self._poll, name="imsearch-version-poll", daemon=True)]
        if redis_url:
            self.threads.append(threading.Thread(target=self._listen, name="imsearch-version-sub", daemon=True))

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(timeout=5)

    def _safe_refresh(self) -> None:
        try:
            self.refresh()
        except Exception:  # noqa: BLE001 (a watcher never dies; the next tick tries again)
            log.exception("index refresh failed")

    def _poll(self) -> None:
        while not self.stop_event.wait(self.poll_s):
            self._safe_refresh()

    def _listen(self) -> None:
        while not self.stop_event.is_set():
            try:
                client = redis.Redis.from_url(str(self.redis_url), socket_timeout=None, socket_connect_timeout=1)
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(VERSIONS_CHANNEL)
                while not self.stop_event.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message and message.get("type") == "message":
                        log.info("version announced: %s", json.loads(message["data"]))
                        self._safe_refresh()
                pubsub.close()
                client.close()
            except redis.RedisError:
                self.stop_event.wait(1.0)  # Redis down: polling covers us; retry the subscription
