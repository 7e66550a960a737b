-- kcons outbox schema for SQLite (the embedded, single-process case). Idempotent.
-- SQLite serialises write transactions, so the AUTOINCREMENT rowid (position) is commit order.
CREATE TABLE IF NOT EXISTS {table} (
    position      INTEGER PRIMARY KEY AUTOINCREMENT,
    id            TEXT    NOT NULL UNIQUE,
    aggregatetype TEXT    NOT NULL,
    aggregateid   TEXT    NOT NULL,
    type          TEXT    NOT NULL,
    payload       BLOB    NOT NULL,
    topic         TEXT,
    headers       TEXT,
    version       INTEGER,
    created_at    REAL    NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0),
    published_at  REAL
);

CREATE INDEX IF NOT EXISTS {table}_unpublished ON {table} (position) WHERE published_at IS NULL;
CREATE INDEX IF NOT EXISTS {table}_published ON {table} (published_at) WHERE published_at IS NOT NULL;

-- Dead-letter table (see sql/postgres.sql): poison rows with their reason, and the later rows of
-- their aggregates held behind them.
CREATE TABLE IF NOT EXISTS {table}_dead (
    position      INTEGER PRIMARY KEY,
    id            TEXT    NOT NULL,
    aggregatetype TEXT    NOT NULL,
    aggregateid   TEXT    NOT NULL,
    type          TEXT    NOT NULL,
    payload       BLOB    NOT NULL,
    topic         TEXT,
    headers       TEXT,
    version       INTEGER,
    created_at    REAL    NOT NULL,
    reason        TEXT    NOT NULL,
    failed_at     REAL    NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0)
);
CREATE INDEX IF NOT EXISTS {table}_dead_aggregate ON {table}_dead (aggregatetype, aggregateid);
