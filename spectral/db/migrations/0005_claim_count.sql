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
