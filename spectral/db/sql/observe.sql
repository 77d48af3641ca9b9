-- Read-only views for operators: /queue, /metrics, /ready and `spectral inspect`.

-- name: workers_by_generation
-- Workers by generation and state, with the most recent beat and how many are stale.
-- $1 seconds without a beat after which a non-exited worker is stale.
SELECT generation, state, count(*) AS n, max(last_seen) AS most_recent_beat,
       count(*) FILTER (WHERE state <> 'exited'
                        AND last_seen < clock_timestamp() - make_interval(secs => $1)) AS stale
FROM core.workers
GROUP BY generation, state
ORDER BY generation DESC, state;

-- name: deployed_at
-- When generation $1 was deployed (NULL when unknown).
SELECT deployed_at FROM core.deployments WHERE generation = $1;

-- name: schema_version
-- The newest applied migration.
SELECT coalesce(max(version), 0) FROM core.schema_migrations;
