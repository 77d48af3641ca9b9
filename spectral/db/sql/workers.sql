-- Worker registration and heartbeats (core.workers). Times come from the database clock.

-- name: register_worker
-- Register this process: $1 worker_id, $2 generation, $3 environment, $4 service,
-- $5 hostname, $6 pid, $7 state ('running', or 'reconnecting' after an outage),
-- $8 heartbeat interval in seconds.
INSERT INTO core.workers (worker_id, generation, environment, service, hostname, pid, state,
                          started_at, last_seen, heartbeat_seconds)
VALUES ($1, $2, $3, $4, $5, $6, $7, clock_timestamp(), clock_timestamp(), $8)
ON CONFLICT (worker_id) DO UPDATE
SET state = excluded.state, last_seen = clock_timestamp(), exited_at = NULL,
    heartbeat_seconds = excluded.heartbeat_seconds;

-- name: beat
-- Refresh last_seen and state ('running' or 'reconnecting'). $1 worker_id, $2 state.
UPDATE core.workers SET last_seen = clock_timestamp(), state = $2
WHERE worker_id = $1
RETURNING state;

-- name: mark_exited
-- The worker stopped cleanly. $1 worker_id.
UPDATE core.workers SET state = 'exited', last_seen = clock_timestamp(),
                        exited_at = clock_timestamp()
WHERE worker_id = $1;

-- name: list_workers
-- Every worker row, most recent beat first; $1 seconds after which a beat is stale.
SELECT worker_id, generation, environment, service, state, last_seen, started_at,
       (state NOT IN ('exited', 'lost')
        AND last_seen < clock_timestamp() - make_interval(secs => $1))
           AS stale
FROM core.workers
ORDER BY last_seen DESC;

-- name: can_set_role
-- Whether role $1 exists (NULL when not) and this session's role may SET ROLE to it.
SELECT CASE WHEN r.oid IS NULL THEN NULL ELSE pg_has_role(current_user, r.oid, 'MEMBER') END
FROM (SELECT 1) AS one LEFT JOIN pg_roles AS r ON r.rolname = $1;
