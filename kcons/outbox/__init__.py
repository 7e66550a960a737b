"""The transactional outbox: write events in the business transaction, relay them to Kafka.

The writer inserts the event row in the caller's open transaction; the relay publishes
committed rows in commit order per aggregate (see DESIGN.md, "Outbox").
"""
