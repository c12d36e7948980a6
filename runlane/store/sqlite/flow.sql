-- Named queries for schedules, queues and limits on SQLite (same format as queries.sql).

-- name: schedule_columns
id, job, args, cron, interval, timezone, overlap, misfire, max_catch_up, queue, enabled, source,
disabled_reason, next_fire_at, last_fire_at, created_at, updated_at

-- name: get_schedule
SELECT {schedule_columns}, priority, max_attempts FROM runlane_schedules WHERE id = ?

-- name: list_schedules
SELECT {schedule_columns}, priority, max_attempts FROM runlane_schedules ORDER BY id

-- name: due_schedules
SELECT {schedule_columns}, priority, max_attempts FROM runlane_schedules
WHERE enabled = 1 AND disabled_reason IS NULL AND next_fire_at IS NOT NULL AND next_fire_at <= ?
ORDER BY next_fire_at

-- name: next_schedule_fire_at
SELECT min(next_fire_at) FROM runlane_schedules WHERE enabled = 1 AND disabled_reason IS NULL

-- name: upsert_schedule
-- The stored next fire survives an unchanged definition (a restart neither skips nor repeats a fire); a new
-- or changed definition, or one coming back from removal, takes the caller's. A user's pause survives.
INSERT INTO runlane_schedules (id, job, args, cron, interval, timezone, overlap, misfire, max_catch_up, queue,
                               priority, max_attempts, concurrency_key, source, enabled, disabled_reason,
                               next_fire_at, created_at, updated_at)
VALUES (:id, :job, :args, :cron, :interval, :timezone, :overlap, :misfire, :max_catch_up, :queue, :priority,
        :max_attempts, :concurrency_key, :source, 1, NULL, :next_fire_at, :now, :now)
ON CONFLICT (id) DO UPDATE SET
    next_fire_at = CASE
        WHEN runlane_schedules.job IS NOT excluded.job OR runlane_schedules.args IS NOT excluded.args
          OR runlane_schedules.cron IS NOT excluded.cron OR runlane_schedules.interval IS NOT excluded.interval
          OR runlane_schedules.timezone IS NOT excluded.timezone
          OR runlane_schedules.disabled_reason IS NOT NULL OR runlane_schedules.next_fire_at IS NULL
          OR :replace
        THEN excluded.next_fire_at ELSE runlane_schedules.next_fire_at END,
    job = excluded.job, args = excluded.args, cron = excluded.cron, interval = excluded.interval,
    timezone = excluded.timezone, overlap = excluded.overlap, misfire = excluded.misfire,
    max_catch_up = excluded.max_catch_up, queue = excluded.queue, priority = excluded.priority,
    max_attempts = excluded.max_attempts, concurrency_key = excluded.concurrency_key, source = excluded.source,
    disabled_reason = NULL,
    enabled = CASE WHEN :replace THEN 1 ELSE runlane_schedules.enabled END,
    updated_at = excluded.updated_at

-- name: schedule_source
SELECT source FROM runlane_schedules WHERE id = ?

-- name: disable_removed
UPDATE runlane_schedules SET disabled_reason = :reason, updated_at = :now
WHERE source = 'code' AND disabled_reason IS NULL AND id NOT IN (SELECT value FROM json_each(:ids))

-- name: set_enabled
UPDATE runlane_schedules SET enabled = :enabled, updated_at = :now,
    next_fire_at = CASE WHEN :enabled AND NOT enabled THEN :next_fire_at ELSE next_fire_at END
WHERE id = :id

-- name: remove_schedule
DELETE FROM runlane_schedules WHERE id = ?

-- name: fire_state
SELECT job, args, queue, priority, max_attempts, overlap, next_fire_at, concurrency_key FROM runlane_schedules
WHERE id = ? AND enabled = 1 AND disabled_reason IS NULL

-- name: schedule_active_run
SELECT 1 FROM runlane_runs INDEXED BY runlane_runs_schedule_active
WHERE schedule_id = ? AND schedule_id IS NOT NULL
  AND (status = 'scheduled' OR status = 'pending' OR status = 'running' OR status = 'retrying')
LIMIT 1

-- name: insert_fire
INSERT INTO runlane_runs (id, job, args, status, queue, priority, max_attempts, not_before, due_at, tags,
                          root_run_id, schedule_id, created_at, finished_at, concurrency_key)
VALUES (:id, :job, :args, :status, :queue, :priority, :max_attempts, :fire_at, :due_at, '[]', :id, :schedule,
        :now, :finished_at, :concurrency_key)
ON CONFLICT (schedule_id, not_before) WHERE schedule_id IS NOT NULL AND not_before IS NOT NULL DO NOTHING

-- name: advance_schedule
UPDATE runlane_schedules SET next_fire_at = :next_fire_at, updated_at = :now,
    last_fire_at = coalesce(:last_fire_at, last_fire_at)
WHERE id = :id

-- name: held_fires
-- Per schedule with held fires (overlap 'queue': scheduled with no due time) and no other active run: its
-- oldest held fire.
SELECT min(h.id) FROM runlane_runs AS h INDEXED BY runlane_runs_held
WHERE h.schedule_id IS NOT NULL AND h.status = 'scheduled' AND h.due_at IS NULL
  AND NOT EXISTS (
      SELECT 1 FROM runlane_runs AS o INDEXED BY runlane_runs_schedule_active
      WHERE o.schedule_id = h.schedule_id AND o.schedule_id IS NOT NULL
        AND (o.status = 'scheduled' OR o.status = 'pending' OR o.status = 'running' OR o.status = 'retrying')
        AND NOT (o.status = 'scheduled' AND o.due_at IS NULL))
GROUP BY h.schedule_id

-- name: release_fire
UPDATE runlane_runs SET status = 'pending', due_at = :now, last_event_id = last_event_id + 1
WHERE id = :id AND status = 'scheduled' AND due_at IS NULL
RETURNING id, attempt, last_event_id

-- name: queues
SELECT name, paused, max_concurrency, rate_count, rate_period FROM runlane_queues

-- name: job_limits
SELECT job, max_concurrency, rate_count, rate_period FROM runlane_job_limits

-- name: upsert_job_limits
INSERT INTO runlane_job_limits (job, max_concurrency, rate_count, rate_period, updated_at)
VALUES (?, ?, ?, ?, ?)
ON CONFLICT (job) DO UPDATE SET max_concurrency = excluded.max_concurrency, rate_count = excluded.rate_count,
    rate_period = excluded.rate_period, updated_at = excluded.updated_at

-- name: delete_job_limits
DELETE FROM runlane_job_limits WHERE job = ?

-- name: upsert_queue_limits
INSERT INTO runlane_queues (name, paused, max_concurrency, rate_count, rate_period, updated_at)
VALUES (?, 0, ?, ?, ?, ?)
ON CONFLICT (name) DO UPDATE SET max_concurrency = excluded.max_concurrency, rate_count = excluded.rate_count,
    rate_period = excluded.rate_period, updated_at = excluded.updated_at

-- name: set_paused
INSERT INTO runlane_queues (name, paused, updated_at) VALUES (?, ?, ?)
ON CONFLICT (name) DO UPDATE SET paused = excluded.paused, updated_at = excluded.updated_at

-- name: queue_counts
SELECT queue, status, count(*) FROM runlane_runs
WHERE status = 'scheduled' OR status = 'pending' OR status = 'running' OR status = 'retrying'
GROUP BY queue, status

-- name: running_runs
SELECT job, queue, concurrency_key FROM runlane_runs INDEXED BY runlane_runs_lease WHERE status = 'running'

-- name: rate_window
SELECT count(*), min(at) FROM runlane_rate_starts WHERE key = ? AND at > ?

-- name: rate_trim
DELETE FROM runlane_rate_starts WHERE key = ? AND at <= ?

-- name: rate_start
INSERT INTO runlane_rate_starts (key, at) VALUES (?, ?)

-- name: keyed_pending
SELECT 1 FROM runlane_runs INDEXED BY runlane_runs_keyed
WHERE status = 'pending' AND concurrency_key IS NOT NULL AND job = ?
LIMIT 1

-- name: limited_claim_arm
-- The claim arm of queries.sql, skipping runs of saturated (job, concurrency key) partitions.
SELECT {run_columns}, last_event_id, due_at, concurrency_key FROM runlane_runs INDEXED BY runlane_runs_claim
WHERE status = 'pending' AND queue = :queue AND due_at <= :now
  AND (not_after IS NULL OR not_after > :now)
  AND job IN (SELECT value FROM json_each(:jobs))
  AND (job || char(31) || coalesce(concurrency_key, '')) NOT IN (SELECT value FROM json_each(:full))
ORDER BY priority DESC, due_at, id LIMIT :limit
