"""Redis adapters: the dedup store (``dedup.py`` and its Lua script ``dedup_claim.lua``)."""

from kcons.adapters.redis.dedup import BUCKETS_PER_RETENTION, CLAIM_SCRIPT, RedisDedupStore

__all__ = ["BUCKETS_PER_RETENTION", "CLAIM_SCRIPT", "RedisDedupStore"]
