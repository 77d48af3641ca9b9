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

-- name: begin_rollout
-- $1 generation, $2 target, $3 old process (pid or container), returns the rollout id.
INSERT INTO core.rollouts (generation, target, old_process) VALUES ($1, $2, $3)
RETURNING id;

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

-- name: latest_rollouts
SELECT id, generation, target, status, reason, new_process, old_process, started_at, finished_at
FROM core.rollouts ORDER BY id DESC LIMIT $1;
