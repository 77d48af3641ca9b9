-- migration: 0006_deploy_records
-- kind: expand
-- Deploy records: every `spectral deploy rollout` leaves one row with its verdict, the
-- checks it ran and the evidence for the staging gate. Only additions and a wider CHECK,
-- so workers of older generations keep running against it.

ALTER TABLE core.rollouts
    ADD COLUMN environment        text,
    ADD COLUMN reference          text,
    ADD COLUMN deployed_by        text,
    ADD COLUMN migrations_applied jsonb NOT NULL DEFAULT '[]',
    ADD COLUMN checks             jsonb NOT NULL DEFAULT '[]',
    ADD COLUMN verdict            text
               CONSTRAINT rollouts_verdict_check CHECK (verdict IN ('SUCCESS', 'ROLLED_BACK', 'REFUSED')),
    ADD COLUMN staging_evidence   text,
    ADD COLUMN override_reason    text;

-- A refused rollout may have no generation: the gate refuses before one is allocated.
ALTER TABLE core.rollouts ALTER COLUMN generation DROP NOT NULL;

ALTER TABLE core.rollouts DROP CONSTRAINT rollouts_status_check;
ALTER TABLE core.rollouts ADD CONSTRAINT rollouts_status_check
    CHECK (status IN ('running', 'success', 'rolled_back', 'refused'));

-- The staging gate asks: did a rollout of this reference pass in staging?
CREATE INDEX rollouts_environment_reference_idx ON core.rollouts (environment, reference, id);
