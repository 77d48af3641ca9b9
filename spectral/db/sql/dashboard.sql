-- Read-only views of the dashboard at /ui (the rest it shares with /queue and inspect).

-- name: dead_rows
-- The newest $1 DEAD rows with why they died.
SELECT id, topic, generation, attempts, dead_reason, last_error, updated_at
FROM core.outbox
WHERE status = 'DEAD' AND deleted_at IS NULL
ORDER BY updated_at DESC, id DESC
LIMIT $1;

-- name: dead_topics
-- DEAD rows by topic, most first.
SELECT topic, count(*) AS n
FROM core.outbox
WHERE status = 'DEAD' AND deleted_at IS NULL
GROUP BY topic
ORDER BY n DESC, topic;

-- name: throughput
-- Rows acknowledged (DONE) per minute over the last $1 minutes, oldest minute first,
-- the current minute included; minutes without any are 0.
WITH minutes AS (
    SELECT generate_series(date_trunc('minute', clock_timestamp()) - make_interval(mins => $1 - 1),
                           date_trunc('minute', clock_timestamp()), interval '1 minute') AS minute
)
SELECT m.minute, count(o.id) AS done
FROM minutes AS m
LEFT JOIN core.outbox AS o
       ON o.done_at >= m.minute AND o.done_at < m.minute + interval '1 minute'
      AND o.status = 'DONE'
GROUP BY m.minute
ORDER BY m.minute;
