"""Paged KV cache: exact memory arithmetic (spec), chained block hashes, the device block pool,
the manager the scheduler talks to, and the storage that owns the KV tensors. Imports only tierlm.core and
tierlm.config (and torch, for the storage)."""
from tierlm.kvcache.block_pool import BlockPool, FreeBlockQueue, KVBlock
from tierlm.kvcache.hashing import BlockHash, hash_block_tokens, hash_request_blocks, root_hash
from tierlm.kvcache.manager import KVCacheManager, KVCacheStats
from tierlm.kvcache.spec import KV_FORMAT_REGISTRY, KVFormat, KVSpec, get_kv_format, implemented_kv_formats
from tierlm.kvcache.storage import KVStorage, LayerKV

__all__ = [
    "KV_FORMAT_REGISTRY", "BlockHash", "BlockPool", "FreeBlockQueue", "KVBlock", "KVCacheManager",
    "KVCacheStats", "KVFormat", "KVSpec", "KVStorage", "LayerKV", "get_kv_format", "hash_block_tokens", "hash_request_blocks",
    "implemented_kv_formats", "root_hash",
]
