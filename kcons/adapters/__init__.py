"""Adapters: implementations of kcons's store protocols for Redis, PostgreSQL, SQLite, memory and Raft.

Each adapter module implements protocols defined in the core modules (``kcons.dedup``,
``kcons.outbox``, ``kcons.cache``); the core never imports an adapter's client library.
"""
