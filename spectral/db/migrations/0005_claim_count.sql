-- migration: 0005_claim_count
-- kind: expand
-- How many times a row has been claimed. The claim reads the ledger (the handlers that
-- already succeeded) for every row claimed before, whatever brought it back: a retry, a
-- requeue (which resets attempts), a release at the drain deadline, the reaper, the
-- reconciler or a generation hand-over. Only a row's very first claim skips that read:
-- no handler can have run for it yet. Adding a column with a constant default rewrites
-- nothing.
ALTER TABLE core.outbox ADD COLUMN claims integer NOT NULL DEFAULT 0
    CONSTRAINT outbox_claims_check CHECK (claims >= 0);

-- Each worker's own heartbeat interval: the reconciler takes a claim from a worker only
-- after two of that worker's intervals without a beat, while the worker itself stops
-- claiming and cancels its turns after one and a half (its fence). Workers of one
-- database may run different intervals; the rule holds for each. NULL for rows written
-- before this migration (the sweep then uses its own interval).
ALTER TABLE core.workers ADD COLUMN heartbeat_seconds float8
    CONSTRAINT workers_heartbeat_seconds_check CHECK (heartbeat_seconds > 0);
