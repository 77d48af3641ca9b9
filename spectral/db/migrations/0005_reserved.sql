-- migration: 0005_reserved
-- kind: expand
-- Reserved for the outbox guarantee, whose migration carries this number.
-- Delete this file when that migration is merged (two files with one number fail loudly).
SELECT 1;
