"""KV caches: position-addressed slot caches (dense, StreamingLLM, retrieval)."""

from jaxsys.kvcache.slots import (EMPTY, DenseCache, RetrievalCache, StreamingCache, build_retrieval,
                                  dense_cache, retrieval_cache, streaming_cache)

__all__ = ["EMPTY", "DenseCache", "RetrievalCache", "StreamingCache", "build_retrieval", "dense_cache",
           "retrieval_cache", "streaming_cache"]
