-- migration: 0008_roles
-- kind: expand
-- Least privilege: three NOLOGIN group roles that users grant to their own login roles.
--   spectral_producer  publish through core.publish (and the Python API); nothing else:
--                      it reads no payload and changes no row directly.
--   spectral_worker    the runtime's statements (claim, settle, reap, heartbeats,
--                      reconcile passes, generations, rollouts); no DDL, no DELETE.
--   spectral_reader    read every core table (outbox, workers, deployments, records);
--                      no writes, no publish.
-- Roles are cluster-wide: another database of the same cluster may have created them
-- already (then only the grants, which are per database, are applied here). Creating
-- them needs CREATEROLE; without it, a DBA creates the three roles first and the
-- migration skips that step. Migrations run as the owner of the core schema (see
-- docs/how-to/least-privilege.md).

DO $$
DECLARE
    name text;
BEGIN
    FOREACH name IN ARRAY ARRAY['spectral_producer', 'spectral_worker', 'spectral_reader'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = name) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', name);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;  -- another database's migration created it at the same moment
            END;
        END IF;
    END LOOP;
END;
$$;

GRANT USAGE ON SCHEMA core TO spectral_producer, spectral_worker, spectral_reader;

-- Publishing runs as the function's owner, with a fixed search_path, so a producer needs
-- EXECUTE and no table privilege. Every overload is covered (the signature may grow).
DO $$
DECLARE
    fn regprocedure;
BEGIN
    FOR fn IN SELECT p.oid::regprocedure FROM pg_proc AS p
              JOIN pg_namespace AS n ON n.oid = p.pronamespace
              WHERE n.nspname = 'core' AND p.proname = 'publish' LOOP
        EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER SET search_path = pg_catalog, pg_temp', fn);
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', fn);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO spectral_producer, spectral_worker', fn);
    END LOOP;
    FOR fn IN SELECT p.oid::regprocedure FROM pg_proc AS p
              JOIN pg_namespace AS n ON n.oid = p.pronamespace
              WHERE n.nspname = 'core' AND p.proname = 'set_max_payload_bytes' LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', fn);  -- migrate (the owner) only
    END LOOP;
END;
$$;

-- The worker: exactly the statements of spectral/db/sql/*.sql. DELETE only where the
-- pruner (a worker actor, 0007) deletes finished rows, their ledger rows and old records.
GRANT SELECT, UPDATE, DELETE         ON core.outbox               TO spectral_worker;
GRANT SELECT, INSERT, DELETE         ON core.event_handled        TO spectral_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON core.workers              TO spectral_worker;
GRANT SELECT, INSERT, UPDATE         ON core.deployments          TO spectral_worker;
GRANT SELECT                         ON core.settings             TO spectral_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON core.reconcile_passes     TO spectral_worker;
GRANT SELECT, INSERT, DELETE         ON core.generation_handovers TO spectral_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON core.prune_passes         TO spectral_worker;
GRANT SELECT, INSERT, UPDATE         ON core.rollouts             TO spectral_worker;
GRANT SELECT                         ON core.schema_migrations    TO spectral_worker;

-- The reader: every table, also those later migrations create (as the same owner).
GRANT SELECT ON ALL TABLES IN SCHEMA core TO spectral_reader;
ALTER DEFAULT PRIVILEGES IN SCHEMA core GRANT SELECT ON TABLES TO spectral_reader;
