-- migration: 0004_claim_index
-- kind: expand
-- The claim reads due rows in (available_at, id) order from this partial index. No other
-- index yields that order, so the plan stays on it whatever the statistics say.
CREATE INDEX outbox_due_idx ON core.outbox (generation, available_at, id)
    WHERE status = 'PENDING' AND deleted_at IS NULL;
DROP INDEX core.outbox_pending_idx;
