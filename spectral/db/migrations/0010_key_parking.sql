-- migration: 0010_key_parking
-- kind: expand
-- One hot or blocked key no longer slows every claim. Before this, the rows waiting behind
-- their key's head stayed due in outbox_due_idx, and every claim stepped over all of them
-- (a key with 20,000 waiting rows cost each claim ~25 ms). Now such a row is parked: its
-- available_at becomes 'infinity', past the end of the claim's range scan, so no claim
-- reads it again; when the key's head stops holding the key, the next row of the key is
-- put back (available_at := created_at: due at once, at the front of the queue).
-- One column (adding it rewrites nothing) and no index. Older workers' statements keep
-- working unchanged (they never see parked rows, which never head their key).

-- Set on the row that heads its key when the claim parks a row behind it: only such a
-- row's leaving calls the unpark trigger, so a key that never waited costs nothing more.
ALTER TABLE core.outbox ADD COLUMN key_waiters boolean NOT NULL DEFAULT false;

-- Park row `row_id` of key `k` if it is waiting: called by the claim for a keyed due row
-- that its own snapshot saw behind an earlier holder. Under the key's transaction-scoped
-- advisory lock (a try-lock: it never waits, like core.claim_key_free), in a fresh
-- snapshot: find the key's head (its earliest holder); if it is running (CLAIMED) or
-- DEAD, lock it without waiting and mark it (key_waiters), then park the row. Always
-- false: a waiting row is never claimed.
-- Why it is safe: the head's leaving is what frees the key, and the trigger below puts
-- the next row back then, if the head is marked. The mark is written under the head's
-- row lock, and only while the locked head still holds the key: a settle changing the
-- head either committed before (the head is seen gone and nothing is parked), holds the
-- row lock now (nothing is parked: left for a later claim), or waits for this claim to
-- commit and then sees the mark.
-- One claim parks at most 500 rows (about 0.2 ms each), so a backlog found at once is
-- parked over several claims and no single claim stalls; the rest are stepped over as
-- before until a later claim parks them.
CREATE FUNCTION core.park_waiting(k text, row_id bigint) RETURNS boolean
LANGUAGE plpgsql VOLATILE COST 1000 AS $$
DECLARE
    parked integer := coalesce(nullif(current_setting('spectral.parked', true), ''), '0')::integer;
    head bigint;
    state text;
    marked boolean;
BEGIN
    IF parked >= 500 THEN
        RETURN false;
    END IF;
    -- Separate statements: the snapshots must be taken after the lock is held.
    IF NOT pg_try_advisory_xact_lock(1936024420, hashtext(k)) THEN
        RETURN false;
    END IF;
    SELECT h.id, h.status INTO head, state FROM core.outbox AS h
    WHERE h.key = k AND h.id < row_id AND h.deleted_at IS NULL
      AND (h.status IN ('PENDING', 'CLAIMED') OR (h.status = 'DEAD' AND h.skipped_at IS NULL))
    ORDER BY h.id LIMIT 1;
    -- Only behind a running or DEAD head: a PENDING head may be claimed by this very
    -- statement, which must not find it changed by this function (and rows wait behind
    -- it only until it is claimed, or while it backs off before a retry).
    IF head IS NULL OR state = 'PENDING' THEN
        RETURN false;
    END IF;
    -- Still holding once locked (it may have let go since the snapshot above).
    SELECT h.key_waiters INTO marked FROM core.outbox AS h
    WHERE h.id = head AND h.deleted_at IS NULL
      AND (h.status = 'CLAIMED' OR (h.status = 'DEAD' AND h.skipped_at IS NULL))
    FOR NO KEY UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN false;  -- the head is being changed right now, or has let go
    END IF;
    IF NOT marked THEN
        UPDATE core.outbox SET key_waiters = true WHERE id = head;
    END IF;
    UPDATE core.outbox SET available_at = 'infinity'
    WHERE id = (SELECT w.id FROM core.outbox AS w
                WHERE w.id = row_id AND w.status = 'PENDING' AND w.deleted_at IS NULL
                  AND w.available_at <> 'infinity'
                FOR UPDATE SKIP LOCKED);
    PERFORM set_config('spectral.parked', (parked + 1)::text, true);
    RETURN false;
END;
$$;

-- When a marked row stops holding its key (acknowledged, DEAD and skipped, soft-deleted,
-- deleted, or given another key), put the key's new head back if it was parked, and mark
-- it, as rows may still be parked behind it. The lock is taken blocking: a claim holding
-- it never waits for anything, so it is released within one claim statement. The fresh
-- snapshot taken after the lock sees every park committed before it; a park after it
-- sees this row's change.
CREATE FUNCTION core.outbox_unpark() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    holds boolean;
BEGIN
    PERFORM pg_advisory_xact_lock(1936024420, hashtext(OLD.key));
    LOOP
        UPDATE core.outbox AS o
        SET available_at = CASE WHEN o.available_at = 'infinity' THEN o.created_at
                                ELSE o.available_at END,
            key_waiters = true
        WHERE o.id = (SELECT min(h.id) FROM core.outbox AS h
                      WHERE h.key = OLD.key AND h.deleted_at IS NULL
                        AND (h.status IN ('PENDING', 'CLAIMED')
                             OR (h.status = 'DEAD' AND h.skipped_at IS NULL)))
          AND (o.available_at = 'infinity' OR NOT o.key_waiters)
        RETURNING o.deleted_at IS NULL
                  AND (o.status IN ('PENDING', 'CLAIMED')
                       OR (o.status = 'DEAD' AND o.skipped_at IS NULL)) INTO holds;
        -- Done unless the head found let go of the key while this waited for its row
        -- (another worker's settle): then find the head after it.
        EXIT WHEN NOT FOUND OR holds;
    END LOOP;
    RETURN NULL;
END;
$$;

-- WHEN keeps the function off every path but a marked keyed row leaving the holding
-- states: claims, releases, retries, unkeyed rows and keys that never waited never call it.
CREATE TRIGGER outbox_unpark_update
    AFTER UPDATE OF status, skipped_at, deleted_at, key ON core.outbox
    FOR EACH ROW
    WHEN (OLD.key_waiters AND OLD.key IS NOT NULL AND OLD.deleted_at IS NULL
          AND (OLD.status IN ('PENDING', 'CLAIMED') OR (OLD.status = 'DEAD' AND OLD.skipped_at IS NULL))
          AND NOT (NEW.key IS NOT DISTINCT FROM OLD.key AND NEW.deleted_at IS NULL
                   AND (NEW.status IN ('PENDING', 'CLAIMED')
                        OR (NEW.status = 'DEAD' AND NEW.skipped_at IS NULL))))
    EXECUTE FUNCTION core.outbox_unpark();
CREATE TRIGGER outbox_unpark_delete
    AFTER DELETE ON core.outbox
    FOR EACH ROW
    WHEN (OLD.key_waiters AND OLD.key IS NOT NULL AND OLD.deleted_at IS NULL
          AND (OLD.status IN ('PENDING', 'CLAIMED') OR (OLD.status = 'DEAD' AND OLD.skipped_at IS NULL)))
    EXECUTE FUNCTION core.outbox_unpark();
