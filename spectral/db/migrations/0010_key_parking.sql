-- migration: 0010_key_parking
-- kind: expand
-- One hot or blocked key no longer slows every claim. Before this, the rows waiting behind
-- their key's head stayed due in outbox_due_idx, and every claim stepped over all of them
-- (a key with 20,000 waiting rows cost each claim ~25 ms). Now such a row is parked: its
-- available_at becomes 'infinity', past the end of the claim's range scan, so no claim
-- reads it again; when the key's head stops holding the key, the next row of the key is
-- put back (available_at := created_at: due at once, at the front of the queue).
-- No column, no index and no existing statement changes: older workers keep working
-- (they simply never see parked rows, which are never their key's head).

-- Park row `row_id` of key `k` if it is waiting: called by the claim for a keyed due row
-- that its own snapshot saw behind an earlier holder. Under the key's transaction-scoped
-- advisory lock (a try-lock: it never waits, like core.claim_key_free) it checks again
-- in a fresh snapshot, and parks the row only if an earlier row still holds the key (and
-- no other transaction has the row locked). Always false: a waiting row is never claimed.
-- Parking only ever happens under the lock with the holder visible, and the trigger
-- below puts the next row back under the same lock, so a key's head is never parked.
-- One claim parks at most 500 rows (about 0.2 ms each), so a backlog found at once is
-- parked over several claims and no single claim stalls; the rest are stepped over as
-- before until a later claim parks them.
CREATE FUNCTION core.park_waiting(k text, row_id bigint) RETURNS boolean
LANGUAGE plpgsql VOLATILE COST 1000 AS $$
DECLARE
    parked integer := coalesce(nullif(current_setting('spectral.parked', true), ''), '0')::integer;
BEGIN
    IF parked >= 500 THEN
        RETURN false;
    END IF;
    -- Two statements: the check's snapshot must be taken after the lock is held.
    IF NOT pg_try_advisory_xact_lock(1936024420, hashtext(k)) THEN
        RETURN false;
    END IF;
    IF EXISTS (
        SELECT 1 FROM core.outbox AS p
        WHERE p.key = k AND p.id < row_id AND p.deleted_at IS NULL
          AND (p.status IN ('PENDING', 'CLAIMED') OR (p.status = 'DEAD' AND p.skipped_at IS NULL))
    ) THEN
        UPDATE core.outbox SET available_at = 'infinity'
        WHERE id = (SELECT w.id FROM core.outbox AS w
                    WHERE w.id = row_id AND w.status = 'PENDING' AND w.deleted_at IS NULL
                      AND w.available_at <> 'infinity'
                    FOR UPDATE SKIP LOCKED);
        PERFORM set_config('spectral.parked', (parked + 1)::text, true);
    END IF;
    RETURN false;
END;
$$;

-- When a row stops holding its key (acknowledged, DEAD and skipped, soft-deleted,
-- deleted, or given another key), put the key's new head back if it was parked. The
-- lock is taken blocking: a claim holding it never waits for anything, so it is released
-- within one claim statement. The fresh snapshot taken after the lock sees every park
-- committed before it; a park after it sees this row's change.
CREATE FUNCTION core.outbox_unpark() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(1936024420, hashtext(OLD.key));
    UPDATE core.outbox AS o SET available_at = o.created_at
    WHERE o.id = (SELECT min(h.id) FROM core.outbox AS h
                  WHERE h.key = OLD.key AND h.deleted_at IS NULL
                    AND (h.status IN ('PENDING', 'CLAIMED')
                         OR (h.status = 'DEAD' AND h.skipped_at IS NULL)))
      AND o.available_at = 'infinity';
    RETURN NULL;
END;
$$;

-- WHEN keeps the function off every path but a keyed row leaving the holding states:
-- claims, releases, retries and unkeyed acknowledgements never call it.
CREATE TRIGGER outbox_unpark_update
    AFTER UPDATE OF status, skipped_at, deleted_at, key ON core.outbox
    FOR EACH ROW
    WHEN (OLD.key IS NOT NULL AND OLD.deleted_at IS NULL
          AND (OLD.status IN ('PENDING', 'CLAIMED') OR (OLD.status = 'DEAD' AND OLD.skipped_at IS NULL))
          AND NOT (NEW.key IS NOT DISTINCT FROM OLD.key AND NEW.deleted_at IS NULL
                   AND (NEW.status IN ('PENDING', 'CLAIMED')
                        OR (NEW.status = 'DEAD' AND NEW.skipped_at IS NULL))))
    EXECUTE FUNCTION core.outbox_unpark();
CREATE TRIGGER outbox_unpark_delete
    AFTER DELETE ON core.outbox
    FOR EACH ROW
    WHEN (OLD.key IS NOT NULL AND OLD.deleted_at IS NULL
          AND (OLD.status IN ('PENDING', 'CLAIMED') OR (OLD.status = 'DEAD' AND OLD.skipped_at IS NULL)))
    EXECUTE FUNCTION core.outbox_unpark();
