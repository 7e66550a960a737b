"""A compact Raft log for kcons's metadata: relay leadership, leases, settings."""
