"""KV caches: position-addressed slot caches (dense, StreamingLLM, retrieval) and paged ones.

`slots` holds the caches that speculative decoding rolls back by position; `paged` the page
pools (float, int8, int4) with an allocator; `offload` the device / host / disk tiers.
"""

from jaxsys.kvcache.offload import build_kv_cache, device_kv_bytes, parse_bytes, release, transfer_bytes
from jaxsys.kvcache.paged import PageAllocator, PagedCache, PagePoolExhausted, check_overflow, paged_cache
from jaxsys.kvcache.slots import (EMPTY, DenseCache, RetrievalCache, StreamingCache, build_retrieval,
                                  dense_cache, retrieval_cache, streaming_cache)

__all__ = ["EMPTY", "DenseCache", "PageAllocator", "PagePoolExhausted", "PagedCache", "RetrievalCache",
           "StreamingCache", "build_kv_cache", "build_retrieval", "check_overflow", "dense_cache",
           "device_kv_bytes", "paged_cache", "parse_bytes", "release", "retrieval_cache", "streaming_cache",
           "transfer_bytes"]
