"""Cache-aware routing: send a request to the replica most likely to hold its prompt's longest prefix.

A request's route key is the chained hashes of its prompt's full token blocks (hash i covers tokens 0 .. 16(i+1),
so a hit on hash i means the whole prefix up to there was seen). The router remembers, per block hash, the replica
that most recently took a request containing it (a bounded LRU table), and per session key the replica that served
the session. It picks, in order:

  1. the session's replica (an optional user or session key), unless overloaded
  2. the replica owning the longest known prefix, unless overloaded, when that prefix covers at least
     `min_match` of the prompt's blocks (a short shared system prompt alone does not pin every request to one
     replica: it is cached everywhere soon enough; SGLang's router has the same threshold)
  3. the least loaded replica (ties broken round-robin)

"Overloaded": its load (requests queued or running) exceeds the least loaded replica's by more than `imbalance`;
then cache affinity yields to load, as SGLang's cache-aware router does. Mode "round_robin" ignores all of this
(the comparison the benchmark runs); "least_loaded" only looks at load.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence

import xxhash

from tierlm.core.errors import InvalidParameterError

MODES = ("cache", "least_loaded", "round_robin")
BLOCK_TOKENS = 16
MAX_BLOCKS = 256  # prefixes are tracked up to 4,096 tokens


def route_key(token_ids: Sequence[int], block_tokens: int = BLOCK_TOKENS, max_blocks: int = MAX_BLOCKS) -> tuple:
    """Chained 64-bit hashes of the prompt's full blocks (at most max_blocks)."""
    out, h = [], 0
    n = min(len(token_ids) // block_tokens, max_blocks)
    for b in range(n):
        block = token_ids[b * block_tokens:(b + 1) * block_tokens]
        h = xxhash.xxh3_64_intdigest(h.to_bytes(8, "little") + b"".join(int(t).to_bytes(4, "little") for t in block))
        out.append(h)
    return tuple(out)


class Router:
    """The routing policy; thread-unsafe by design (one router per ingress, called from its event loop)."""

    def __init__(self, mode: str = "cache", imbalance: int = 4, min_match: float = 0.5, max_entries: int = 200_000):
        # named as the serve flags they come from (cluster/command.py); launch.py builds one to check them before Ray
        if mode not in MODES:
            raise InvalidParameterError(f"--routing {mode}", f"use one of {', '.join(MODES)}")
        if not 0.0 <= min_match <= 1.0:
            raise InvalidParameterError(f"--routing-min-match {min_match}", "give a fraction of the prompt in [0, 1]")
        if imbalance < 0:
            raise InvalidParameterError(f"--routing-imbalance {imbalance}", "give 0 or more requests")
        self.mode = mode
        self.imbalance = imbalance
        self.min_match = min_match
        self.max_entries = max_entries
        self._owner: OrderedDict[int, str] = OrderedDict()
        self._sessions: OrderedDict[str, str] = OrderedDict()
        self._rr = itertools.count()
        self._depth = 0
        self.counters = {"session": 0, "prefix": 0, "load": 0, "round_robin": 0, "overloaded": 0, "short_match": 0}

    def choose(self, replicas: Sequence[str], load: dict[str, int], key: tuple = (),
               session: str | None = None) -> str:
        """The replica for a request with route `key` (and session) among `replicas`, given their loads."""
        if not replicas:
            raise RuntimeError("no replica to route to")
        if self.mode == "round_robin":
            self.counters["round_robin"] += 1
            return replicas[next(self._rr) % len(replicas)]
        loads = {r: load.get(r, 0) for r in replicas}
        floor = min(loads.values())
        if self.mode == "cache":
            for kind, r in (("session", self._sessions.get(session) if session else None),
                            ("prefix", self._longest_owner(key, loads))):
                if r is None or r not in loads:
                    continue
                if kind == "prefix" and self._depth < self.min_match * len(key):
                    self.counters["short_match"] += 1
                    continue
                if loads[r] - floor <= self.imbalance:
                    self.counters[kind] += 1
                    return r
                self.counters["overloaded"] += 1
        self.counters["load"] += 1
        least = [r for r in replicas if loads[r] == floor]
        return least[next(self._rr) % len(least)]

    def _longest_owner(self, key: tuple, alive: dict[str, int]) -> str | None:
        """The live replica that saw the deepest of key's blocks; self._depth = how many blocks that covers."""
        for i in range(len(key) - 1, -1, -1):  # chained: the deepest known block is the longest prefix
            r = self._owner.get(key[i])
            if r is not None and r in alive:
                self._depth = i + 1
                return r
        self._depth = 0
        return None

    def record(self, replica: str, key: tuple = (), session: str | None = None) -> None:
        """A request with `key` went to `replica`: it now holds (or will hold) that prefix."""
        for h in key:
            self._owner[h] = replica
            self._owner.move_to_end(h)
        while len(self._owner) > self.max_entries:
            self._owner.popitem(last=False)
        if session:
            self._sessions[session] = replica
            self._sessions.move_to_end(session)
            while len(self._sessions) > self.max_entries // 16:
                self._sessions.popitem(last=False)

    def forget(self, replica: str) -> None:
        """A replica died: what it held is gone (its restarted successor starts cold)."""
        for table in (self._owner, self._sessions):
            for k in [k for k, r in table.items() if r == replica]:
                del table[k]
