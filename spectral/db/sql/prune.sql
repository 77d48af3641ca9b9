-- The pruner's queries: retention of finished rows and bookkeeping, in bounded batches.
-- A row is deleted only while it is locked by the deleting statement and still DONE or
-- DEAD, so a requeue racing the pruner either wins (the row is PENDING again and kept)
-- or waits and finds nothing; a ledger row goes only with its outbox row, in the same
-- statement, so no event that can still be delivered loses its ledger.

-- name: try_lock
-- Serialises the start of prune passes across workers until the end of the transaction.
SELECT pg_try_advisory_xact_lock(7089812386431062139);

-- name: begin_pass
-- Start a pass unless one started less than $2 seconds ago or one is still running
-- (unfinished and started less than $3 seconds ago: a pass never runs longer). After
-- try_lock, in the same transaction. $1 worker_id. Returns the pass id.
INSERT INTO core.prune_passes (worker_id)
SELECT $1
WHERE NOT EXISTS (
    SELECT 1 FROM core.prune_passes
    WHERE started_at > clock_timestamp() - make_interval(secs => $2)
       OR (finished_at IS NULL AND started_at > clock_timestamp() - make_interval(secs => $3))
)
RETURNING id;

-- name: finish_pass
-- $1 id, $2 rows pruned per kind (jsonb), $3 errors (jsonb).
UPDATE core.prune_passes
SET finished_at = clock_timestamp(), pruned = $2::jsonb, errors = $3::jsonb
WHERE id = $1;

-- name: last_pass
-- The newest pass that finished, and when the newest pass started.
SELECT id, worker_id, started_at, finished_at, pruned, errors
FROM core.prune_passes
WHERE finished_at IS NOT NULL
ORDER BY started_at DESC
LIMIT 1;

-- name: done
-- Delete up to $2 DONE rows acknowledged more than $1 seconds ago, oldest first, with
-- their ledger rows. Returns (outbox rows, ledger rows) deleted.
WITH doomed AS (
    SELECT id FROM core.outbox
    WHERE status = 'DONE' AND done_at < now() - make_interval(secs => $1)
    ORDER BY done_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), ledger AS (
    DELETE FROM core.event_handled AS h USING doomed WHERE h.event_id = doomed.id
    RETURNING 1
), gone AS (
    DELETE FROM core.outbox AS o USING doomed WHERE o.id = doomed.id AND o.status = 'DONE'
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone) AS rows, (SELECT count(*) FROM ledger) AS ledger;

-- name: dead
-- Delete up to $2 DEAD rows that became DEAD more than $1 seconds ago, oldest first,
-- with their ledger rows. Returns (outbox rows, ledger rows) deleted.
WITH doomed AS (
    SELECT id FROM core.outbox
    WHERE status = 'DEAD' AND dead_at < now() - make_interval(secs => $1)
    ORDER BY dead_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), ledger AS (
    DELETE FROM core.event_handled AS h USING doomed WHERE h.event_id = doomed.id
    RETURNING 1
), gone AS (
    DELETE FROM core.outbox AS o USING doomed WHERE o.id = doomed.id AND o.status = 'DEAD'
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone) AS rows, (SELECT count(*) FROM ledger) AS ledger;

-- name: mark_lost
-- Workers not exited that have not beaten for $1 seconds become 'lost' (killed without
-- a drain). A worker that comes back overwrites the state with its next beat.
UPDATE core.workers SET state = 'lost'
WHERE state IN ('running', 'reconnecting')
  AND last_seen < clock_timestamp() - make_interval(secs => $1)
RETURNING worker_id, generation;

-- name: workers
-- Delete up to $2 workers' rows exited or lost more than $1 seconds ago (last beat).
DELETE FROM core.workers
WHERE worker_id IN (
    SELECT worker_id FROM core.workers
    WHERE state IN ('exited', 'lost')
      AND last_seen < clock_timestamp() - make_interval(secs => $1)
    LIMIT $2
)
RETURNING 1;

-- name: reconcile_passes
-- Delete up to $2 reconcile passes started more than $1 seconds ago; the newest stays.
DELETE FROM core.reconcile_passes
WHERE id IN (
    SELECT id FROM core.reconcile_passes
    WHERE started_at < clock_timestamp() - make_interval(secs => $1)
      AND id < (SELECT max(id) FROM core.reconcile_passes)
    ORDER BY started_at
    LIMIT $2
)
RETURNING 1;

-- name: prune_passes
-- Delete up to $2 prune passes started more than $1 seconds ago; the newest stays.
DELETE FROM core.prune_passes
WHERE id IN (
    SELECT id FROM core.prune_passes
    WHERE started_at < clock_timestamp() - make_interval(secs => $1)
      AND id < (SELECT max(id) FROM core.prune_passes)
    ORDER BY started_at
    LIMIT $2
)
RETURNING 1;

-- name: handovers
-- Delete up to $2 generation hand-over records older than $1 seconds.
DELETE FROM core.generation_handovers
WHERE id IN (
    SELECT id FROM core.generation_handovers
    WHERE at < clock_timestamp() - make_interval(secs => $1)
    ORDER BY at
    LIMIT $2
)
RETURNING 1;

-- name: would_prune
-- What a pass would delete now (spectral prune --dry-run): outbox rows counted up to $6
-- (their ledger rows go with them), the rest exactly. $1 DONE retention s, $2 DEAD
-- retention s, $3 workers' retention s, $4 records' retention s, $5 lost-after s.
SELECT
    (SELECT count(*) FROM (SELECT 1 FROM core.outbox
        WHERE status = 'DONE' AND done_at < now() - make_interval(secs => $1) LIMIT $6) AS x)
        AS done,
    (SELECT count(*) FROM (SELECT 1 FROM core.outbox
        WHERE status = 'DEAD' AND dead_at < now() - make_interval(secs => $2) LIMIT $6) AS x)
        AS dead,
    (SELECT count(*) FROM core.workers
        WHERE state IN ('exited', 'lost')
          AND last_seen < clock_timestamp() - make_interval(secs => $3)) AS workers,
    (SELECT count(*) FROM core.workers
        WHERE state IN ('running', 'reconnecting')
          AND last_seen < clock_timestamp() - make_interval(secs => $5)) AS lost,
    (SELECT count(*) FROM core.reconcile_passes
        WHERE started_at < clock_timestamp() - make_interval(secs => $4)
          AND id < (SELECT max(id) FROM core.reconcile_passes)) AS reconcile_passes,
    (SELECT count(*) FROM core.prune_passes
        WHERE started_at < clock_timestamp() - make_interval(secs => $4)
          AND id < (SELECT max(id) FROM core.prune_passes)) AS prune_passes,
    (SELECT count(*) FROM core.generation_handovers
        WHERE at < clock_timestamp() - make_interval(secs => $4)) AS handovers;
