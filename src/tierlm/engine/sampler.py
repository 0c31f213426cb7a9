"""Turn last-position logits into next tokens, one per request, vectorized over the batch.

Order of operations (every step uses per-row parameter tensors; no Python loop over the vocab):

 0. Fast path: every row greedy, no penalties, no logprobs, no active min_tokens, no structured-output
    mask -> argmax, done.
 1. logits -> fp32 copy (the caller's tensor is never modified).
 2. min_tokens: while len(output) < min_tokens, eos ids and stop_token_ids are set to -inf
    (ignore_eos only affects stopping elsewhere, never this mask).
 3. Repetition penalty (CTRL) over prompt + output tokens: logit > 0 -> logit / p, logit < 0 -> logit * p.
 4. Frequency / presence penalties (OpenAI) over output tokens only:
    logit -= frequency * count + presence * (count > 0).
 4b. Structured outputs: a guided row's disallowed tokens are set to -inf (engine/structured.py computes the
    masks). When min_tokens has masked the only tokens the grammar allows (its end), the grammar wins.
 5. Greedy rows (temperature == 0) take argmax of the penalized logits; the rest continue:
 6. temperature: logits / T.
 7. top-k: keep the k highest logits (k <= 0 or k >= V disables it; when every row has one,
    only the top-max(k) candidates are materialized instead of sorting the vocab).
 8. top-p: keep the smallest highest-probability set whose mass reaches p (on the top-k survivors).
 9. min-p: drop tokens whose prob < min_p * max prob.
10. sample with the exponential race: argmax(probs / q), q ~ Exponential(1) i.i.d.
    A seeded request draws its q row from its own torch.Generator (seeded once, kept by request_id
    until `forget`), so its tokens do not depend on batch composition or order; unseeded rows share
    one sampler-wide generator.
11. logprobs (when requested): log_softmax of the RAW logits (before steps 2-9); the sampled token
    first, then the top-n tokens by logprob (n = params.logprobs), as vLLM / OpenAI report them.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from tierlm.core.outputs import Logprob
from tierlm.core.request import Request

# A candidate set whose mass is within this of top_p counts as reaching it, so that fp32 rounding
# in softmax/cumsum does not let one extra token in when the mass lands exactly on p.
_TOP_P_EPS = 1e-6


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per request: None when its params.logprobs is None, else [sampled, top-1, ..., top-n].
    logprobs: list[list[Logprob] | None]


class Sampler:
    """Picks one next token per request. See the module docstring for the order of operations."""

    def __init__(self, eos_token_ids: tuple[int, ...], seed: int | None = None):
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self._seed = seed  # sampler-wide generator seed; None -> nondeterministic
        self._shared_gen: torch.Generator | None = None
        self._request_gens: dict[str, torch.Generator] = {}

    # ------------------------------------------------------------------ public API

    def __call__(self, logits: torch.Tensor, requests: list[Request],
                 allowed: tuple[list[int], torch.Tensor] | None = None) -> SamplerOutput:
        # logits: [B, V], row i belongs to requests[i]; allowed: (rows, bool [R, V]) of the guided rows
        if logits.dim() != 2 or logits.shape[0] != len(requests):
            raise ValueError(f"logits must be [B, V] with B == len(requests) == {len(requests)}, "
                             f"got {tuple(logits.shape)}")
        num_reqs = len(requests)
        if num_reqs == 0:
            return SamplerOutput([], [])

        # 0. Fast path: plain greedy batch.
        for r in requests:
            sp = r.sampling_params
            if (allowed is not None or sp.temperature != 0.0 or sp.logprobs is not None or sp.repetition_penalty != 1.0
                    or sp.presence_penalty != 0.0 or sp.frequency_penalty != 0.0
                    or sp.min_tokens > len(r.output_token_ids)):
                break
        else:
            return SamplerOutput(logits.argmax(dim=-1).tolist(), [None] * num_reqs)

        # 1-4. Masks and penalties on an fp32 copy.
        x = logits.to(torch.float32, copy=True)  # x: [B, V]
        self._penalize(x, requests)
        if allowed is not None:
            self._apply_structured(x, logits, allowed)

        # 5-10. Greedy rows argmax; the others go through the sampling pipeline.
        greedy = [r.sampling_params.temperature == 0.0 for r in requests]
        if all(greedy):
            tokens = x.argmax(dim=-1)  # tokens: [B]
        elif not any(greedy):
            tokens = self._sample(x, requests)  # tokens: [B]
        else:
            g_rows = [i for i, g in enumerate(greedy) if g]
            s_rows = [i for i, g in enumerate(greedy) if not g]
            g_idx = torch.tensor(g_rows, device=x.device)
            s_idx = torch.tensor(s_rows, device=x.device)
            tokens = torch.empty(num_reqs, dtype=torch.long, device=x.device)  # tokens: [B]
            tokens[g_idx] = x[g_idx].argmax(dim=-1)
            tokens[s_idx] = self._sample(x[s_idx], [requests[i] for i in s_rows])

        # 11. Logprobs of the raw logits.
        logprobs = self._logprobs(logits, tokens, requests)
        return SamplerOutput(tokens.tolist(), logprobs)

    def forget(self, request_id: str) -> None:
        """Drop a finished request's generator. Unknown ids are ignored."""
        self._request_gens.pop(request_id, None)

    # ------------------------------------------------------------------ steps 2-4

    def _penalize(self, x: torch.Tensor, requests: list[Request]) -> None:
        # x: [B, V] fp32, modified in place
        self._apply_min_tokens(x, requests)
        self._apply_repetition_penalty(x, requests)
        self._apply_frequency_presence(x, requests)

    def _apply_min_tokens(self, x: torch.Tensor, requests: list[Request]) -> None:
        # x: [B, V], modified in place
        vocab = x.shape[1]
        rows: list[int] = []
        cols: list[int] = []
        for i, r in enumerate(requests):
            sp = r.sampling_params
            if len(r.output_token_ids) < sp.min_tokens:
                ids = {t for t in itertools.chain(self.eos_token_ids, sp.stop_token_ids) if 0 <= t < vocab}
                rows.extend([i] * len(ids))
                cols.extend(ids)
        if rows:
            x[torch.tensor(rows, device=x.device), torch.tensor(cols, device=x.device)] = float("-inf")

    def _apply_repetition_penalty(self, x: torch.Tensor, requests: list[Request]) -> None:
        # x: [B, V], modified in place
        pens = [r.sampling_params.repetition_penalty for r in requests]
        if all(p == 1.0 for p in pens):
            return
        token_lists = [r.prompt_token_ids + r.output_token_ids if p != 1.0 else [] for r, p in zip(requests, pens)]
        rows, cols = _flat_token_index(token_lists, x.shape[1], x.device)  # rows, cols: [N]
        p = torch.tensor(pens, dtype=torch.float32, device=x.device)[rows]  # p: [N]
        vals = x[rows, cols]  # vals: [N]; a repeated (row, token) pair reads and writes the same value,
        x[rows, cols] = torch.where(vals > 0, vals / p, vals * p)  # so each token is penalized once

    def _apply_frequency_presence(self, x: torch.Tensor, requests: list[Request]) -> None:
        # x: [B, V], modified in place
        freq = [r.sampling_params.frequency_penalty for r in requests]
        pres = [r.sampling_params.presence_penalty for r in requests]
        active = [f != 0.0 or p != 0.0 for f, p in zip(freq, pres)]
        if not any(active):
            return
        token_lists = [r.output_token_ids if a else [] for r, a in zip(requests, active)]
        rows, cols = _flat_token_index(token_lists, x.shape[1], x.device)  # rows, cols: [N]
        f = torch.tensor(freq, dtype=torch.float32, device=x.device)[rows]  # f: [N]
        pr = torch.tensor(pres, dtype=torch.float32, device=x.device)[rows]  # pr: [N]
        x[rows, cols] = x[rows, cols] - pr  # repeated pairs write the same value: once per distinct token
        x.index_put_((rows, cols), -f, accumulate=True)  # once per occurrence: frequency * count

    @staticmethod
    def _apply_structured(x: torch.Tensor, logits: torch.Tensor, allowed: tuple[list[int], torch.Tensor]) -> None:
        # x: [B, V] penalized, modified in place; logits: [B, V] raw; allowed: (rows [R], bool [R, V])
        rows, mask = allowed
        idx = torch.tensor(rows, device=x.device)  # idx: [R]
        mask = mask.to(x.device)
        guided = x[idx].masked_fill_(~mask, float("-inf"))  # guided: [R, V]
        dead = torch.isneginf(guided).all(dim=-1)  # [R]: penalties masked every token the grammar allows
        if bool(dead.any()):
            raw = logits[idx[dead]].float().masked_fill_(~mask[dead], float("-inf"))
            guided[dead] = raw
        x[idx] = guided

    # ------------------------------------------------------------------ steps 6-10

    def _sample(self, x: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        # x: [S, V] penalized fp32 logits of the non-greedy rows -> returns tokens: [S]
        vocab = x.shape[1]
        dev = x.device
        params = [r.sampling_params for r in requests]

        temps = torch.tensor([sp.temperature for sp in params], dtype=torch.float32, device=dev)  # [S]
        x = x / temps.unsqueeze(1)  # x: [S, V]

        ks = [sp.top_k if 0 < sp.top_k < vocab else vocab for sp in params]
        ps = [sp.top_p for sp in params]
        use_k = any(k < vocab for k in ks)
        use_p = any(p < 1.0 for p in ps)
        # Candidates in descending order: a top-k-sized slice when every row has top-k (cheap),
        # else the fully sorted vocab; without top-k/top-p, the vocab as is.
        cand_idx: torch.Tensor | None = None
        if use_k and all(k < vocab for k in ks):
            cand, cand_idx = x.topk(max(ks), dim=-1)  # cand, cand_idx: [S, K]
        elif use_k or use_p:
            cand, cand_idx = x.sort(dim=-1, descending=True)  # cand, cand_idx: [S, V]
        else:
            cand = x  # cand: [S, V]
        width = cand.shape[1]

        if use_k:
            k = torch.tensor(ks, device=dev).unsqueeze(1)  # k: [S, 1]
            pos = torch.arange(width, device=dev).unsqueeze(0)  # pos: [1, W]
            cand = cand.masked_fill(pos >= k, float("-inf"))
        if use_p:
            sorted_probs = cand.softmax(dim=-1)  # [S, W]
            cum = sorted_probs.cumsum(dim=-1)  # [S, W]
            mass_before = torch.nn.functional.pad(cum[:, :-1], (1, 0))  # [S, W], mass of higher tokens
            thr = torch.tensor([p - _TOP_P_EPS if p < 1.0 else float("inf") for p in ps],
                               dtype=torch.float32, device=dev).unsqueeze(1)  # thr: [S, 1]
            drop = mass_before >= thr  # drop: [S, W]
            drop[:, 0] = False  # the top token always survives
            cand = cand.masked_fill(drop, float("-inf"))

        probs = cand.softmax(dim=-1)  # probs: [S, W]
        min_ps = [sp.min_p for sp in params]
        if any(m > 0.0 for m in min_ps):
            m = torch.tensor(min_ps, dtype=torch.float32, device=dev).unsqueeze(1)  # m: [S, 1]
            floor = m * probs.amax(dim=-1, keepdim=True)  # floor: [S, 1]
            probs = probs.masked_fill(probs < floor, 0.0)  # unnormalized is fine for the race

        q = self._exponential_noise(probs, requests, ks, vocab, cand_idx)  # q: [S, W]
        choice = (probs / q).argmax(dim=-1)  # choice: [S]
        if cand_idx is None:
            return choice
        return cand_idx.gather(1, choice.unsqueeze(1)).squeeze(1)  # [S]

    def _exponential_noise(self, probs: torch.Tensor, requests: list[Request], ks: list[int], vocab: int,
                           cand_idx: torch.Tensor | None) -> torch.Tensor:
        """i.i.d. Exponential(1) noise shaped like probs ([S, W], candidate order), all > 0.

        Unseeded rows share one generator. A seeded row draws a count fixed by its own params, from its
        own generator, laid out so its token never depends on the rest of the batch: with top-k, k draws
        for its k best candidates (the rest are masked, so get 1); without, V draws in vocab order,
        gathered into candidate order when the batch was sorted.
        """
        q = torch.ones_like(probs)  # q: [S, W]
        width = probs.shape[1]
        unseeded = [i for i, r in enumerate(requests) if r.sampling_params.seed is None]
        if len(unseeded) == len(requests):
            q.exponential_(generator=self._shared_generator(probs.device))
        else:
            if unseeded:
                noise = torch.empty((len(unseeded), width), dtype=probs.dtype, device=probs.device)
                noise.exponential_(generator=self._shared_generator(probs.device))  # noise: [U, W]
                q[torch.tensor(unseeded, device=probs.device)] = noise
            for i, r in enumerate(requests):
                if r.sampling_params.seed is None:
                    continue
                gen = self._request_generator(r, probs.device)
                own = torch.empty(ks[i], dtype=probs.dtype, device=probs.device).exponential_(generator=gen)
                if ks[i] < vocab:  # top-k row: own[j] belongs to the j-th best token
                    q[i, : ks[i]] = own
                elif cand_idx is not None:  # no top-k, sorted batch: own is in vocab order
                    q[i] = own[cand_idx[i]]
                else:  # no top-k, unsorted batch: own is in vocab order already
                    q[i] = own
        # A zero draw would turn a masked token's 0/0 into NaN, which argmax would pick.
        return q.clamp_min_(torch.finfo(q.dtype).tiny)

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        gen = self._shared_gen
        if gen is None or gen.device != device:
            gen = torch.Generator(device=device)
            if self._seed is None:
                gen.seed()
            else:
                gen.manual_seed(self._seed)
            self._shared_gen = gen
        return gen

    def _request_generator(self, request: Request, device: torch.device) -> torch.Generator:
        gen = self._request_gens.get(request.request_id)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(request.sampling_params.seed)
            self._request_gens[request.request_id] = gen
        return gen

    # ------------------------------------------------------------------ step 11

    def _logprobs(self, logits: torch.Tensor, tokens: torch.Tensor,
                  requests: list[Request]) -> list[list[Logprob] | None]:
        # logits: [B, V] raw, tokens: [B]
        out: list[list[Logprob] | None] = [None] * len(requests)
        rows = [i for i, r in enumerate(requests) if r.sampling_params.logprobs is not None]
        if not rows:
            return out
        idx = torch.tensor(rows, device=logits.device)
        lp = torch.log_softmax(logits[idx].float(), dim=-1)  # lp: [R, V]
        sampled = tokens[idx]  # [R]
        sampled_lp = lp.gather(1, sampled.unsqueeze(1)).squeeze(1)  # [R]
        n_max = min(max(requests[i].sampling_params.logprobs for i in rows), lp.shape[1])
        if n_max > 0:
            top_lp, top_ids = lp.topk(n_max, dim=-1)  # top_lp, top_ids: [R, n_max], descending
            top_lp_l, top_ids_l = top_lp.tolist(), top_ids.tolist()
        sampled_l, sampled_lp_l = sampled.tolist(), sampled_lp.tolist()
        for j, i in enumerate(rows):
            n = min(requests[i].sampling_params.logprobs, n_max)
            entries = [Logprob(sampled_l[j], sampled_lp_l[j])]
            if n > 0:
                entries.extend(Logprob(t, v) for t, v in zip(top_ids_l[j][:n], top_lp_l[j][:n]))
            out[i] = entries
        return out


def _flat_token_index(token_lists: list[list[int]], vocab: int,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token) index pairs for every token in every row's list; ids outside [0, V) are dropped."""
    lengths = torch.tensor([len(t) for t in token_lists])  # [B]
    cols = torch.tensor(list(itertools.chain.from_iterable(token_lists)), dtype=torch.long)  # [N]
    rows = torch.repeat_interleave(torch.arange(len(token_lists)), lengths)  # [N]
    keep = (cols >= 0) & (cols < vocab)  # [N]
    return rows[keep].to(device), cols[keep].to(device)
