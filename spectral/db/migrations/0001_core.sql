-- migration: 0001_core
-- kind: expand
-- The core schema: deployments, workers, the outbox and the event_handled ledger.
-- Table and column names follow the deployment runbook; users' SQL relies on them.

CREATE TABLE core.deployments (
    generation  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    reference   text        NOT NULL,
    deployed_at timestamptz NOT NULL DEFAULT now(),
    deployed_by text,
    tag         text
);

CREATE TABLE core.workers (
    worker_id   text        PRIMARY KEY,
    generation  bigint      NOT NULL,
    environment text        NOT NULL,
    service     text        NOT NULL,
    hostname    text        NOT NULL,
    pid         integer     NOT NULL,
    state       text        NOT NULL DEFAULT 'running'
                CONSTRAINT workers_state_check CHECK (state IN ('running', 'reconnecting', 'exited')),
    started_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    last_seen   timestamptz NOT NULL DEFAULT clock_timestamp(),
    exited_at   timestamptz
);
CREATE INDEX workers_generation_state_idx ON core.workers (generation, state);

-- Settings the database enforces itself, so SQL producers get the same rules as Python.
CREATE TABLE core.settings (
    key   text PRIMARY KEY,
    value text NOT NULL
);
INSERT INTO core.settings (key, value) VALUES ('max_payload_bytes', '262144');

CREATE TABLE core.outbox (
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    generation       bigint      NOT NULL,
    topic            text        NOT NULL
                     CONSTRAINT outbox_topic_check CHECK (
                         char_length(topic) BETWEEN 1 AND 128
                         AND topic ~ '^[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*$'),
    payload          jsonb       NOT NULL
                     CONSTRAINT outbox_payload_object_check CHECK (jsonb_typeof(payload) = 'object'),
    status           text        NOT NULL DEFAULT 'PENDING'
                     CONSTRAINT outbox_status_check CHECK (status IN ('PENDING', 'CLAIMED', 'DONE', 'DEAD')),
    attempts         integer     NOT NULL DEFAULT 0,
    available_at     timestamptz NOT NULL DEFAULT now(),
    claimed_by       text,
    claim_token      uuid,
    claim_expires_at timestamptz,
    last_error       text,
    dead_reason      text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    done_at          timestamptz,
    deleted_at       timestamptz,
    -- The cap is rewritten by core.set_max_payload_bytes(); see 'max_payload_bytes'.
    CONSTRAINT outbox_payload_size_check CHECK (octet_length(payload::text) <= 262144),
    CONSTRAINT outbox_claim_check CHECK (
        (status = 'CLAIMED') = (claim_token IS NOT NULL AND claim_expires_at IS NOT NULL))
);

-- The claim query reads this partial index only: DONE and DEAD rows never enter it, so
-- claiming stays an index scan with millions of finished rows.
CREATE INDEX outbox_pending_idx ON core.outbox (generation, id)
    WHERE status = 'PENDING' AND deleted_at IS NULL;
-- The reaper's scan of lapsed claims.
CREATE INDEX outbox_claimed_idx ON core.outbox (claim_expires_at)
    WHERE status = 'CLAIMED';
-- Operators' views of dead letters.
CREATE INDEX outbox_dead_idx ON core.outbox (topic, id) WHERE status = 'DEAD';

CREATE TABLE core.event_handled (
    handler    text        NOT NULL,
    event_id   bigint      NOT NULL,
    handled_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (handler, event_id)
);
-- Which handlers of one event already succeeded (read at claim time for retried rows).
CREATE INDEX event_handled_event_idx ON core.event_handled (event_id);

-- The generation a producer stamps: the session's spectral.generation setting when set
-- (SET spectral.generation = '7'), otherwise the newest deployment.
CREATE FUNCTION core.current_generation() RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
DECLARE
    configured text := nullif(current_setting('spectral.generation', true), '');
    newest bigint;
BEGIN
    IF configured IS NOT NULL THEN
        RETURN configured::bigint;
    END IF;
    SELECT max(generation) INTO newest FROM core.deployments;
    IF newest IS NULL THEN
        RAISE EXCEPTION 'no deployment generation exists: allocate one first (spectral deploy allocate, or spectral migrate in development)'
            USING ERRCODE = 'P0002', HINT = 'spectral:no_generation';
    END IF;
    RETURN newest;
END;
$$;

-- Publish one event from SQL, in the caller's transaction. Returns the event id.
-- Bad input raises SQLSTATE 22023 with a one-line message and inserts nothing.
CREATE FUNCTION core.publish(
    topic        text,
    payload      jsonb,
    available_at timestamptz DEFAULT NULL,
    generation   bigint DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    cap bigint := (SELECT value::bigint FROM core.settings WHERE key = 'max_payload_bytes');
    size bigint;
    new_id bigint;
BEGIN
    IF topic IS NULL OR char_length(topic) NOT BETWEEN 1 AND 128
       OR topic !~ '^[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*$' THEN
        -- Line breaks in the topic are shown escaped: the message stays one line.
        RAISE EXCEPTION 'invalid topic %: use 1-128 characters, dot-separated segments of letters, digits, _ and -',
            coalesce(replace(replace(quote_literal(left(topic, 140)), E'\n', '\n'), E'\r', '\r'), 'NULL')
            USING ERRCODE = '22023', HINT = 'spectral:invalid_topic';
    END IF;
    IF payload IS NULL OR jsonb_typeof(payload) <> 'object' THEN
        RAISE EXCEPTION 'invalid payload: must be a JSON object, got %', coalesce(jsonb_typeof(payload), 'NULL')
            USING ERRCODE = '22023', HINT = 'spectral:invalid_payload';
    END IF;
    size := octet_length(payload::text);
    IF size > cap THEN
        RAISE EXCEPTION 'payload too large: % bytes of JSON, the cap is % bytes', size, cap
            USING ERRCODE = '22023', HINT = 'spectral:payload_too_large';
    END IF;
    INSERT INTO core.outbox (generation, topic, payload, available_at)
    VALUES (coalesce(publish.generation, core.current_generation()), publish.topic,
            publish.payload, coalesce(publish.available_at, now()))
    RETURNING id INTO new_id;
    RETURN new_id;
END;
$$;

-- Change the payload cap for Python and SQL producers and the table's CHECK alike.
-- NOT VALID: rows already stored are not rechecked.
CREATE FUNCTION core.set_max_payload_bytes(cap bigint) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF cap IS NULL OR cap < 2 THEN
        RAISE EXCEPTION 'max_payload_bytes must be at least 2, got %', cap USING ERRCODE = '22023';
    END IF;
    IF (SELECT value::bigint FROM core.settings WHERE key = 'max_payload_bytes') = cap THEN
        RETURN;
    END IF;
    UPDATE core.settings SET value = cap::text WHERE key = 'max_payload_bytes';
    ALTER TABLE core.outbox DROP CONSTRAINT outbox_payload_size_check;
    EXECUTE format('ALTER TABLE core.outbox ADD CONSTRAINT outbox_payload_size_check '
                   'CHECK (octet_length(payload::text) <= %s) NOT VALID', cap);
END;
$$;

-- The wake-up: one NOTIFY per generation per inserting statement, delivered at commit
-- (a rolled-back transaction sends nothing). The payload is the generation number only;
-- it never carries event data. NOTIFY is a hint: workers poll regardless.
CREATE FUNCTION core.outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    g bigint;
BEGIN
    FOR g IN SELECT DISTINCT generation FROM inserted LOOP
        PERFORM pg_notify('spectral_outbox_v1', g::text);
    END LOOP;
    RETURN NULL;
END;
$$;

CREATE TRIGGER outbox_notify
    AFTER INSERT ON core.outbox
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION core.outbox_notify();
