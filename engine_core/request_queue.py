"""The waiting queue and the scheduling policy: whom the scheduler admits next, whom it preempts.

Every sequence has an owner, the user request it belongs to (`Request.owner`: all prompts and
all n sequences of one API request, or of one offline prompt). The policy ranks a request by

    fcfs       (seats,)                         then the engine's arrival order
    priority   (priority, seats, arrival_time)  then the engine's arrival order

lowest first, where `seats` is how many sequences its owner holds now (running or fetching
KV). So admission goes round-robin across owners, not across sequences: an owner holding fewer
seats goes first, and one request of 1,024 prompts x 16 sequences cannot make a later small one
wait for all of its sequences. With `fair_share=False` seats count as 0: plain FCFS over
sequences, or vLLM's (priority, arrival_time). `priority`: lower is served first.

Contract with the scheduler: it admits `peek(seats)`, the waiting request of lowest rank (ties:
the earliest to arrive), and preempts the running request of highest `rank` (ties: the latest
admitted). Within one owner, sequences come out in the engine's arrival order (under
"priority": by (priority, arrival_time) first), so a preempted one is admitted again before its
owner's never-admitted ones. `peek` costs O(owners waiting); add and remove O(log n).
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Iterator, Mapping

from engine_core.config import SCHEDULING_POLICIES
from engine_core.request import Request

__all__ = ["RequestQueue"]


class RequestQueue:
    """The waiting requests, grouped by owner."""

    def __init__(self, policy: str = "fcfs", fair_share: bool = True) -> None:
        if policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {SCHEDULING_POLICIES}, "
                             f"got {policy!r}")
        self.policy = policy
        self.fair_share = fair_share
        # One heap per owner of [key, tie, request] entries; a removed entry's request is set
        # to None and dropped when it reaches the top (lazy deletion: aborting all 16k
        # sequences of a request stays linear).
        self._heaps: dict[str, list[list]] = {}
        self._entries: dict[str, list] = {}  # request id -> its live entry
        self._num_live: Counter[str] = Counter()  # owner -> live entries
        self._ties = itertools.count()

    def rank(self, request: Request, seats: Mapping[str, int]) -> tuple:
        """How the policy orders `request` (lower is served first), ties aside."""
        held = seats.get(request.owner, 0) if self.fair_share else 0
        if self.policy == "priority":
            return (request.priority, held, request.arrival_time)
        return (held,)

    def add(self, request: Request) -> None:
        """Queue a request: new, or back after a preemption or a KV fetch."""
        if request.request_id in self._entries:
            raise ValueError(f"request {request.request_id!r} is already waiting")
        key = ((request.priority, request.arrival_time, request.order)
               if self.policy == "priority" else (request.order,))
        entry = [key, next(self._ties), request]
        self._entries[request.request_id] = entry
        heapq.heappush(self._heaps.setdefault(request.owner, []), entry)
        self._num_live[request.owner] += 1

    def remove(self, request: Request) -> None:
        """Take a waiting request out (admitted or aborted). KeyError if it is not waiting."""
        entry = self._entries.pop(request.request_id)
        entry[2] = None
        owner = request.owner
        self._num_live[owner] -= 1
        if not self._num_live[owner]:
            del self._num_live[owner], self._heaps[owner]

    def peek(self, seats: Mapping[str, int]) -> Request | None:
        """The request to admit next (None if none waits); `seats`: owner -> seats held."""
        best, best_key = None, None
        for heap in self._heaps.values():
            while heap[0][2] is None:
                heapq.heappop(heap)
            head = heap[0][2]
            key = (*self.rank(head, seats), head.order)
            if best_key is None or key < best_key:
                best, best_key = head, key
        return best

    @property
    def owners(self) -> set[str]:
        """The owners with a request waiting."""
        return set(self._num_live)

    def clear(self) -> None:
        self._heaps.clear()
        self._entries.clear()
        self._num_live.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __contains__(self, request: object) -> bool:
        if not isinstance(request, Request):
            return False
        entry = self._entries.get(request.request_id)
        return entry is not None and entry[2] is request

    def __iter__(self) -> Iterator[Request]:
        """The waiting requests, in no particular order."""
        return (entry[2] for entry in list(self._entries.values()))
