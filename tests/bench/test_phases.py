"""phases.measure_paired with two fake sides (no engine, no clock): the rows it builds from the Timings
the sides return, the rep pairing, and which rep's tokens it keeps; make_prompts' shapes."""
from __future__ import annotations

import statistics

import pytest

from tierlm.bench.phases import PhaseRow, PhaseShapes, Timing, make_prompts, measure_paired


class FakeTokenizer:
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]


class FakeSide:
    """Returns scripted Timings (a fixed function of the call index) and logs every call to a shared list."""

    def __init__(self, name: str, log: list, speed: float):
        self.name, self.log, self.speed, self.calls = name, log, speed, 0

    def generate(self, prompts: list[list[int]], new_tokens: int) -> Timing:
        self.calls += 1
        self.log.append((self.name, len(prompts), len(prompts[0]), new_tokens))
        k = self.calls  # seconds grow with the call index, so every rep's ratio differs
        prefill = k / self.speed
        decode = 2 * k * k / self.speed
        tokens = [[self.calls * 1000 + i] * new_tokens for i in range(len(prompts))]
        return Timing(prefill_s=prefill, decode_s=decode, total_s=prefill + decode, tokens=tokens)


SHAPES = PhaseShapes(prefill_lens=(64, 128), prompt_len=8, new_tokens=5, batches=(1, 3), reps=3)


def test_rows_ratios_tokens_and_alternation():
    log: list = []
    a, b = FakeSide("a", log, speed=10.0), FakeSide("b", log, speed=4.0)
    seen: list[PhaseRow] = []
    rows = measure_paired([a, b], FakeTokenizer(), SHAPES, progress=seen.append)

    assert seen == rows
    assert [(r.phase, r.batch, r.prompt_len, r.new_tokens) for r in rows] == [
        ("prefill", 1, 64, 1), ("prefill", 1, 128, 1),
        ("decode", 1, 8, 5), ("e2e", 1, 8, 5), ("decode", 3, 8, 5), ("e2e", 3, 8, 5)]
    assert rows[0].shape == "1 x 64-token prompt"
    assert rows[2].shape == "batch 1, 8-token prompts, 5 new tokens"

    # Per shape: one warm-up per side (a, b), then a and b alternate rep by rep.
    shapes = [(1, 64, 1), (1, 128, 1), (1, 8, 5), (3, 8, 5)]
    expected = []
    for batch, length, new in shapes:
        expected += [("a", batch, length, min(new, 8)), ("b", batch, length, min(new, 8))]
        expected += [(s, batch, length, new) for _ in range(SHAPES.reps) for s in ("a", "b")]
    assert log == expected

    # Each side's k-th call is the same on both sides, so per rep: a's time x 10 = b's time x 4 ... scaled
    # by the call index. Recompute the expected figures from the scripted Timings.
    def timings(side_speed, first_call):
        out = []
        for k in range(first_call, first_call + SHAPES.reps):
            pre, dec = k / side_speed, 2 * k * k / side_speed
            out.append((pre, dec, pre + dec))
        return out

    def check(row, first_call, work, which):
        ta, tb = timings(10.0, first_call), timings(4.0, first_call)
        sa = [work / t[which] for t in ta]
        sb = [work / t[which] for t in tb]
        ratios = [x / y for x, y in zip(sa, sb)]
        assert row.tok_per_s == {"a": pytest.approx(statistics.median(sa)), "b": pytest.approx(statistics.median(sb))}
        assert row.ratio == pytest.approx(statistics.median(ratios))
        assert row.ratio_range == (pytest.approx(min(ratios)), pytest.approx(max(ratios)))

    # Call 1 of each side is the first shape's warm-up, so the timed reps of shape s are calls 2..4 + 4 s.
    check(rows[0], 2, 64, 0)
    check(rows[1], 6, 128, 0)
    check(rows[2], 10, 1 * 4, 1)  # decode: batch x (new_tokens - 1) / decode time
    check(rows[3], 10, 1 * 5, 2)  # e2e: batch x new_tokens / whole time
    check(rows[4], 14, 3 * 4, 1)
    check(rows[5], 14, 3 * 5, 2)

    # Tokens: the first timed rep's (call 10 / 14), decode rows only.
    assert rows[2].tokens == {"a": [[10_000] * 5], "b": [[10_000] * 5]}
    assert rows[4].tokens["a"] == [[14_000 + i] * 5 for i in range(3)]
    for r in (rows[0], rows[1], rows[3], rows[5]):
        assert r.tokens == {"a": [], "b": []}


def test_one_side_has_no_ratio():
    log: list = []
    rows = measure_paired([FakeSide("solo", log, 5.0)], FakeTokenizer(), SHAPES)
    assert all(r.ratio is None and r.ratio_range is None and set(r.tok_per_s) == {"solo"} for r in rows)
    assert len(log) == 4 * (1 + SHAPES.reps)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="its own name"):
        measure_paired([FakeSide("x", [], 1.0), FakeSide("x", [], 1.0)], FakeTokenizer(), SHAPES)
    with pytest.raises(ValueError, match="new_tokens >= 2"):
        measure_paired([FakeSide("x", [], 1.0)], FakeTokenizer(), PhaseShapes(new_tokens=1))


def test_make_prompts_distinct_exact_and_long():
    tok = FakeTokenizer()
    ps = make_prompts(tok, 64, 40)
    assert len(ps) == 64 and all(len(p) == 40 for p in ps) and len({tuple(p) for p in ps}) == 64
    assert make_prompts(tok, 64, 40) == ps  # deterministic
    (long,) = make_prompts(tok, 1, 8192)
    assert len(long) == 8192
    assert make_prompts(tok, 2, 40, seed=1)[0] == ps[1]


def test_make_prompts_default_tokenizer_distinct():
    """With the default model's tokenizer, whose plain repeated text made equal prompts at batch 16."""
    from tierlm.models.loader import load_checkpoint

    tok = load_checkpoint(None).tokenizer
    ps = make_prompts(tok, 64, 32)
    assert len({tuple(p) for p in ps}) == 64 and {len(p) for p in ps} == {32}
    assert len(make_prompts(tok, 1, 8191)[0]) == 8191
