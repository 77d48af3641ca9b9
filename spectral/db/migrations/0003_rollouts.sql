-- migration: 0003_rollouts
-- kind: expand
-- The outcome of every `spectral deploy rollout`.

CREATE TABLE core.rollouts (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    generation  bigint      NOT NULL,
    target      text        NOT NULL CONSTRAINT rollouts_target_check CHECK (target IN ('process', 'docker')),
    status      text        NOT NULL DEFAULT 'running'
                CONSTRAINT rollouts_status_check CHECK (status IN ('running', 'success', 'rolled_back')),
    reason      text,
    new_process text,
    old_process text,
    started_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at timestamptz
);

-- A rolled-back or retired generation is never stamped: producers without a generation
-- get the newest one still in service (rows already stamped are adopted by the reconciler).
CREATE OR REPLACE FUNCTION core.current_generation() RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
DECLARE
    configured text := nullif(current_setting('spectral.generation', true), '');
    newest bigint;
BEGIN
    IF configured IS NOT NULL THEN
        RETURN configured::bigint;
    END IF;
    SELECT max(generation) INTO newest FROM core.deployments WHERE retired_at IS NULL;
    IF newest IS NULL THEN
        RAISE EXCEPTION 'no deployment generation in service: allocate one with spectral deploy allocate (in development spectral run and spectral publish allocate one)'
            USING ERRCODE = 'P0002', HINT = 'spectral:no_generation';
    END IF;
    RETURN newest;
END;
$$;

-- Every row's generation must be an allocated one, whatever the producer (core.publish or
-- a direct INSERT). NOT VALID: rows written before this migration are not rechecked.
ALTER TABLE core.outbox
    ADD CONSTRAINT outbox_generation_fkey FOREIGN KEY (generation)
    REFERENCES core.deployments (generation) NOT VALID;
