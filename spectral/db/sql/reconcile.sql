-- The reconciler's sweeps. Each re-derives what is stuck from the database alone, so a
-- reconciler started fresh (or on another worker) finds the same work.

-- name: try_lock
-- Serialises the start of passes across workers until the end of the transaction.
SELECT pg_try_advisory_xact_lock(7089812386431062137);

-- name: begin_pass
-- Start a pass unless one started less than $3 seconds ago (after try_lock, in the same
-- transaction, so the check sees every committed pass). $1 worker_id, $2 generation.
-- Returns the pass id and the database's cutoff clock.
INSERT INTO core.reconcile_passes (worker_id, generation)
SELECT $1, $2
WHERE NOT EXISTS (
    SELECT 1 FROM core.reconcile_passes
    WHERE started_at > clock_timestamp() - make_interval(secs => $3)
)
RETURNING id, started_at;

-- name: finish_pass
-- $1 id, $2 unblocked per sweep (jsonb), $3 errors (jsonb).
UPDATE core.reconcile_passes
SET finished_at = clock_timestamp(), unblocked = $2::jsonb, errors = $3::jsonb
WHERE id = $1;

-- name: last_pass
SELECT id, worker_id, generation, started_at, finished_at, unblocked, errors
FROM core.reconcile_passes
ORDER BY started_at DESC
LIMIT 1;

-- name: lost_wakeups
-- Due PENDING rows older than the grace ($1 s) in generations with a live worker (a beat
-- within $2 s): wake that generation's claimers with a NOTIFY. Returns rows per generation.
SELECT s.generation, s.n, pg_notify('spectral_outbox_v1', s.generation::text) IS NOT NULL AS woken
FROM (
    SELECT o.generation, count(*) AS n
    FROM core.outbox AS o
    WHERE o.status = 'PENDING' AND o.deleted_at IS NULL
      AND o.available_at < now() - make_interval(secs => $1)
      AND EXISTS (
          SELECT 1 FROM core.workers AS w
          WHERE w.generation = o.generation AND w.state <> 'exited'
            AND w.last_seen >= clock_timestamp() - make_interval(secs => $2))
    GROUP BY o.generation
) AS s;

-- name: orphaned_claims
-- Release CLAIMED rows whose worker exited, is unknown, or has not beaten for two of its
-- own heartbeat intervals ($1 s for workers that did not record theirs), without waiting
-- for the claim TTL. Safe because a worker fences itself (stops claiming, cancels its
-- turns) after one and a half intervals without a beat. Fenced by the token read under
-- the row lock; rows locked by a live turn's transaction are skipped. Charges an attempt,
-- like the reaper.
WITH orphans AS (
    SELECT o.id, o.claim_token
    FROM core.outbox AS o
    LEFT JOIN core.workers AS w ON w.worker_id = o.claimed_by
    WHERE o.status = 'CLAIMED'
      AND (w.worker_id IS NULL OR w.state IN ('exited', 'lost')
           OR w.last_seen < clock_timestamp()
                            - make_interval(secs => coalesce(2 * w.heartbeat_seconds, $1)))
    ORDER BY o.id
    LIMIT 1000
    FOR UPDATE OF o SKIP LOCKED
)
UPDATE core.outbox AS o
SET status = 'PENDING', attempts = o.attempts + 1,
    last_error = 'released by the reconciler: worker ' || coalesce(o.claimed_by, '?') || ' is gone',
    claim_token = NULL, claim_expires_at = NULL, updated_at = now()
FROM orphans
WHERE o.id = orphans.id AND o.claim_token = orphans.claim_token AND o.status = 'CLAIMED'
RETURNING o.id, o.generation, o.claimed_by;

-- name: parked_heads
-- The safety net under key parking (migration 0010): put back every parked row that is
-- its key's head (no earlier row holds the key), which the unpark trigger should already
-- have done, marked as rows may be parked behind it. Parked rows sit at available_at
-- 'infinity' in outbox_due_idx: one range probe per generation, one key probe per parked
-- row. Returns (id, generation) of the rows.
UPDATE core.outbox AS o
SET available_at = o.created_at, key_waiters = true, updated_at = now()
FROM core.deployments AS d
WHERE o.generation = d.generation AND o.status = 'PENDING' AND o.deleted_at IS NULL
  AND o.available_at = 'infinity' AND o.key IS NOT NULL
  AND NOT EXISTS (
      SELECT 1 FROM core.outbox AS p
      WHERE p.key = o.key AND p.id < o.id AND p.deleted_at IS NULL
        AND (p.status IN ('PENDING', 'CLAIMED') OR (p.status = 'DEAD' AND p.skipped_at IS NULL)))
RETURNING o.id, o.generation;

-- name: newest_live_generation
-- The newest generation with a live worker (a beat within $1 s), or NULL.
SELECT max(generation) FROM core.workers
WHERE state <> 'exited' AND last_seen >= clock_timestamp() - make_interval(secs => $1);

-- name: retire_generations
-- Mark retired every generation older than the newest live one ($3) that has no live
-- worker and whose last sign of life (its last beat, or the next deployment) is older
-- than the grace ($1 s). $2 stale seconds, $4 policy. Returns the generations retired.
UPDATE core.deployments AS d
SET retired_at = clock_timestamp(), retire_policy = $4
WHERE d.retired_at IS NULL
  AND d.generation < $3
  AND NOT EXISTS (
      SELECT 1 FROM core.workers AS w
      WHERE w.generation = d.generation AND w.state <> 'exited'
        AND w.last_seen >= clock_timestamp() - make_interval(secs => $2))
  AND greatest(
        (SELECT max(w.last_seen) FROM core.workers AS w WHERE w.generation = d.generation),
        (SELECT min(n.deployed_at) FROM core.deployments AS n WHERE n.generation > d.generation)
      ) < clock_timestamp() - make_interval(secs => $1)
RETURNING d.generation;

-- name: adopt_retired
-- Move PENDING rows of generations retired with policy 'adopt' into generation $1.
UPDATE core.outbox AS o
SET generation = $1, updated_at = now()
FROM core.deployments AS d
WHERE d.generation = o.generation AND d.retired_at IS NOT NULL AND d.retire_policy = 'adopt'
  AND o.status = 'PENDING' AND o.deleted_at IS NULL AND o.generation <> $1
RETURNING o.id, d.generation AS from_generation;

-- name: dead_retired
-- Dead-letter PENDING rows of generations retired with policy 'dead'. Returns the rows.
UPDATE core.outbox AS o
SET status = 'DEAD', dead_reason = 'generation ' || o.generation || ' retired',
    updated_at = now()
FROM core.deployments AS d
WHERE d.generation = o.generation AND d.retired_at IS NOT NULL AND d.retire_policy = 'dead'
  AND o.status = 'PENDING' AND o.deleted_at IS NULL
RETURNING o.id, d.generation AS from_generation;

-- name: record_handover
-- $1 from generation, $2 to generation (NULL for dead/keep), $3 policy, $4 rows.
INSERT INTO core.generation_handovers (from_generation, to_generation, policy, rows)
VALUES ($1, $2, $3, $4);

-- name: stale_workers
-- Workers that are not exited and have not beaten for $1 s (left in place for operators;
-- the pruner marks them 'lost' after SPECTRAL_WORKER_LOST_AFTER).
SELECT worker_id, generation, last_seen FROM core.workers
WHERE state NOT IN ('exited', 'lost') AND last_seen < clock_timestamp() - make_interval(secs => $1);
