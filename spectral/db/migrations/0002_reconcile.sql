-- migration: 0002_reconcile
-- kind: expand
-- The reconciler's shared schedule and record of passes, and retired generations.

ALTER TABLE core.deployments
    ADD COLUMN retired_at    timestamptz,
    ADD COLUMN retire_policy text
        CONSTRAINT deployments_retire_policy_check CHECK (retire_policy IN ('adopt', 'dead', 'keep'));

-- One row per reconcile pass, whichever worker ran it: the schedule shared by every
-- worker of the database (one pass per interval) and what each pass unblocked.
CREATE TABLE core.reconcile_passes (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    worker_id   text        NOT NULL,
    generation  bigint      NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at timestamptz,
    unblocked   jsonb       NOT NULL DEFAULT '{}'::jsonb,
    errors      jsonb       NOT NULL DEFAULT '[]'::jsonb
);
CREATE INDEX reconcile_passes_started_idx ON core.reconcile_passes (started_at DESC);

-- Every hand-over of a retired generation's rows, for operators.
CREATE TABLE core.generation_handovers (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    from_generation bigint      NOT NULL,
    to_generation   bigint,
    policy          text        NOT NULL,
    rows            integer     NOT NULL,
    at              timestamptz NOT NULL DEFAULT clock_timestamp()
);
