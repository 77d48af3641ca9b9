-- Queries on core.outbox and core.event_handled used by the workers.
-- Every change to a claimed row is fenced by its claim token: a worker whose claim was
-- reaped or released changes nothing.

-- name: claim
-- Claim up to $2 due PENDING rows of generation $1 for worker $3 for $4 seconds.
-- $1 generation, $2 limit, $3 worker_id, $4 ttl seconds.
-- Returns the rows and, for each, the handlers that already committed (fan-out retries).
-- Due rows go in (available_at, id) order from outbox_due_idx, the one index with that
-- order, so the plan holds whatever the statistics say. A first attempt skips the ledger
-- lookup; a row released at a drain deadline (attempts still 0) may then run a handler
-- that already committed, whose ledger insert finds the row and applies nothing.
WITH picked AS (
    SELECT id FROM core.outbox
    WHERE generation = $1 AND status = 'PENDING' AND deleted_at IS NULL
      AND available_at <= now()
    ORDER BY available_at, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE core.outbox AS o
SET status = 'CLAIMED', claimed_by = $3, claim_token = gen_random_uuid(),
    claim_expires_at = now() + make_interval(secs => $4), updated_at = now()
FROM picked
WHERE o.id = picked.id
RETURNING o.id, o.topic, o.payload::text AS payload, o.generation, o.attempts, o.created_at,
          o.claim_token,
          extract(epoch FROM clock_timestamp() - o.available_at)::float8 AS wait_seconds,
          CASE WHEN o.attempts = 0 THEN '{}'::text[]
               ELSE ARRAY(SELECT h.handler FROM core.event_handled AS h WHERE h.event_id = o.id)
          END AS handled;

-- name: record_handled
-- Ledger rows for handlers that succeeded without opening a transaction.
-- $1 handler names, $2 event ids (same length).
INSERT INTO core.event_handled (handler, event_id)
SELECT * FROM unnest($1::text[], $2::bigint[])
ON CONFLICT DO NOTHING;

-- name: ack
-- Mark claimed rows DONE. $1 ids, $2 claim tokens. Returns the ids that matched.
UPDATE core.outbox AS o
SET status = 'DONE', done_at = now(), updated_at = now(),
    claim_token = NULL, claim_expires_at = NULL
FROM unnest($1::bigint[], $2::uuid[]) AS a(id, token)
WHERE o.id = a.id AND o.claim_token = a.token
RETURNING o.id;

-- name: ack_with_ledger
-- A batch of successes in one statement: the ledger rows of handlers that opened no
-- transaction, and the acknowledgements. $1 ids, $2 claim tokens, $3 handler names,
-- $4 their event ids. Returns the acknowledged ids.
WITH ledger AS (
    INSERT INTO core.event_handled (handler, event_id)
    SELECT * FROM unnest($3::text[], $4::bigint[])
    ON CONFLICT DO NOTHING
)
UPDATE core.outbox AS o
SET status = 'DONE', done_at = now(), updated_at = now(),
    claim_token = NULL, claim_expires_at = NULL
FROM unnest($1::bigint[], $2::uuid[]) AS a(id, token)
WHERE o.id = a.id AND o.claim_token = a.token
RETURNING o.id;

-- name: fail
-- A failed turn: retry after a delay, or DEAD with a reason. Charges one attempt.
-- $1 ids, $2 tokens, $3 delay seconds, $4 last errors, $5 dead flags, $6 dead reasons.
UPDATE core.outbox AS o
SET status = CASE WHEN f.dead THEN 'DEAD' ELSE 'PENDING' END,
    attempts = o.attempts + 1,
    available_at = CASE WHEN f.dead THEN o.available_at
                        ELSE now() + make_interval(secs => f.delay) END,
    last_error = f.error,
    dead_reason = CASE WHEN f.dead THEN f.reason END,
    claim_token = NULL, claim_expires_at = NULL, updated_at = now()
FROM unnest($1::bigint[], $2::uuid[], $3::float8[], $4::text[], $5::bool[], $6::text[])
     AS f(id, token, delay, error, dead, reason)
WHERE o.id = f.id AND o.claim_token = f.token
RETURNING o.id;

-- name: release
-- Give claimed rows back as PENDING now. $3 says whether the release costs an attempt
-- (a turn cut off by the drain deadline does not; one that never started does not).
-- $1 ids, $2 tokens, $3 charge flags, $4 errors (NULL keeps the previous one).
UPDATE core.outbox AS o
SET status = 'PENDING',
    attempts = o.attempts + CASE WHEN r.charge THEN 1 ELSE 0 END,
    last_error = coalesce(r.error, o.last_error),
    claim_token = NULL, claim_expires_at = NULL, updated_at = now()
FROM unnest($1::bigint[], $2::uuid[], $3::bool[], $4::text[]) AS r(id, token, charge, error)
WHERE o.id = r.id AND o.claim_token = r.token
RETURNING o.id;

-- name: reap
-- Return up to $1 rows whose claim lapsed to PENDING, charging an attempt. Rows whose
-- turn transaction is still open are locked by it and skipped (the worker is alive).
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
FROM lapsed
WHERE o.id = lapsed.id
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
    updated_at = now()
WHERE id = ANY($1::bigint[]) AND status = 'DEAD' AND deleted_at IS NULL
RETURNING id;

-- name: requeue_topic
-- Put every DEAD row of topic $1 back to PENDING. Optional $2 moves them to generation $2.
UPDATE core.outbox
SET status = 'PENDING', attempts = 0, available_at = now(), dead_reason = NULL,
    generation = coalesce($2, generation), updated_at = now()
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
       done_at, deleted_at
FROM core.outbox WHERE id = $1;

-- name: requeue_retired
-- Move the PENDING rows of retired generation $1 into generation $2 (rows kept by the
-- 'keep' retire policy, or any hand-over done by hand). Returns the moved ids.
UPDATE core.outbox AS o
SET generation = $2, available_at = now(), updated_at = now()
FROM core.deployments AS d
WHERE d.generation = o.generation AND d.generation = $1 AND d.retired_at IS NOT NULL
  AND o.status = 'PENDING' AND o.deleted_at IS NULL
RETURNING o.id;
