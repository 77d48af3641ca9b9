-- Queries on core.outbox and core.event_handled used by the workers.
-- Every change to a claimed row is fenced by its claim token: a worker whose claim was
-- reaped or released changes nothing.

-- name: claim
-- Claim up to $2 due PENDING rows of generation $1 for worker $3 for $4 seconds.
-- $1 generation, $2 limit, $3 worker_id, $4 ttl seconds.
-- Returns the rows and, for each, the handlers that already committed: read for every row
-- claimed before (claims > 1 after this claim), whatever brought it back (retry, requeue,
-- drain release, reaper, reconciler, hand-over); a row's first claim skips the read, as no
-- handler can have run for it yet. Due rows go in (available_at, id) order from
-- outbox_due_idx, the one index with that order, so the plan holds whatever the
-- statistics say; the picked ids reach the rows as an array through the primary key
-- (a join with the CTE is hashed against the whole table once the statistics show a
-- large backlog: tests/integration/test_plans.py).
-- A keyed row is taken only when it is its key's head: no earlier row of the key, in any
-- generation, is unfinished or DEAD-and-not-skipped (outbox_key_held_idx), and no row of
-- the key is claimed. The EXISTS below finds waiting rows cheaply in the statement's
-- snapshot, and core.park_waiting parks them (available_at 'infinity', beyond this range
-- scan; a trigger puts a key's next row back when the key moves on: migration 0010), so a
-- waiting row costs one look, not one per claim. For the others, core.claim_key_free takes
-- the key's advisory lock and checks again in a fresh snapshot, so concurrent claimers
-- never both take rows of one key.
WITH picked AS (
    SELECT o.id FROM core.outbox AS o
    WHERE o.generation = $1 AND o.status = 'PENDING' AND o.deleted_at IS NULL
      AND o.available_at <= now()
      AND (o.key IS NULL
           OR CASE WHEN EXISTS (
                       SELECT 1 FROM core.outbox AS p
                       WHERE p.key = o.key AND p.id < o.id AND p.deleted_at IS NULL
                         AND (p.status IN ('PENDING', 'CLAIMED')
                              OR (p.status = 'DEAD' AND p.skipped_at IS NULL)))
                   THEN core.park_waiting(o.key, o.id)
                   ELSE core.claim_key_free(o.key, o.id) END)
    ORDER BY o.available_at, o.id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE core.outbox AS o
SET status = 'CLAIMED', claimed_by = $3, claim_token = gen_random_uuid(),
    claim_expires_at = now() + make_interval(secs => $4), claims = o.claims + 1,
    updated_at = now()
WHERE o.id = ANY (ARRAY(SELECT id FROM picked))
RETURNING o.id, o.topic, o.payload::text AS payload, o.generation, o.attempts, o.created_at,
          o.claim_token, o.key, o.traceparent,
          extract(epoch FROM clock_timestamp() - o.available_at)::float8 AS wait_seconds,
          extract(epoch FROM o.created_at)::float8 AS created_epoch,
          CASE WHEN o.claims = 1 THEN '{}'::text[]
               ELSE ARRAY(SELECT h.handler FROM core.event_handled AS h WHERE h.event_id = o.id)
          END AS handled;

-- name: settle
-- A batch of turn outcomes in one statement: acknowledgements, failures and releases,
-- each fenced by its claim token, and the ledger rows of handlers that succeeded without
-- opening a transaction, inserted only for rows whose fenced change matched (a worker
-- that lost its claim writes no ledger row). Returns (kind, id) for every row changed:
-- 'a' acknowledged, 'f' failed, 'r' released; ids missing had lost their claim.
-- Acks: $1 ids, $2 tokens.
-- Failures (charge one attempt; retry after a delay or DEAD with a reason): $3 ids,
--   $4 tokens, $5 delay seconds, $6 last errors, $7 dead flags, $8 dead reasons,
--   $15 skip flags (a DEAD row with its flag set lets its key move on: skipped_at).
-- Releases (PENDING now; $11 says whether it costs an attempt: a turn cut off by the drain
--   deadline does not): $9 ids, $10 tokens, $11 charge flags, $12 errors (NULL keeps the
--   previous one).
-- Ledger: $13 handler names, $14 their event ids.
WITH acked AS (
    UPDATE core.outbox AS o
    SET status = 'DONE', done_at = now(), updated_at = now(),
        claim_token = NULL, claim_expires_at = NULL
    FROM unnest($1::bigint[], $2::uuid[]) AS a(id, token)
    WHERE o.id = a.id AND o.claim_token = a.token
    RETURNING o.id
), failed AS (
    UPDATE core.outbox AS o
    SET status = CASE WHEN f.dead THEN 'DEAD' ELSE 'PENDING' END,
        attempts = o.attempts + 1,
        available_at = CASE WHEN f.dead THEN o.available_at
                            ELSE now() + make_interval(secs => f.delay) END,
        last_error = f.error,
        dead_reason = CASE WHEN f.dead THEN f.reason END,
        skipped_at = CASE WHEN f.dead AND f.skip THEN now() END,
        claim_token = NULL, claim_expires_at = NULL, updated_at = now()
    FROM unnest($3::bigint[], $4::uuid[], $5::float8[], $6::text[], $7::bool[], $8::text[],
                $15::bool[])
         AS f(id, token, delay, error, dead, reason, skip)
    WHERE o.id = f.id AND o.claim_token = f.token
    RETURNING o.id
), released AS (
    UPDATE core.outbox AS o
    SET status = 'PENDING',
        attempts = o.attempts + CASE WHEN r.charge THEN 1 ELSE 0 END,
        last_error = coalesce(r.error, o.last_error),
        claim_token = NULL, claim_expires_at = NULL, updated_at = now()
    FROM unnest($9::bigint[], $10::uuid[], $11::bool[], $12::text[]) AS r(id, token, charge, error)
    WHERE o.id = r.id AND o.claim_token = r.token
    RETURNING o.id
), ledger AS (
    INSERT INTO core.event_handled (handler, event_id)
    SELECT l.handler, l.event_id
    FROM unnest($13::text[], $14::bigint[]) AS l(handler, event_id)
    WHERE l.event_id IN (SELECT id FROM acked UNION ALL SELECT id FROM failed
                         UNION ALL SELECT id FROM released)
    ON CONFLICT DO NOTHING
)
SELECT 'a' AS kind, id FROM acked
UNION ALL SELECT 'f', id FROM failed
UNION ALL SELECT 'r', id FROM released;

-- name: reap
-- Return up to $1 rows whose claim lapsed to PENDING, charging an attempt. Rows whose
-- turn transaction is still open are locked by it and skipped (the worker is alive).
-- The lapsed ids reach the rows through the primary key, as in the claim.
WITH lapsed AS (
    SELECT id FROM core.outbox
    WHERE status = 'CLAIMED' AND claim_expires_at < now()
    ORDER BY claim_expires_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE core.outbox AS o
SET status = 'PENDING', attempts = o.attempts + 1,
    last_error = 'claim expired: worker ' || coalesce(o.claimed_by, '?') || ' did not acknowledge',
    claim_token = NULL, claim_expires_at = NULL, updated_at = now()
WHERE o.id = ANY (ARRAY(SELECT id FROM lapsed))
RETURNING o.id, o.generation, o.claimed_by;

-- name: turn_begin
-- First statement of a handler's transaction: the row must still be claimed by us.
-- KEY SHARE keeps the reaper (FOR UPDATE SKIP LOCKED) off the row while the turn runs
-- without blocking sibling handlers or the acknowledgement. $1 id, $2 token.
SELECT 1 FROM core.outbox
WHERE id = $1 AND claim_token = $2 AND status = 'CLAIMED'
FOR KEY SHARE;

-- name: turn_local
-- Set for the rest of a turn's transaction, after the claim check and the ledger row and
-- before the handler's first statement: behind a pooler the idle-in-transaction bound
-- ($1 ms; it cannot be a startup parameter there), and the handler role ($2), so the
-- handler's SQL runs with that role's privileges. '' leaves a setting alone.
SELECT CASE WHEN $1::text <> '' THEN set_config('idle_in_transaction_session_timeout', $1, true) END,
       CASE WHEN $2::text <> '' THEN set_config('role', $2, true) END;

-- name: turn_ledger
-- The ledger row that makes the handler's effects happen once. A concurrent insert of
-- the same key waits for the other transaction; a committed one returns no row.
-- $1 handler, $2 event id.
INSERT INTO core.event_handled (handler, event_id) VALUES ($1, $2)
ON CONFLICT DO NOTHING
RETURNING 1;

-- name: requeue_ids
-- Put DEAD rows back to PENDING, due now, with a fresh attempt count. $1 ids.
UPDATE core.outbox
SET status = 'PENDING', attempts = 0, available_at = now(), dead_reason = NULL,
    skipped_at = NULL, updated_at = now()
WHERE id = ANY($1::bigint[]) AND status = 'DEAD' AND deleted_at IS NULL
RETURNING id;

-- name: requeue_topic
-- Put every DEAD row of topic $1 back to PENDING. Optional $2 moves them to generation $2.
UPDATE core.outbox
SET status = 'PENDING', attempts = 0, available_at = now(), dead_reason = NULL,
    skipped_at = NULL, generation = coalesce($2, generation), updated_at = now()
WHERE topic = $1 AND status = 'DEAD' AND deleted_at IS NULL
RETURNING id;

-- name: counts
-- Outbox rows by generation and status, soft-deleted rows left out.
SELECT generation, status, count(*) AS n
FROM core.outbox
WHERE deleted_at IS NULL
GROUP BY generation, status
ORDER BY generation DESC, status;

-- name: get_event
-- One row by id, for operators and tests.
SELECT id, generation, topic, payload::text AS payload, status, attempts, available_at,
       claimed_by, claim_token, claim_expires_at, last_error, dead_reason, created_at,
       done_at, deleted_at, key, idempotency_key, traceparent, skipped_at
FROM core.outbox WHERE id = $1;

-- name: skip_ids
-- Let the keys of DEAD rows $1 move on: the rows stay DEAD (and can still be requeued)
-- but no longer hold their key. Returns the ids changed.
UPDATE core.outbox
SET skipped_at = now(), updated_at = now()
WHERE id = ANY($1::bigint[]) AND status = 'DEAD' AND skipped_at IS NULL AND deleted_at IS NULL
RETURNING id;

-- name: blocked_keys
-- Keys held by a DEAD row (not skipped): the key, its head event, and how many of the
-- key's events wait behind it. Up to $1 keys, oldest head first.
SELECT d.key, d.id AS head_id, d.topic, d.generation, d.dead_reason,
       (SELECT count(*) FROM core.outbox AS w
        WHERE w.key = d.key AND w.id > d.id AND w.deleted_at IS NULL
          AND (w.status IN ('PENDING', 'CLAIMED')
               OR (w.status = 'DEAD' AND w.skipped_at IS NULL)))::bigint AS waiting
FROM core.outbox AS d
WHERE d.key IS NOT NULL AND d.status = 'DEAD' AND d.skipped_at IS NULL AND d.deleted_at IS NULL
  AND NOT EXISTS (
      SELECT 1 FROM core.outbox AS e
      WHERE e.key = d.key AND e.id < d.id AND e.deleted_at IS NULL
        AND (e.status IN ('PENDING', 'CLAIMED') OR (e.status = 'DEAD' AND e.skipped_at IS NULL)))
ORDER BY d.id
LIMIT $1;

-- name: blocked_key_count
-- How many keys a DEAD row (not skipped) holds.
SELECT count(DISTINCT key)::bigint FROM core.outbox
WHERE key IS NOT NULL AND status = 'DEAD' AND skipped_at IS NULL AND deleted_at IS NULL;

-- name: requeue_retired
-- Move the PENDING rows of retired generation $1 into generation $2 (rows kept by the
-- 'keep' retire policy, or any hand-over done by hand). Returns the moved ids.
UPDATE core.outbox AS o
SET generation = $2, available_at = now(), updated_at = now()
FROM core.deployments AS d
WHERE d.generation = o.generation AND d.generation = $1 AND d.retired_at IS NOT NULL
  AND o.status = 'PENDING' AND o.deleted_at IS NULL
RETURNING o.id;

-- name: oldest_due
-- For each generation with rows in service, how long its oldest due PENDING event has
-- waited (seconds; 0 when none is due). One index probe per generation (outbox_due_idx).
SELECT d.generation,
       coalesce(extract(epoch FROM now() - (
           SELECT o.available_at FROM core.outbox AS o
           WHERE o.generation = d.generation AND o.status = 'PENDING' AND o.deleted_at IS NULL
             AND o.available_at <= now()
           ORDER BY o.available_at LIMIT 1)), 0)::float8 AS age
FROM core.deployments AS d
WHERE d.retired_at IS NULL OR EXISTS (
    SELECT 1 FROM core.outbox AS r
    WHERE r.generation = d.generation AND r.status = 'PENDING' AND r.deleted_at IS NULL)
ORDER BY d.generation;
