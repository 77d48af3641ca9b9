-- The live kill switches of the periodic actors, rows of core.settings: 'reconcile_enabled'
-- ('spectral reconcile on|off', the dashboard) and 'prune_enabled' ('spectral prune
-- on|off'). No row: each process's own setting decides.

-- name: override
-- $1 the switch's key. Returns 'true' or 'false'; no row when the override is not set.
SELECT value FROM core.settings WHERE key = $1;

-- name: set_override
-- $1 the switch's key, $2 'true' or 'false'; NULL removes the override.
WITH gone AS (DELETE FROM core.settings WHERE key = $1 AND $2::text IS NULL)
INSERT INTO core.settings (key, value)
SELECT $1, $2::text WHERE $2::text IS NOT NULL
ON CONFLICT (key) DO UPDATE SET value = excluded.value;
