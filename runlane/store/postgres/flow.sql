-- Named queries for schedules, queues and limits on PostgreSQL (same format and placeholders as queries.sql;
-- {schedule_columns} is the Schedule record's columns).

-- name: get_schedule
SELECT {schedule_columns} FROM runlane_schedules WHERE id = %(id)s;

-- name: list_schedules
SELECT {schedule_columns} FROM runlane_schedules ORDER BY id;

-- name: due_schedules
SELECT {schedule_columns} FROM runlane_schedules
WHERE enabled AND disabled_reason IS NULL AND next_fire_at <= %(at)s
ORDER BY next_fire_at;

-- name: next_schedule_fire_at
SELECT min(next_fire_at) FROM runlane_schedules WHERE enabled AND disabled_reason IS NULL;

-- name: upsert_schedule
-- The stored next fire survives an unchanged definition (a restart neither skips nor repeats a fire); a new
-- or changed definition, or one coming back from removal, takes the caller's. A user's pause survives.
INSERT INTO runlane_schedules AS s (id, job, args, cron, "interval", timezone, overlap, misfire, max_catch_up,
                                    queue, priority, max_attempts, concurrency_key, source, enabled,
                                    disabled_reason, next_fire_at, created_at, updated_at)
VALUES (%(id)s, %(job)s, %(args)s::jsonb, %(cron)s, %(interval)s, %(timezone)s, %(overlap)s, %(misfire)s,
        %(max_catch_up)s, %(queue)s, %(priority)s, %(max_attempts)s, %(concurrency_key)s, %(source)s, true, NULL,
        %(next_fire_at)s, {now}, {now})
ON CONFLICT (id) DO UPDATE SET
    next_fire_at = CASE
        WHEN s.job IS DISTINCT FROM excluded.job OR s.args IS DISTINCT FROM excluded.args
          OR s.cron IS DISTINCT FROM excluded.cron OR s."interval" IS DISTINCT FROM excluded."interval"
          OR s.timezone IS DISTINCT FROM excluded.timezone OR s.disabled_reason IS NOT NULL
          OR s.next_fire_at IS NULL OR %(replace)s
        THEN excluded.next_fire_at ELSE s.next_fire_at END,
    job = excluded.job, args = excluded.args, cron = excluded.cron, "interval" = excluded."interval",
    timezone = excluded.timezone, overlap = excluded.overlap, misfire = excluded.misfire,
    max_catch_up = excluded.max_catch_up, queue = excluded.queue, priority = excluded.priority,
    max_attempts = excluded.max_attempts, concurrency_key = excluded.concurrency_key, source = excluded.source,
    disabled_reason = NULL,
    enabled = CASE WHEN %(replace)s THEN true ELSE s.enabled END,
    updated_at = excluded.updated_at
RETURNING {schedule_columns};

-- name: schedule_source
SELECT source FROM runlane_schedules WHERE id = %(id)s;

-- name: disable_removed
UPDATE runlane_schedules SET disabled_reason = %(reason)s, updated_at = {now}
WHERE source = 'code' AND disabled_reason IS NULL AND NOT (id = ANY(%(ids)s::text[]));

-- name: set_enabled
UPDATE runlane_schedules SET enabled = %(enabled)s, updated_at = {now},
    next_fire_at = CASE WHEN %(enabled)s AND NOT enabled THEN %(next_fire_at)s ELSE next_fire_at END
WHERE id = %(id)s
RETURNING {schedule_columns};

-- name: remove_schedule
DELETE FROM runlane_schedules WHERE id = %(id)s RETURNING id;

-- name: bound_idle
-- Runlane's multi-statement transactions hold locks others wait for (a schedule row while firing it, the
-- limit locks while claiming). One left idle because its process was stopped, partitioned or blocked is
-- ended by the server after this time, so that the others carry on instead of stalling behind it.
SELECT set_config('idle_in_transaction_session_timeout', %(idle_timeout)s, true);

-- name: fire_state
-- The schedule row lock serialises the passes of every scheduler over this schedule. A row locked by
-- another pass is skipped, not waited for: that pass fires it, and this one goes on with the others.
SELECT job, args, queue, priority, max_attempts, overlap, next_fire_at, concurrency_key,
       EXISTS (SELECT 1 FROM runlane_runs r WHERE r.schedule_id = s.id AND r.schedule_id IS NOT NULL
               AND r.status IN ('scheduled', 'pending', 'running', 'retrying'))
FROM runlane_schedules s
WHERE id = %(id)s AND enabled AND disabled_reason IS NULL
FOR UPDATE SKIP LOCKED;

-- name: insert_fire
-- The unique index runlane_runs_fire is the arbiter: a second run for the same fire is never inserted.
WITH nid AS (SELECT nextval(pg_get_serial_sequence('runlane_runs', 'id')) AS id)
INSERT INTO runlane_runs AS r (id, job, args, status, queue, priority, max_attempts, not_before, due_at,
                               root_run_id, schedule_id, created_at, finished_at, concurrency_key)
OVERRIDING SYSTEM VALUE
SELECT nid.id, %(job)s, %(args)s::jsonb, %(status)s, %(queue)s, %(priority)s, %(max_attempts)s, %(fire_at)s,
       coalesce(%(due_at)s::timestamptz, 'infinity'), nid.id, %(schedule)s, {now},
       CASE WHEN %(status)s = 'skipped' THEN {now} END, %(concurrency_key)s
FROM nid
ON CONFLICT (schedule_id, not_before) WHERE schedule_id IS NOT NULL AND not_before IS NOT NULL DO NOTHING
RETURNING {run_columns};

-- name: advance_schedule
UPDATE runlane_schedules SET next_fire_at = %(next_fire_at)s, updated_at = {now},
    last_fire_at = coalesce(%(last_fire_at)s, last_fire_at)
WHERE id = %(id)s;

-- name: release_queued_fires
-- Per schedule with held fires (overlap 'queue': scheduled, due at infinity, not a continuation) and no other
-- active run: the oldest held fire becomes pending.
WITH held AS MATERIALIZED (
    SELECT min(h.id) AS id FROM runlane_runs h
    WHERE h.schedule_id IS NOT NULL AND h.status = 'scheduled' AND h.due_at = 'infinity'
      AND NOT EXISTS (
          SELECT 1 FROM runlane_runs o
          WHERE o.schedule_id = h.schedule_id AND o.schedule_id IS NOT NULL
            AND o.status IN ('scheduled', 'pending', 'running', 'retrying')
            AND NOT (o.status = 'scheduled' AND o.due_at = 'infinity'))
    GROUP BY h.schedule_id
), locked AS MATERIALIZED (
    SELECT r.id FROM runlane_runs r JOIN held USING (id)
    WHERE r.status = 'scheduled' AND r.due_at = 'infinity'
    FOR UPDATE OF r SKIP LOCKED
), upd AS (
    UPDATE runlane_runs r SET status = 'pending', due_at = {now}, last_event_id = r.last_event_id + 1
    FROM locked WHERE r.id = locked.id
    RETURNING r.id, r.attempt, r.last_event_id
), ev AS (
    INSERT INTO runlane_events (run_id, id, kind, at, data)
    SELECT id, last_event_id, 'status', {now},
           jsonb_build_object('from', 'scheduled', 'to', 'pending', 'attempt', attempt, 'reason', NULL)
    FROM upd
), note AS (
    SELECT count(pg_notify(ch, %(token)s)) AS n FROM unnest(%(channels)s::text[]) AS ch
    WHERE EXISTS (SELECT 1 FROM upd)
)
SELECT count(*) FROM upd CROSS JOIN note;

-- name: queues
SELECT name, paused, max_concurrency, rate_count, rate_period FROM runlane_queues;

-- name: job_limits
SELECT job, max_concurrency, rate_count, rate_period FROM runlane_job_limits;

-- name: upsert_job_limits
INSERT INTO runlane_job_limits (job, max_concurrency, rate_count, rate_period, updated_at)
SELECT u.job, u.mc, u.rc, u.rp, {now}
FROM unnest(%(job)s::text[], %(max_concurrency)s::int[], %(rate_count)s::int[], %(rate_period)s::float8[])
     AS u(job, mc, rc, rp)
ON CONFLICT (job) DO UPDATE SET max_concurrency = excluded.max_concurrency, rate_count = excluded.rate_count,
    rate_period = excluded.rate_period, updated_at = excluded.updated_at;

-- name: delete_job_limits
DELETE FROM runlane_job_limits WHERE job = ANY(%(jobs)s::text[]);

-- name: upsert_queue_limits
INSERT INTO runlane_queues (name, paused, max_concurrency, rate_count, rate_period, updated_at)
SELECT u.name, false, u.mc, u.rc, u.rp, {now}
FROM unnest(%(name)s::text[], %(max_concurrency)s::int[], %(rate_count)s::int[], %(rate_period)s::float8[])
     AS u(name, mc, rc, rp)
ON CONFLICT (name) DO UPDATE SET max_concurrency = excluded.max_concurrency, rate_count = excluded.rate_count,
    rate_period = excluded.rate_period, updated_at = excluded.updated_at;

-- name: set_paused
WITH up AS (
    INSERT INTO runlane_queues (name, paused, updated_at) VALUES (%(name)s, %(paused)s, {now})
    ON CONFLICT (name) DO UPDATE SET paused = excluded.paused, updated_at = excluded.updated_at
    RETURNING name
), note AS (
    SELECT count(pg_notify(ch, %(token)s)) AS n FROM unnest(%(channels)s::text[]) AS ch
)
SELECT up.name FROM up CROSS JOIN note;

-- name: queue_counts
SELECT queue, status, count(*) FROM runlane_runs
WHERE status IN ('scheduled', 'pending', 'running', 'retrying')
GROUP BY queue, status;

-- name: limited_due
-- Whether the limit-aware claim may find anything: a due run of a limited queue or a limited job among the
-- claimer's queues and jobs (paused queues included: an over-approximation is safe, it only costs a claim).
SELECT EXISTS (
    SELECT 1 FROM unnest(%(queues)s::text[]) AS q(queue)
    CROSS JOIN LATERAL (
        SELECT 1 FROM runlane_runs
        WHERE status = 'pending' AND queue = q.queue AND job = ANY(%(jobs)s::text[])
          AND (q.queue = ANY(%(limited_queues)s::text[]) OR job = ANY(%(limited_jobs)s::text[]))
          AND due_at <= {now} AND (not_after IS NULL OR not_after > {now})
        LIMIT 1
    ) AS r
);

-- name: lock_limits
-- Transaction-scoped advisory locks, one per limited job and queue, taken in ascending key order (no
-- deadlock between claimers): claimers of the same limit run one after another; the next statement's
-- snapshot then sees every claim that committed before the lock was granted.
SELECT count(pg_advisory_xact_lock(k)) FROM unnest(%(keys)s::bigint[]) AS k;

-- name: running_counts
SELECT job, queue, concurrency_key, count(*) FROM runlane_runs
WHERE status = 'running' AND (job = ANY(%(jobs)s::text[]) OR queue = ANY(%(queues)s::text[]))
GROUP BY job, queue, concurrency_key;

-- name: rate_windows
WITH k AS (
    SELECT * FROM unnest(%(keys)s::text[], %(periods)s::float8[]) AS k(key, period)
), trimmed AS (
    DELETE FROM runlane_rate_starts s USING k
    WHERE s.key = k.key AND s.at <= {now} - make_interval(secs => k.period)
)
SELECT k.key, (SELECT count(*) FROM runlane_rate_starts s
               WHERE s.key = k.key AND s.at > {now} - make_interval(secs => k.period))
FROM k;

-- name: rate_starts
INSERT INTO runlane_rate_starts (key, at) SELECT k, {now} FROM unnest(%(keys)s::text[]) AS k;

-- name: limited_candidates
-- Due runs of one queue in claim order, locked, leaving out what cannot be admitted now: a paused queue, a queue
-- at its concurrency limit, job partitions at theirs (counted here, in the snapshot taken after the limit
-- locks) and the partitions in %(full)s. A job whose unkeyed partition is left out and that has no keyed run
-- pending (runlane_runs_keyed) is not searched at all, and with no job left the queue is not read: the search
-- would walk every pending run of the queue to find nothing. Admission itself, rate windows included, is
-- the caller's.
WITH running AS MATERIALIZED (
    SELECT job, queue, coalesce(concurrency_key, '') AS ck, count(*) AS n FROM runlane_runs
    WHERE status = 'running' AND (job = ANY(%(jobs)s::text[]) OR queue = %(queue)s)
    GROUP BY job, queue, ck
), closed AS (
    SELECT 1 FROM runlane_queues q
    WHERE q.name = %(queue)s
      AND (q.paused OR q.max_concurrency <= (SELECT coalesce(sum(n), 0) FROM running WHERE queue = q.name))
), shut AS MATERIALIZED (
    SELECT r.job || chr(31) || r.ck AS part
    FROM running r JOIN runlane_job_limits l ON l.job = r.job AND l.max_concurrency IS NOT NULL
    GROUP BY r.job, r.ck, l.max_concurrency
    HAVING sum(r.n) >= l.max_concurrency
    UNION ALL
    SELECT unnest(%(full)s::text[])
), searched AS MATERIALIZED (
    SELECT j.job FROM unnest(%(jobs)s::text[]) AS j(job)
    WHERE NOT EXISTS (SELECT 1 FROM shut WHERE shut.part = j.job || chr(31))
       OR EXISTS (SELECT 1 FROM runlane_runs k
                  WHERE k.status = 'pending' AND k.concurrency_key IS NOT NULL AND k.job = j.job)
)
SELECT id, job, queue, coalesce(concurrency_key, ''), priority, due_at FROM runlane_runs
WHERE status = 'pending' AND queue = %(queue)s AND job = ANY(ARRAY(SELECT job FROM searched))
  AND due_at <= {now} AND (not_after IS NULL OR not_after > {now})
  AND EXISTS (SELECT 1 FROM searched) AND NOT EXISTS (SELECT 1 FROM closed)
  AND (job || chr(31) || coalesce(concurrency_key, '')) <> ALL(ARRAY(SELECT part FROM shut))
ORDER BY priority DESC, due_at, id
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED;

-- name: claim_ids
WITH claimed AS (
    UPDATE runlane_runs r
    SET status = 'running', attempt = r.attempt + 1, worker_id = %(worker)s, lease_owner = %(worker)s,
        lease_expires_at = {now} + make_interval(secs => %(lease_timeout)s), started_at = {now},
        last_event_id = r.last_event_id + 1, progress = NULL, progress_message = NULL
    WHERE r.id = ANY(%(ids)s::bigint[]) AND r.status = 'pending'
    RETURNING r.*
), att AS (
    INSERT INTO runlane_attempts (run_id, number, worker_id, started_at, status)
    SELECT id, attempt, %(worker)s, {now}, 'running' FROM claimed
), ev AS (
    INSERT INTO runlane_events (run_id, id, kind, at, data)
    SELECT id, last_event_id, 'status', {now},
           jsonb_build_object('from', 'pending', 'to', 'running', 'attempt', attempt, 'reason', NULL)
    FROM claimed
), note AS (
    SELECT count(pg_notify(ch, %(token)s)) AS n FROM unnest(%(channels)s::text[]) AS ch
    WHERE EXISTS (SELECT 1 FROM claimed)
)
SELECT {run_columns} FROM claimed r CROSS JOIN note
ORDER BY r.priority DESC, r.due_at, r.id;
