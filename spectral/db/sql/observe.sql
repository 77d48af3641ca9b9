-- Read-only views for operators: /queue, /metrics, /ready and `spectral inspect`.

-- name: workers_by_generation
-- Workers by generation and state, with the most recent beat and how many are stale.
-- $1 seconds without a beat after which a running or reconnecting worker is stale.
SELECT generation, state, count(*) AS n, max(last_seen) AS most_recent_beat,
       count(*) FILTER (WHERE state NOT IN ('exited', 'lost')
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

-- name: live_counts
-- The unfinished rows by generation and status, read from the partial indexes of PENDING,
-- CLAIMED and DEAD rows only: the cost follows the backlog, never the history. DEAD rows
-- are counted up to $1 (the pruner keeps them bounded; "capped" says when the cap hit).
SELECT generation, status, count(*) AS n
FROM (
    SELECT generation, status FROM core.outbox
    WHERE status = 'PENDING' AND deleted_at IS NULL
    UNION ALL
    SELECT generation, status FROM core.outbox WHERE status = 'CLAIMED'
    UNION ALL
    (SELECT generation, status FROM core.outbox
     WHERE status = 'DEAD' AND deleted_at IS NULL LIMIT $1)
) AS live
GROUP BY generation, status
ORDER BY generation DESC, status;

-- name: table_health
-- What kills queue tables, from the statistics views (no table is read): live and dead
-- tuples, size, the last (auto)vacuum and analyze of core.outbox and core.event_handled.
SELECT c.relname AS "table",
       coalesce(s.n_live_tup, 0) AS live_tuples,
       coalesce(s.n_dead_tup, 0) AS dead_tuples,
       pg_total_relation_size(c.oid) AS total_bytes,
       greatest(s.last_vacuum, s.last_autovacuum) AS last_vacuum,
       greatest(s.last_analyze, s.last_autoanalyze) AS last_analyze
FROM pg_class AS c
JOIN pg_namespace AS n ON n.oid = c.relnamespace AND n.nspname = 'core'
LEFT JOIN pg_stat_user_tables AS s ON s.relid = c.oid
WHERE c.relname IN ('outbox', 'event_handled') AND c.relkind = 'r'
ORDER BY c.relname;

-- name: xmin_horizon
-- What holds back vacuum of this database's tables: the oldest transaction of another
-- session of this database (its age in seconds and in transaction ids, its pid, state
-- and application), the oldest replication slot's xmin and prepared transaction.
-- Sessions of other databases do not hold back this database's tables.
SELECT
    (SELECT extract(epoch FROM clock_timestamp() - a.xact_start)::float8
     FROM pg_stat_activity AS a
     WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()
       AND (a.backend_xmin IS NOT NULL OR a.backend_xid IS NOT NULL)
     ORDER BY a.xact_start LIMIT 1) AS oldest_xact_seconds,
    (SELECT row_to_json(t)::text FROM (
        SELECT a.pid, a.state, a.application_name,
               greatest(age(a.backend_xmin), age(a.backend_xid)) AS xid_age
        FROM pg_stat_activity AS a
        WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()
          AND (a.backend_xmin IS NOT NULL OR a.backend_xid IS NOT NULL)
        ORDER BY a.xact_start LIMIT 1) AS t) AS oldest_xact,
    (SELECT max(greatest(age(r.xmin), age(r.catalog_xmin))) FROM pg_replication_slots AS r
     WHERE r.xmin IS NOT NULL OR r.catalog_xmin IS NOT NULL) AS slot_xid_age,
    (SELECT extract(epoch FROM clock_timestamp() - min(p.prepared))::float8
     FROM pg_prepared_xacts AS p WHERE p.database = current_database()) AS oldest_prepared_seconds;
