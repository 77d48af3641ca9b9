-- Queries of spectral.testing, the users' test kit.

-- name: unfinished
-- Rows of generation $1 a worker of it would act on within $2 seconds: CLAIMED rows
-- (running, or finished and not yet acknowledged) and PENDING rows due by then. Rows
-- scheduled later (a long retry backoff, a far available_at) do not count.
SELECT count(*) FROM core.outbox
WHERE generation = $1 AND deleted_at IS NULL
  AND (status = 'CLAIMED'
       OR (status = 'PENDING' AND available_at <= now() + make_interval(secs => $2)));

-- name: event_state
-- One row's state as a test sees it, with the handlers that committed for it.
-- $1 event id.
SELECT o.id, o.topic, o.status, o.attempts, o.last_error, o.dead_reason, o.claimed_by,
       ARRAY(SELECT h.handler FROM core.event_handled AS h
             WHERE h.event_id = o.id ORDER BY h.handler) AS handled_by
FROM core.outbox AS o WHERE o.id = $1;
