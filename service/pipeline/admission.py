"""Service pipeline, admission: per rerank tier, a bound on the reranking work queued ahead of a request;
past it the request is refused at once (503, Retry-After) instead of waiting without end."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

from service.pipeline.batcher import Overloaded


@dataclass(eq=False)
class Ticket:
    """One admitted request's reranking work: its size and how much of it is still to score."""

    tier: str
    size: int  # candidates to rerank (its place in the queue: smaller ones go first)
    left: int


class Admission:
    """Counts, per tier, the candidates still to score of every admitted request.

    The reranker serves smaller requests first (service.pipeline.search), so the work ahead of
    a request is that of the requests of its tier no larger than it. A request is refused when that
    work plus its own exceeds `bound` candidates; a request alone in its tier is always admitted.
    The refusal says when to retry, from the tier's measured cost per candidate.
    """

    EWMA = 0.2  # weight of the newest measurement of a tier's cost per candidate

    def __init__(self, bound: int, workers: int):
        self.bound, self.workers = bound, max(1, workers)
        self._tickets: set[Ticket] = set()
        self._cost_s: dict[str, float] = {}  # tier → seconds per candidate
        self._lock = threading.Lock()

    def admit(self, tier: str, size: int) -> Ticket:
        """A ticket for the request, or Overloaded."""
        with self._lock:
            ahead = sum(t.left for t in self._tickets if t.tier == tier and t.size <= size)
            if ahead and ahead + size > self.bound:
                wait = ahead * self._cost_s.get(tier, 1e-3) / self.workers
                raise Overloaded(f"the {tier!r} reranker has {ahead} candidates queued ahead of this request "
                                 f"(at most {self.bound}); retry later, or ask for fewer (rerank_k)",
                                 max(1, math.ceil(wait)))
            ticket = Ticket(tier, size, size)
            self._tickets.add(ticket)
            return ticket

    def scored(self, ticket: Ticket, candidates: int, seconds: float) -> None:
        """Record a step of a request's reranking: `candidates` scored in `seconds`."""
        with self._lock:
            ticket.left = max(0, ticket.left - candidates)
            if candidates:
                cost = seconds / candidates
                old = self._cost_s.get(ticket.tier)
                self._cost_s[ticket.tier] = cost if old is None else old + self.EWMA * (cost - old)

    def release(self, ticket: Ticket) -> None:
        """The request ended (answered, failed or abandoned)."""
        with self._lock:
            self._tickets.discard(ticket)

    def queued(self, tier: str) -> int:
        """Candidates still to score in a tier."""
        with self._lock:
            return sum(t.left for t in self._tickets if t.tier == tier)
