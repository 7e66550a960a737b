"""Adapters: implementations of kcons's store and lease protocols, one place per backend.

``redis/``, ``postgres/`` and ``sqlite/`` hold everything kcons keeps in that backend (dedup
store; for the SQL databases the outbox store; for PostgreSQL the advisory-lock lease),
``memory.py`` the in-process dedup store and single-process lease, ``raft.py`` the Raft lease.
They implement :mod:`kcons.dedup`, :mod:`kcons.lease` and :mod:`kcons.outbox.store`; the cache's
backends live with the cache (:mod:`kcons.cache.redis`, :mod:`kcons.cache.memory`). psycopg is
imported when a store connects (the Redis store uses the caller's client), and nothing here is
imported by ``import kcons``.
"""
