-- migration: 0007_retention
-- kind: expand
-- Retention and a healthy outbox: when a row became DEAD, the indexes the pruner walks,
-- an end for workers that vanished ('lost'), the pruner's shared record, and autovacuum
-- settings for the two tables that churn.

-- When a row became DEAD: the retention of dead letters counts from here, not from the
-- row's creation. A trigger sets it on every path to DEAD (a failed last attempt, a
-- retired generation's 'dead' policy, an operator's UPDATE) and clears it on a requeue.
ALTER TABLE core.outbox ADD COLUMN dead_at timestamptz;
UPDATE core.outbox SET dead_at = updated_at WHERE status = 'DEAD';

CREATE FUNCTION core.outbox_dead_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.dead_at := CASE WHEN NEW.status = 'DEAD' THEN coalesce(NEW.dead_at, now()) END;
    RETURN NEW;
END;
$$;

-- WHEN keeps the function off the hot path: acknowledgements and claims never call it.
CREATE TRIGGER outbox_dead_at_update
    BEFORE UPDATE OF status ON core.outbox
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status AND (OLD.status = 'DEAD' OR NEW.status = 'DEAD'))
    EXECUTE FUNCTION core.outbox_dead_at();
CREATE TRIGGER outbox_dead_at_insert
    BEFORE INSERT ON core.outbox
    FOR EACH ROW
    WHEN (NEW.status = 'DEAD' AND NEW.dead_at IS NULL)
    EXECUTE FUNCTION core.outbox_dead_at();

-- The pruner reads finished rows oldest first from these partial indexes only: a pass
-- touches the rows it deletes, never the whole table.
CREATE INDEX outbox_done_at_idx ON core.outbox (done_at) WHERE status = 'DONE';
CREATE INDEX outbox_dead_at_idx ON core.outbox (dead_at) WHERE status = 'DEAD';

-- A worker that stopped beating long ago (SIGKILL, a lost host) gets an end: the pruner
-- marks it 'lost', which no stale-worker verdict counts, and deletes it later like an
-- exited one.
ALTER TABLE core.workers DROP CONSTRAINT workers_state_check;
ALTER TABLE core.workers ADD CONSTRAINT workers_state_check
    CHECK (state IN ('running', 'reconnecting', 'exited', 'lost'));
CREATE INDEX workers_last_seen_idx ON core.workers (last_seen);

-- One row per prune pass, whichever worker ran it: the schedule shared by every worker
-- of the database (one pass at a time, one per interval) and what each pass deleted.
CREATE TABLE core.prune_passes (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    worker_id   text        NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at timestamptz,
    pruned      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    errors      jsonb       NOT NULL DEFAULT '[]'::jsonb
);
CREATE INDEX prune_passes_started_idx ON core.prune_passes (started_at DESC);
CREATE INDEX reconcile_passes_unfinished_idx ON core.reconcile_passes (started_at)
    WHERE finished_at IS NULL;
CREATE INDEX generation_handovers_at_idx ON core.generation_handovers (at);

-- Autovacuum for queue tables. The defaults (vacuum at 20 % dead rows, analyze at 10 %)
-- wait for millions of dead tuples on a table of millions of rows; every claim and
-- acknowledgement leaves one, and the pruner's deletes leave the rest. Vacuum after
-- 10,000 dead rows plus 1 % of the table, without cost-based sleeping, so dead tuples
-- stay a small multiple of the backlog; analyze often enough that the statistics follow
-- a table whose size swings by the backlog. Inserts trigger a vacuum too (visibility
-- map for index-only counts of the backlog).
ALTER TABLE core.outbox SET (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 10000,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_vacuum_insert_threshold = 10000,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_analyze_threshold = 10000,
    autovacuum_vacuum_cost_delay = 0
);
ALTER TABLE core.event_handled SET (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 10000,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_vacuum_insert_threshold = 10000,
    autovacuum_analyze_scale_factor = 0.05,
    autovacuum_vacuum_cost_delay = 0
);
