-- migration: 0009_ordering
-- kind: expand
-- The publish contract: per-key ordering, idempotent publish and trace context.
-- Three nullable columns (adding them rewrites nothing), their indexes, the claim's key
-- gate, and core.publish with named arguments key, idempotency_key and traceparent.
-- Every call that worked before works unchanged (the new arguments all have defaults).

-- A key and an idempotency key: 1-256 characters, no control characters.
ALTER TABLE core.outbox
    ADD COLUMN key             text,
    ADD COLUMN idempotency_key text,
    ADD COLUMN traceparent     text,
    -- A DEAD row of a key holds the key until it is requeued or skipped (set here).
    ADD COLUMN skipped_at      timestamptz;
ALTER TABLE core.outbox
    ADD CONSTRAINT outbox_key_check CHECK (
        key IS NULL OR (char_length(key) BETWEEN 1 AND 256 AND key !~ '[[:cntrl:]]')) NOT VALID,
    ADD CONSTRAINT outbox_idempotency_key_check CHECK (
        idempotency_key IS NULL OR (char_length(idempotency_key) BETWEEN 1 AND 256
                                    AND idempotency_key !~ '[[:cntrl:]]')) NOT VALID,
    ADD CONSTRAINT outbox_traceparent_check CHECK (
        traceparent IS NULL OR traceparent ~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$') NOT VALID;

-- The rows that hold their key: unfinished (PENDING, CLAIMED) or DEAD and not skipped.
-- The claim asks "is there an earlier row holding this key?" of this index only.
CREATE INDEX outbox_key_held_idx ON core.outbox (key, id)
    WHERE key IS NOT NULL AND deleted_at IS NULL
      AND (status IN ('PENDING', 'CLAIMED') OR (status = 'DEAD' AND skipped_at IS NULL));
-- "Is a row of this key running?" (a later-committed earlier id must not overtake it).
CREATE INDEX outbox_key_claimed_idx ON core.outbox (key)
    WHERE key IS NOT NULL AND status = 'CLAIMED';
-- One event per (topic, idempotency key) for as long as its row exists.
CREATE UNIQUE INDEX outbox_idempotency_idx ON core.outbox (topic, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- Whether keyed row `id` may be claimed now: no earlier row holds `k` and no row of `k`
-- is claimed. The transaction-scoped advisory lock on the key serialises claimers of one
-- key; the check runs after it, in a fresh snapshot (a VOLATILE function's statements
-- see every claim committed before the lock was granted), so two claim statements can
-- never both take a row of one key. A try-lock never waits: a key another claimer is
-- taking is left for the next claim.
CREATE FUNCTION core.claim_key_free(k text, row_id bigint) RETURNS boolean
LANGUAGE plpgsql VOLATILE COST 1000 AS $$
BEGIN
    IF NOT pg_try_advisory_xact_lock(1936024420, hashtext(k)) THEN
        RETURN false;
    END IF;
    RETURN NOT EXISTS (
               SELECT 1 FROM core.outbox AS p
               WHERE p.key = k AND p.id < row_id AND p.deleted_at IS NULL
                 AND (p.status IN ('PENDING', 'CLAIMED') OR (p.status = 'DEAD' AND p.skipped_at IS NULL)))
       AND NOT EXISTS (
               SELECT 1 FROM core.outbox AS c
               WHERE c.key = k AND c.status = 'CLAIMED' AND c.id <> row_id);
END;
$$;

-- core.publish gains named arguments. CREATE OR REPLACE cannot add parameters, and a
-- second overload with defaults would make every existing call ambiguous, so the function
-- is replaced, in this migration's transaction, by one whose signature extends the old
-- one; the old one's privileges are carried over.
CREATE TEMPORARY TABLE publish_acl ON COMMIT DROP AS
    SELECT proacl AS acl FROM pg_proc
    WHERE oid = 'core.publish(text, jsonb, timestamptz, bigint)'::regprocedure;
DROP FUNCTION core.publish(text, jsonb, timestamptz, bigint);

-- An ordering key or idempotency key (`what` names it in the message): NULL, or 1-256
-- characters without control characters; anything else raises SQLSTATE 22023.
CREATE FUNCTION core.check_key(value text, what text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF value IS NOT NULL AND (char_length(value) NOT BETWEEN 1 AND 256 OR value ~ '[[:cntrl:]]') THEN
        RAISE EXCEPTION 'invalid %: use 1-256 characters without control characters (got % characters)',
            what, char_length(value)
            USING ERRCODE = '22023', HINT = 'spectral:invalid_key';
    END IF;
END;
$$;

-- Publish one event from SQL, in the caller's transaction. Returns the event id (the
-- first event's id when (topic, idempotency_key) was published before).
-- Bad input raises SQLSTATE 22023 with a one-line message and inserts nothing.
CREATE FUNCTION core.publish(
    topic           text,
    payload         jsonb,
    available_at    timestamptz DEFAULT NULL,
    generation      bigint DEFAULT NULL,
    key             text DEFAULT NULL,
    idempotency_key text DEFAULT NULL,
    traceparent     text DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
DECLARE
    cap bigint := (SELECT s.value::bigint FROM core.settings AS s WHERE s.key = 'max_payload_bytes');
    size bigint;
    new_id bigint;
BEGIN
    IF publish.topic IS NULL OR char_length(publish.topic) NOT BETWEEN 1 AND 128
       OR publish.topic !~ '^[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*$' THEN
        -- Line breaks in the topic are shown escaped: the message stays one line.
        RAISE EXCEPTION 'invalid topic %: use 1-128 characters, dot-separated segments of letters, digits, _ and -',
            coalesce(replace(replace(quote_literal(left(publish.topic, 140)), E'\n', '\n'), E'\r', '\r'), 'NULL')
            USING ERRCODE = '22023', HINT = 'spectral:invalid_topic';
    END IF;
    IF publish.payload IS NULL OR jsonb_typeof(publish.payload) <> 'object' THEN
        RAISE EXCEPTION 'invalid payload: must be a JSON object, got %', coalesce(jsonb_typeof(publish.payload), 'NULL')
            USING ERRCODE = '22023', HINT = 'spectral:invalid_payload';
    END IF;
    PERFORM core.check_key(publish.key, 'key');
    PERFORM core.check_key(publish.idempotency_key, 'idempotency key');
    IF publish.traceparent IS NOT NULL
       AND publish.traceparent !~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$' THEN
        RAISE EXCEPTION 'invalid traceparent: expected the W3C form 00-<32 hex>-<16 hex>-<2 hex>'
            USING ERRCODE = '22023', HINT = 'spectral:invalid_traceparent';
    END IF;
    size := octet_length(publish.payload::text);
    IF size > cap THEN
        RAISE EXCEPTION 'payload too large: % bytes of JSON, the cap is % bytes', size, cap
            USING ERRCODE = '22023', HINT = 'spectral:payload_too_large';
    END IF;
    -- A concurrent publish of the same (topic, idempotency key) waits here for the other
    -- transaction: its commit makes this one a no-op, its rollback lets this one insert.
    INSERT INTO core.outbox (generation, topic, payload, available_at, key, idempotency_key,
                             traceparent)
    VALUES (coalesce(publish.generation, core.current_generation()), publish.topic,
            publish.payload, coalesce(publish.available_at, now()), publish.key,
            publish.idempotency_key, publish.traceparent)
    ON CONFLICT (topic, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING id INTO new_id;
    IF new_id IS NULL THEN
        SELECT o.id INTO new_id FROM core.outbox AS o
        WHERE o.topic = publish.topic AND o.idempotency_key = publish.idempotency_key;
    END IF;
    RETURN new_id;
END;
$$;

-- As 0008_roles made the function it replaces: it runs as its owner, with a fixed
-- search_path, so a producer needs EXECUTE and no table privilege.
ALTER FUNCTION core.publish(text, jsonb, timestamptz, bigint, text, text, text)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

DO $$
DECLARE
    old_acl aclitem[] := (SELECT acl FROM publish_acl);
    item record;
BEGIN
    IF old_acl IS NULL THEN
        RETURN;  -- the defaults (EXECUTE to PUBLIC), which the new function has already
    END IF;
    REVOKE ALL ON FUNCTION core.publish(text, jsonb, timestamptz, bigint, text, text, text)
        FROM PUBLIC;
    FOR item IN SELECT * FROM aclexplode(old_acl) WHERE privilege_type = 'EXECUTE' LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION core.publish(text, jsonb, timestamptz, '
                       'bigint, text, text, text) TO %s',
                       CASE WHEN item.grantee = 0 THEN 'PUBLIC'
                            ELSE quote_ident(item.grantee::regrole::text) END);
    END LOOP;
END;
$$;
