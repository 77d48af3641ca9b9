-- migration: 0006_reserved
-- kind: expand
-- Reserved for retention and health (issue 11), whose migration carries this number.
-- Delete this file when that migration is merged (two files with one number fail loudly).
SELECT 1;
