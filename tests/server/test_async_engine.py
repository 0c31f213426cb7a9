"""AsyncEngine on its own: streaming, errors raised in the caller, abort frees blocks, shutdown."""
from __future__ import annotations

import asyncio

import pytest

from tierlm import SamplingParams
from tierlm.core.errors import InvalidParameterError, PromptTooLongError
from tierlm.engine.async_engine import AsyncEngine, EngineDeadError


@pytest.fixture
def aengine(server_engine):
    a = AsyncEngine(server_engine).start()
    yield a
    a.shutdown()
    assert not server_engine.has_unfinished_requests()


def test_stream_matches_engine_greedy(aengine, default_llm):
    ids = default_llm.tokenizer.encode("The quick brown fox")
    params = SamplingParams(temperature=0, max_tokens=6)

    async def go():
        outs = [o async for o in aengine.generate(ids, params)]
        return outs

    outs = asyncio.run(go())
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    assert outs[-1].outputs[0].token_ids == default_llm.generate(ids, params)[0].outputs[0].token_ids
    assert aengine.num_seqs_in_flight == 0


def test_invalid_request_raises_in_caller(aengine):
    async def go(prompt):
        await aengine.add_request(prompt, SamplingParams(max_tokens=2))

    with pytest.raises(InvalidParameterError):
        asyncio.run(go([]))
    with pytest.raises(PromptTooLongError):
        asyncio.run(go([5] * (aengine.engine.max_model_len + 1)))
    assert aengine.num_seqs_in_flight == 0


def test_abort_frees_blocks(aengine):
    kv = aengine.engine.kv

    async def go():
        stream = await aengine.add_request([7] * 100, SamplingParams(max_tokens=500, ignore_eos=True, n=2))
        async for out in stream:
            if len(out.outputs[0].token_ids) >= 3:
                assert kv.num_free_blocks < kv.num_blocks
                break
        stream.abort()

    asyncio.run(go())
    assert aengine.wait_idle(10)
    assert kv.num_free_blocks == kv.num_blocks and aengine.num_seqs_in_flight == 0


def test_shutdown_fails_open_streams(server_engine):
    a = AsyncEngine(server_engine).start()

    async def go():
        stream = await a.add_request([9] * 10, SamplingParams(max_tokens=1000, ignore_eos=True))
        async for _ in stream:
            a.shutdown()
            break
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await a.add_request([1, 2], SamplingParams())

    asyncio.run(go())
    assert not server_engine.has_unfinished_requests()


def test_loop_crash_fails_streams_instead_of_hanging(server_engine, monkeypatch):
    a = AsyncEngine(server_engine).start()

    def boom(outputs):
        raise RuntimeError("delivery bug")

    monkeypatch.setattr(a, "_deliver", boom)

    async def go():
        stream = await a.add_request([7] * 20, SamplingParams(max_tokens=50, ignore_eos=True))
        async for _ in stream:
            pass

    with pytest.raises(EngineDeadError, match="crashed"):
        asyncio.run(asyncio.wait_for(go(), timeout=60))
    assert not a.is_running
    with pytest.raises(EngineDeadError):
        asyncio.run(go())
    a.shutdown()
    assert not server_engine.has_unfinished_requests()
    assert server_engine.kv.num_free_blocks == server_engine.kv.num_blocks


def test_duplicate_request_id_is_rejected_and_the_original_finishes(aengine):
    """A second add with an id in flight raises before touching state; the first streams to its end."""
    params = SamplingParams(max_tokens=40, ignore_eos=True)

    async def go():
        first = await aengine.add_request([7] * 20, params, request_id="dup")
        outs = []
        async for out in first:
            outs.append(out)
            if len(outs) == 1:  # the first is running: now try its id again
                with pytest.raises(InvalidParameterError, match="'dup' is already in flight") as e:
                    await aengine.add_request([8] * 5, SamplingParams(max_tokens=2), request_id="dup")
                assert e.value.param == "request_id"
        again = [o async for o in aengine.generate([9] * 5, SamplingParams(max_tokens=2), request_id="dup")]
        return outs, again

    outs, again = asyncio.run(asyncio.wait_for(go(), timeout=60))  # the old code left `first` hanging
    final = outs[-1]
    assert final.finished and final.request_id == "dup" and len(final.outputs[0].token_ids) == 40
    assert final.prompt_token_ids == [7] * 20
    assert again[-1].finished and len(again[-1].outputs[0].token_ids) == 2  # the id is free once finished
    assert aengine.wait_idle(10) and aengine.num_seqs_in_flight == 0


def test_a_stale_stream_never_aborts_a_newer_request_with_its_id(aengine):
    """A consumer that stops after its request finished (final output queued, not read) aborts by id: that
    must not reach a newer request that reused the id meanwhile."""
    async def go():
        old = await aengine.add_request([7] * 5, SamplingParams(max_tokens=2, ignore_eos=True), request_id="same")
        assert await asyncio.to_thread(aengine.wait_idle, 10)  # finished in the engine; nobody read it
        new = await aengine.add_request([8] * 5, SamplingParams(max_tokens=30, ignore_eos=True), request_id="same")
        old.abort()  # the stale consumer gives up
        return [o async for o in new]

    outs = asyncio.run(asyncio.wait_for(go(), timeout=60))
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 30
    assert aengine.wait_idle(10) and aengine.num_seqs_in_flight == 0
