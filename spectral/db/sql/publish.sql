-- Producer-side queries.

-- name: publish
-- Publish one event through core.publish (the same checks as SQL producers get).
-- $1 topic, $2 payload (jsonb text), $3 available_at or NULL, $4 generation or NULL,
-- $5 ordering key, $6 idempotency key, $7 traceparent (each NULL when not given).
SELECT core.publish($1, $2::jsonb, $3, $4, key => $5, idempotency_key => $6,
                    traceparent => $7);

-- name: max_payload_bytes
-- The payload cap the database enforces.
SELECT value::bigint FROM core.settings WHERE key = 'max_payload_bytes';

-- name: set_max_payload_bytes
-- Change the payload cap for SQL and Python producers and the table's CHECK. $1 bytes.
SELECT core.set_max_payload_bytes($1);
