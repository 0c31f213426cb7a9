"""The tests' Redis-compatible server: the bench's launcher (src/tierlm/bench/redis_process.py)."""
from tierlm.bench.redis_process import RedisServer, find_server_binary, free_port

__all__ = ["RedisServer", "find_server_binary", "free_port"]
