-- The migration runner's own queries.

-- name: lock
-- One migrator at a time per database (the key is 'spectral migrate' as a 64-bit int).
-- Transaction-scoped, taken first in each of the migrator's transactions: a session lock
-- would not survive a transaction pooler.
SELECT pg_advisory_xact_lock(7089812386431062136);

-- name: bootstrap
-- The schema and the table that records applied migrations.
CREATE SCHEMA IF NOT EXISTS core;
CREATE TABLE IF NOT EXISTS core.schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    kind       text        NOT NULL CHECK (kind IN ('expand', 'contract')),
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: applied
SELECT version, name, kind, checksum, applied_at FROM core.schema_migrations ORDER BY version;

-- name: record
-- $1 version, $2 name, $3 kind, $4 checksum.
INSERT INTO core.schema_migrations (version, name, kind, checksum) VALUES ($1, $2, $3, $4);

-- name: has_schema
-- Whether core.schema_migrations exists (NULL when it does not).
SELECT to_regclass('core.schema_migrations') IS NOT NULL;

-- name: has_workers_table
-- Whether core.workers exists yet (a contract migration checks its live workers only then).
SELECT to_regclass('core.workers') IS NOT NULL;

-- name: live_older_workers
-- Live workers (a beat within $1 s) of generations older than the newest deployment:
-- a contract migration would break the code they run.
SELECT worker_id, generation FROM core.workers
WHERE to_regclass('core.workers') IS NOT NULL
  AND state <> 'exited' AND last_seen >= clock_timestamp() - make_interval(secs => $1)
  AND generation < (SELECT max(generation) FROM core.deployments)
ORDER BY generation, worker_id;
