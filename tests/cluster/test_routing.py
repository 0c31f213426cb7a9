"""The routing policy: longest known prefix wins, sessions stick, load overrides affinity past the imbalance,
round-robin ignores everything; route keys are chained (a shared prefix shares its hashes, nothing after it)."""
from __future__ import annotations

import pytest

from tierlm.cluster.routing import Router, route_key
from tierlm.core.errors import InvalidParameterError

R = ["a", "b", "c"]
IDLE = {"a": 0, "b": 0, "c": 0}


def test_route_key_is_chained_over_full_blocks():
    base = list(range(100))
    k = route_key(base)
    assert len(k) == 100 // 16
    assert route_key(base[:40]) == k[:2]  # a prefix shares the prefix's hashes
    other = base[:20] + [999] + base[21:]
    k2 = route_key(other)
    assert k2[0] == k[0] and all(x != y for x, y in zip(k2[1:], k[1:]))  # a change at token 20 changes block 1 on
    assert route_key([1] * 15) == ()
    assert len(route_key(list(range(10_000)), max_blocks=8)) == 8


def test_longest_prefix_owner_wins():
    r = Router("cache")
    doc = list(range(64))
    r.record("b", route_key(doc[:32]))
    r.record("c", route_key(doc))  # c saw the longer prefix
    assert r.choose(R, IDLE, route_key(doc + [7, 8, 9])) == "c"
    assert r.choose(R, IDLE, route_key(doc[:32])) == "c"  # c's request covered these blocks too, more recently
    r.record("a", route_key([5] * 32))
    assert r.choose(R, IDLE, route_key([5] * 40)) == "a"
    assert r.counters["prefix"] == 3


def test_a_short_shared_prefix_does_not_pin_requests():
    r = Router("cache", min_match=0.5)
    system = list(range(64))  # 4 blocks everyone shares
    r.record("a", route_key(system + [1] * 64))
    # 4 of 8 blocks known: enough; 4 of 12: not, the least loaded takes it
    assert r.choose(R, {"a": 1, "b": 0, "c": 0}, route_key(system + [2] * 64)) == "a"
    assert r.choose(R, {"a": 1, "b": 0, "c": 0}, route_key(system + [2] * 128)) in ("b", "c")
    assert r.counters["short_match"] == 1 and r.counters["prefix"] == 1
    anywhere = Router("cache", min_match=0.0)
    anywhere.record("a", route_key(system + [1] * 64))
    assert anywhere.choose(R, {"a": 1, "b": 0, "c": 0}, route_key(system + [2] * 128)) == "a"
    with pytest.raises(InvalidParameterError):
        Router("cache", min_match=1.5)


def test_unknown_prefix_goes_to_the_least_loaded():
    r = Router("cache")
    assert r.choose(R, {"a": 3, "b": 1, "c": 2}, route_key(list(range(32)))) == "b"
    picks = {r.choose(R, IDLE, ()) for _ in range(6)}
    assert picks == set(R)  # ties rotate


def test_load_overrides_affinity_past_the_imbalance():
    r = Router("cache", imbalance=2)
    key = route_key(list(range(32)))
    r.record("a", key)
    assert r.choose(R, {"a": 2, "b": 0, "c": 0}, key) == "a"
    assert r.choose(R, {"a": 3, "b": 0, "c": 1}, key) == "b"
    assert r.counters["overloaded"] == 1


def test_sessions_stick_and_dead_replicas_are_forgotten():
    r = Router("cache")
    r.record("c", (), session="user-1")
    assert r.choose(R, IDLE, (), session="user-1") == "c"
    r.record("c", route_key(list(range(32))))
    r.forget("c")
    assert r.choose(["a", "b"], {"a": 1, "b": 0}, route_key(list(range(32))), session="user-1") == "b"


def test_round_robin_and_least_loaded_modes():
    rr = Router("round_robin")
    rr.record("a", route_key(list(range(32))))
    assert [rr.choose(R, IDLE, route_key(list(range(32)))) for _ in range(4)] == ["a", "b", "c", "a"]
    ll = Router("least_loaded")
    ll.record("a", route_key(list(range(32))))
    assert ll.choose(R, {"a": 1, "b": 0, "c": 2}, route_key(list(range(32)))) == "b"
    with pytest.raises(InvalidParameterError):
        Router("nearest")


def test_table_is_bounded():
    r = Router("cache", max_entries=10)
    for i in range(20):
        r.record("a", (i,))
    assert len(r._owner) == 10 and 0 not in r._owner and 19 in r._owner  # the oldest blocks went first
    r.choose(R, IDLE, (0,))
    assert r.counters["prefix"] == 0


def test_the_ingress_route_of_a_request():
    import json

    from tierlm.cluster.ingress import route_of
    from tierlm.models.loader import load_checkpoint

    tok = load_checkpoint(None).tokenizer
    long = "A shared system prompt that is long enough to fill several blocks of tokens. " * 4
    a = route_of(tok, "/v1/completions", json.dumps({"prompt": long + "one"}).encode(), {})
    b = route_of(tok, "/v1/completions", json.dumps({"prompt": long + "two", "user": "u1"}).encode(), {})
    assert len(a.key) >= 3 and a.key[:3] == b.key[:3] and a.session is None and b.session == "u1"
    ids = tok.encode(long)
    assert route_of(tok, "/v1/completions", json.dumps({"prompt": ids}).encode(), {}).key == route_key(ids)
    chat = route_of(tok, "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": long}]}).encode(),
                    {"x-session-id": "s9"})
    text = tok.apply_chat_template([{"role": "user", "content": long}], add_generation_prompt=True)
    assert chat.key == route_key(tok.encode(text, add_special_tokens=False)) and chat.session == "s9"
    assert route_of(tok, "/v1/completions", b"{not json", {}).key == ()
    assert route_of(tok, "/health", b"", {}).key == ()


@pytest.mark.parametrize("flags, named", [(["--routing", "nearest"], "--routing nearest"),
                                          (["--routing-min-match", "1.5"], "--routing-min-match 1.5"),
                                          (["--routing-imbalance", "-1"], "--routing-imbalance -1"),
                                          (["--replica-gpus", "-1"], "--replica-gpus -1")])
def test_bad_cluster_flags_fail_before_ray_starts(flags, named, capsys):
    pytest.importorskip("ray.serve")
    from tierlm.cli import main

    assert main(["serve", "--replicas", "2", *flags]) == 2
    assert named in capsys.readouterr().err
