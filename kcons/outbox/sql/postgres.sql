-- kcons outbox schema for PostgreSQL (>= 13), version {version}. Applied by `kcons outbox init`, or by
-- your own migration tool (`kcons outbox init --print-sql` prints this file for a table).
-- Idempotent, and lock-free on an existing outbox table: every index and the trigger are created
-- only when missing, so re-running it never queues behind (and so never blocks) the application's
-- writers. The last statement records the version in kcons_schema; `kcons outbox init` does
-- nothing at all when that record is current.
-- {table} is replaced by the validated table name.
--
-- Debezium's outbox event-router columns: id, aggregatetype, aggregateid, type, payload.
-- Relay columns:
--   position      commit-order position: taken from an identity sequence (CACHE 1) when the row is
--                 inserted, i.e. while the writer holds its locks on the aggregate, so for writers that
--                 serialise on an aggregate, position order is that aggregate's commit order.
--   txid          the writing transaction (xid8), for diagnostics and grouping a transaction's events.
--   topic         optional per-row topic (else the relay's routing decides).
--   headers       extra Kafka headers (JSON object of text values), traceparent included.
--   version       the aggregate's version, monotonic per aggregate (kcons-version header).
--   created_at    insert time (database clock), for the age metrics.
--   published_at  set when Kafka acknowledged the row (retention mode); NULL = not yet published.
CREATE TABLE IF NOT EXISTS {table} (
    id            uuid        PRIMARY KEY,
    aggregatetype text        NOT NULL,
    aggregateid   text        NOT NULL,
    type          text        NOT NULL,
    payload       bytea       NOT NULL,
    position      bigint      NOT NULL GENERATED ALWAYS AS IDENTITY (CACHE 1) UNIQUE,
    txid          xid8        NOT NULL DEFAULT pg_current_xact_id(),
    topic         text,
    headers       jsonb,
    version       bigint,
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    published_at  timestamptz
);

-- The relay reads unpublished rows in position order through the UNIQUE index on position and
-- marks or deletes published rows by position. After a read it looks below its position hint
-- only for rows of transactions that were still open then (txid >= that read's snapshot xmin):
-- the txid index finds them without walking the dead entries of rows already deleted. Neither
-- index is partial: without statistics the planner would take a partial "published_at IS NULL"
-- index for a tiny one and read all of it.
-- Retention cleanup scans only published rows.
-- (CREATE INDEX IF NOT EXISTS would lock the table before it finds the index exists.)
DO $kcons$
BEGIN
    IF to_regclass('{table}_txid') IS NULL THEN
        CREATE INDEX {table}_txid ON {table} (txid);
    END IF;
    IF to_regclass('{table}_published') IS NULL THEN
        CREATE INDEX {table}_published ON {table} (published_at) WHERE published_at IS NOT NULL;
    END IF;
END
$kcons$;

-- Fencing: the highest leadership token that ever marked rows. A relay whose token is lower
-- (a paused former leader) cannot mark or delete rows any more.
CREATE TABLE IF NOT EXISTS {table}_fence (
    name       text        PRIMARY KEY,
    token      bigint      NOT NULL,
    holder     text        NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Dead-letter table: a row the relay cannot publish (poison: headers that are not a JSON object,
-- a topic name Kafka refuses, a record too large for the topic, ...) is moved here with its reason,
-- in the transaction that lets the relay go on; later rows of the same aggregate follow it here
-- (reason 'held behind ...') so that the aggregate's order is kept. `kcons outbox dead list`
-- shows them; `kcons outbox dead retry` / `drop` put an aggregate's rows back (original positions).
CREATE TABLE IF NOT EXISTS {table}_dead (
    position      bigint      PRIMARY KEY,
    id            uuid        NOT NULL,
    aggregatetype text        NOT NULL,
    aggregateid   text        NOT NULL,
    type          text        NOT NULL,
    payload       bytea       NOT NULL,
    txid          xid8        NOT NULL,
    topic         text,
    headers       jsonb,
    version       bigint,
    created_at    timestamptz NOT NULL,
    reason        text        NOT NULL,
    failed_at     timestamptz NOT NULL DEFAULT clock_timestamp()
);
DO $kcons$
BEGIN
    IF to_regclass('{table}_dead_aggregate') IS NULL THEN
        CREATE INDEX {table}_dead_aggregate ON {table}_dead (aggregatetype, aggregateid);
    END IF;
END
$kcons$;

-- Fencing tokens of the advisory-lock lease backend (one row per lease name).
CREATE TABLE IF NOT EXISTS kcons_lease_tokens (
    name       text        PRIMARY KEY,
    token      bigint      NOT NULL,
    holder     text        NOT NULL,
    granted_at timestamptz NOT NULL DEFAULT now()
);

-- Wake the relay at commit: one NOTIFY per inserting statement, delivered only if the
-- transaction commits (PostgreSQL folds duplicates within a transaction).
CREATE OR REPLACE FUNCTION {table}_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{table}', '');
    RETURN NULL;
END
$$;

-- Created only when missing: CREATE/DROP TRIGGER lock out the table's writers.
DO $kcons$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_trigger WHERE tgrelid = '{table}'::regclass AND tgname = '{table}_notify'
    ) THEN
        CREATE TRIGGER {table}_notify AFTER INSERT ON {table}
            FOR EACH STATEMENT EXECUTE FUNCTION {table}_notify();
    END IF;
END
$kcons$;

-- The applied schema version, one row per kcons component (`kcons outbox init` reads it first
-- and stops there when it is current).
CREATE TABLE IF NOT EXISTS kcons_schema (
    component  text        PRIMARY KEY,
    version    integer     NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO kcons_schema (component, version) VALUES ('outbox:{table}', {version})
    ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version, applied_at = now()
    WHERE kcons_schema.version < EXCLUDED.version;
