"""Engram addressing (REFERENCE.md section 4): token ids -> normalized ids -> for each N-gram order and hash head,
a row of that head's prime-sized table; all heads' tables are one table with offsets.

Normalized ids (`compression_map`): tokens whose text differs only by case or leading whitespace share one id
(" The", "the", "THE" -> one), computed from any tokenizer by decoding each id; whitespace-only and special tokens
keep their own. The map is data: saved next to a model (`save_map` / `load_map`, with the vocabulary size checked).

Hashing (`NGramHasher`): for order n and head k, the N-gram ending at position t, (x_{t-n+1}, ..., x_t) of
normalized ids, hashes to h = XOR_i (x_{t-i} * m_{n,k,i}) with fixed odd 63-bit multipliers drawn from `seed`
(int64 products wrap), and row (h mod P_{n,k}) of a table of prime size P_{n,k}; positions before a sequence's
start read a padding id. Addresses depend only on the token ids, never on activations: that is what lets a
step's rows be fetched before the forward pass reaches the layer.
"""
from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from tierlm.core.errors import CorruptModelError, InvalidParameterError


def _normal_form(text: str) -> str:
    folded = unicodedata.normalize("NFKC", text).lower()
    stripped = folded.lstrip()
    return stripped if stripped else folded  # whitespace-only tokens keep their own form


def compression_map(tokenizer, special_ids: set[int] | None = None) -> torch.Tensor:
    """[vocab] int64: each token id's normalized id (dense, 0 .. V' - 1, ordered by first occurrence)."""
    special = set(special_ids or ()) | set(getattr(tokenizer, "_all_special_ids", ()) or ())
    seen: dict[str, int] = {}
    out = np.empty(tokenizer.vocab_size, dtype=np.int64)
    for i in range(tokenizer.vocab_size):
        key = f"\0special{i}" if i in special else _normal_form(tokenizer.decode([i], skip_special_tokens=False))
        out[i] = seen.setdefault(key, len(seen))
    return torch.from_numpy(out)


def save_map(path: str | Path, mapping: torch.Tensor) -> None:
    """The map as JSON ({"vocab_size", "ids"}): small, diffable, checked at load."""
    Path(path).write_text(json.dumps({"vocab_size": int(mapping.numel()), "ids": mapping.tolist()}))


def load_map(path: str | Path, vocab_size: int) -> torch.Tensor:
    """The saved map; CorruptModelError naming the fix when it is unreadable or made for another vocabulary."""
    try:
        doc = json.loads(Path(path).read_text())
        ids = torch.tensor(doc["ids"], dtype=torch.int64)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptModelError(f"{path} is not a readable Engram token map ({exc})", "rebuild it from the tokenizer")
    if doc.get("vocab_size") != vocab_size or ids.numel() != vocab_size or (ids.numel() and int(ids.min()) < 0):
        raise CorruptModelError(f"{path} maps {ids.numel()} token ids, the tokenizer has {vocab_size}",
                                "rebuild the map from this model's tokenizer")
    return ids


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def distinct_primes_below(target: int, count: int) -> list[int]:
    """The `count` largest primes <= target, descending (one per hash head, so heads never share a size)."""
    out, n = [], target
    while len(out) < count:
        if n < 2:
            raise InvalidParameterError(f"fewer than {count} primes below {target}", "use larger Engram tables")
        if is_prime(n):
            out.append(n)
        n -= 1
    return out


@dataclass(frozen=True)
class NGramHasher:
    """Row ids for orders `orders` (default 2- and 3-grams) x `heads` hash heads, each head a table of a distinct
    prime size <= `rows_per_head`; `num_ids` normalized ids (the padding id is num_ids)."""

    num_ids: int
    rows_per_head: int
    orders: tuple[int, ...] = (2, 3)
    heads: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.orders or min(self.orders) < 1 or self.heads < 1 or self.rows_per_head < 2:
            raise InvalidParameterError(f"Engram hashing needs orders >= 1, heads >= 1 and tables of >= 2 rows "
                                        f"(got orders {self.orders}, {self.heads} heads, {self.rows_per_head} rows)",
                                        "use the defaults: orders (2, 3), 8 heads")

    @property
    def slots(self) -> int:
        """Rows read per token: one per (order, head)."""
        return len(self.orders) * self.heads

    @cached_property
    def sizes(self) -> list[int]:
        return distinct_primes_below(self.rows_per_head, self.slots)

    @cached_property
    def offsets(self) -> list[int]:
        """Where each (order, head) table starts in the one table, in (order, head) order."""
        return [0, *np.cumsum(self.sizes)[:-1].tolist()]

    @property
    def total_rows(self) -> int:
        return int(sum(self.sizes))

    def multipliers(self) -> torch.Tensor:
        """[slots, max order] odd int64 multipliers, fixed by `seed`."""
        return self._multipliers

    @cached_property
    def _multipliers(self) -> torch.Tensor:
        g = np.random.default_rng(self.seed)
        m = g.integers(1, 2 ** 62, size=(self.slots, max(self.orders)), dtype=np.int64) * 2 + 1
        return torch.from_numpy(m)

    def row_ids(self, ids: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        """ids [..., T] normalized ids -> [..., T, slots] rows of the one table. `history` [..., max order - 1]:
        the ids before the first position (default: padding), so a decode step hashes like the prefill did."""
        ids = ids.to(torch.int64)
        width = max(self.orders) - 1
        if history is None:
            history = torch.full((*ids.shape[:-1], width), self.num_ids, dtype=torch.int64, device=ids.device)
        seq = torch.cat((history.to(ids.device, torch.int64)[..., history.shape[-1] - width:], ids), dim=-1)
        T = ids.shape[-1]
        mult = self.multipliers().to(ids.device)
        sizes = torch.tensor(self.sizes, dtype=torch.int64, device=ids.device)
        offsets = torch.tensor(self.offsets, dtype=torch.int64, device=ids.device)
        out = []
        s = 0
        for n in self.orders:
            for _ in range(self.heads):
                h = torch.zeros_like(ids)
                for i in range(n):  # token t - i sits at seq position width + t - i
                    h = h ^ (seq[..., width - i: width - i + T] * mult[s, i])
                out.append(torch.remainder(h & 0x7FFFFFFFFFFFFFFF, sizes[s]) + offsets[s])
                s += 1
        return torch.stack(out, dim=-1)


def layer_hasher(cfg, layer: int, vocab_size: int = 0) -> NGramHasher:
    """The hasher of a V4-mini model's Engram layer `layer` (cfg: tierlm.config.EngramConfig): normalized ids
    cfg.num_ids (0: no compression map, the raw `vocab_size` ids); each layer hashes with seed `seed + layer`."""
    return NGramHasher(num_ids=cfg.num_ids or vocab_size, rows_per_head=cfg.rows_per_head, orders=tuple(cfg.orders),
                       heads=cfg.heads, seed=cfg.seed + layer)


def table_values(cfg) -> int:
    """Engram table values over all of a model's Engram layers (memory, not FLOPs: rows are looked up)."""
    return sum(layer_hasher(cfg, i).total_rows for i in cfg.layers) * cfg.row_dim
