-- Deployment generations (core.deployments).

-- name: newest_generation
-- The newest generation in service (not retired or rolled back), or NULL.
SELECT max(generation) FROM core.deployments WHERE retired_at IS NULL;

-- name: generation_exists
-- Whether generation $1 was allocated.
SELECT EXISTS (SELECT 1 FROM core.deployments WHERE generation = $1);

-- name: allocate_generation
-- Allocate the next generation atomically. $1 reference, $2 deployed_by, $3 tag.
INSERT INTO core.deployments (reference, deployed_by, tag)
VALUES ($1, $2, $3)
RETURNING generation, reference, deployed_at, deployed_by, tag;

-- name: latest_deployments
-- The newest $1 deployments.
SELECT generation, reference, deployed_at, deployed_by, tag, retired_at
FROM core.deployments
ORDER BY generation DESC
LIMIT $1;

-- name: try_deploy_lock
-- The database-level deploy lock: one rollout at a time. Transaction-scoped, taken in a
-- transaction left open on a dedicated connection for the whole rollout: a session lock
-- would not survive a transaction pooler (the next statement may reach another session).
SELECT pg_try_advisory_xact_lock(7089812386431062138);

-- name: finish_rollout
-- $1 id, $2 status, $3 reason, $4 new process. A rolled-back generation is retired at once
-- (policy adopt): nothing new is stamped with it and its rows move to a live generation.
WITH finished AS (
    UPDATE core.rollouts SET status = $2, reason = $3, new_process = $4,
                             finished_at = clock_timestamp()
    WHERE id = $1
    RETURNING generation
)
UPDATE core.deployments AS d SET retired_at = clock_timestamp(), retire_policy = 'adopt'
FROM finished
WHERE d.generation = finished.generation AND $2 = 'rolled_back' AND d.retired_at IS NULL;

-- name: begin_record
-- A rollout with its deploy record's fields. $1 generation, $2 target, $3 old process,
-- $4 environment, $5 reference, $6 deployed_by, $7 staging evidence, $8 override reason.
INSERT INTO core.rollouts (generation, target, old_process, environment, reference, deployed_by,
                           staging_evidence, override_reason)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
RETURNING id, started_at;

-- name: finish_record
-- The verdict of rollout $1: $2 verdict, $3 checks (JSON array), $4 migrations applied
-- (JSON array). Returns the finish time.
UPDATE core.rollouts SET verdict = $2, checks = $3::jsonb, migrations_applied = $4::jsonb
WHERE id = $1
RETURNING finished_at;

-- name: record_refused
-- A rollout refused before anything started. $1 generation (may be NULL), $2 target,
-- $3 environment, $4 reference, $5 deployed_by, $6 reason, $7 checks (JSON array).
INSERT INTO core.rollouts (generation, target, environment, reference, deployed_by, status,
                           reason, verdict, checks, finished_at)
VALUES ($1, $2, $3, $4, $5, 'refused', $6, 'REFUSED', $7::jsonb, clock_timestamp())
RETURNING id, started_at, finished_at;

-- name: deploy_history
-- Deploy records, newest first; $1 environment (NULL: all), $2 limit.
SELECT id, environment, reference, generation, target, verdict, status, reason, checks::text AS checks,
       migrations_applied::text AS migrations_applied, deployed_by, staging_evidence,
       override_reason, new_process, old_process, started_at, finished_at
FROM core.rollouts
WHERE $1::text IS NULL OR environment = $1
ORDER BY id DESC
LIMIT $2;

-- name: staging_pass
-- The newest passed staging rollout of reference $1 (none: no row).
SELECT id, generation, finished_at, checks::text AS checks
FROM core.rollouts
WHERE environment = 'staging' AND reference = $1 AND verdict = 'SUCCESS'
ORDER BY id DESC
LIMIT 1;

-- name: migrations_since
-- Migrations applied after the previous rollout of rollout $1 began (all of them before
-- the first one); refused rollouts deployed nothing and do not count.
SELECT version, name FROM core.schema_migrations
WHERE applied_at > coalesce((SELECT max(started_at) FROM core.rollouts
                             WHERE id < $1 AND status <> 'refused'), '-infinity')
ORDER BY version;

-- name: generation_reference
-- The reference generation $1 was allocated for (NULL when unknown).
SELECT reference FROM core.deployments WHERE generation = $1;

-- name: in_flight
-- Pre-flight: work in progress outside generation $1 (NULL: every generation) by
-- generation: claimed rows, the oldest claim's age in seconds, and live workers
-- (a beat within $2 seconds, not exited).
WITH claimed AS (
    SELECT generation, count(*) AS claimed,
           extract(epoch FROM clock_timestamp() - min(updated_at))::float8 AS oldest_claim_seconds
    FROM core.outbox
    WHERE status = 'CLAIMED' AND ($1::bigint IS NULL OR generation <> $1)
    GROUP BY generation
), live AS (
    SELECT generation, count(*) AS live_workers FROM core.workers
    WHERE state <> 'exited' AND last_seen >= clock_timestamp() - make_interval(secs => $2)
      AND ($1::bigint IS NULL OR generation <> $1)
    GROUP BY generation
)
SELECT coalesce(c.generation, l.generation) AS generation, coalesce(c.claimed, 0) AS claimed,
       c.oldest_claim_seconds, coalesce(l.live_workers, 0) AS live_workers
FROM claimed AS c FULL JOIN live AS l ON l.generation = c.generation
ORDER BY 1;

-- name: rollout_record
-- One deploy record by id ($1), the columns of deploy_history.
SELECT id, environment, reference, generation, target, verdict, status, reason, checks::text AS checks,
       migrations_applied::text AS migrations_applied, deployed_by, staging_evidence,
       override_reason, new_process, old_process, started_at, finished_at
FROM core.rollouts
WHERE id = $1;
