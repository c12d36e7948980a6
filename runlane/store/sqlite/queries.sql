-- Named queries of the SQLite store. `-- name: x` starts query x; `{run_columns}` expands to the column list
-- that rows.run_from_row() reads, in the order of the Run record's fields.
-- The planner has no statistics (we never ANALYZE), so it would pick the (status, id) index for any
-- `status = …` term: `INDEXED BY` names the partial index a query is written for, and `+status` keeps a
-- status test from steering a lookup that should start from a list of ids.
-- Lists of ids travel as one JSON array parameter (json_each) so that every query text stays constant and
-- sqlite3's prepared-statement cache serves it whatever the list length.

-- name: run_columns
id, job, args, status, queue, priority, attempt, max_attempts, not_before, not_after, dedup_id, tags,
parent_run_id, root_run_id, batch_id, schedule_id, created_at, started_at, finished_at, progress,
progress_message, result, error, worker_id

-- name: migrations_table_exists
SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'runlane_migrations'

-- name: applied_version
SELECT coalesce(max(version), 0) FROM runlane_migrations

-- name: record_migration
INSERT INTO runlane_migrations (version, name, applied_at) VALUES (?, ?, ?)

-- name: register_job
INSERT INTO runlane_jobs (name, queue, options, args_schema, updated_at) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (name) DO UPDATE SET
    queue = excluded.queue, options = excluded.options, args_schema = excluded.args_schema,
    updated_at = excluded.updated_at

-- name: get_job
SELECT name, queue, options, args_schema FROM runlane_jobs WHERE name = ?

-- name: register_worker
INSERT INTO runlane_workers (id, info, started_at, last_seen_at) VALUES (?1, ?2, ?3, ?3)
ON CONFLICT (id) DO UPDATE SET info = excluded.info, last_seen_at = excluded.last_seen_at

-- name: deregister_worker
DELETE FROM runlane_workers WHERE id = ?

-- name: worker_seen
UPDATE runlane_workers SET last_seen_at = ? WHERE id = ?

-- name: last_run_id
SELECT seq FROM sqlite_sequence WHERE name = 'runlane_runs'

-- name: parents
SELECT id, root_run_id FROM runlane_runs WHERE id IN (SELECT value FROM json_each(?))

-- name: active_by_dedup
SELECT id FROM runlane_runs
WHERE dedup_id = ? AND dedup_id IS NOT NULL
  AND (status = 'scheduled' OR status = 'pending' OR status = 'running' OR status = 'retrying')

-- name: insert_run
INSERT INTO runlane_runs (id, job, args, status, queue, priority, max_attempts, not_before, not_after, due_at,
                          dedup_id, tags, parent_run_id, root_run_id, batch_id, schedule_id, created_at,
                          continue_when, concurrency_key)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)

-- name: get_run
SELECT {run_columns} FROM runlane_runs WHERE id = ?

-- name: get_runs
SELECT {run_columns} FROM runlane_runs WHERE id IN (SELECT value FROM json_each(?))

-- name: attempts
SELECT number, worker_id, started_at, finished_at, status, error FROM runlane_attempts
WHERE run_id = ? ORDER BY number

-- name: events
SELECT id, run_id, kind, at, data FROM runlane_events WHERE run_id = ? AND id > ? ORDER BY id LIMIT ?

-- name: run_states
SELECT id, status, attempt, lease_owner, last_event_id, max_attempts, lease_expires_at FROM runlane_runs
WHERE id IN (SELECT value FROM json_each(?))

-- name: insert_event
INSERT INTO runlane_events (run_id, id, kind, at, data) VALUES (?, ?, ?, ?, ?)

-- name: set_last_event
UPDATE runlane_runs SET last_event_id = ? WHERE id = ?

-- name: set_progress
UPDATE runlane_runs SET progress = ?, progress_message = ? WHERE id = ?

-- name: cancel_tree
-- The non-terminal runs among the given ids and every non-terminal descendant (through terminal ones
-- too), each with the seed it descends from. Continuations still waiting on their parent are not descended
-- into: the cancel decides them by their `when` rule (a `when="cancelled"` one starts).
WITH RECURSIVE tree (id, seed) AS (
    SELECT id, id FROM runlane_runs
    WHERE id IN (SELECT value FROM json_each(?)) AND status IN ('scheduled', 'pending', 'running', 'retrying')
    UNION
    SELECT r.id, tree.seed FROM runlane_runs AS r JOIN tree ON r.parent_run_id = tree.id
    WHERE NOT (r.continue_when IS NOT NULL AND +r.status = 'scheduled' AND r.due_at IS NULL)
)
SELECT r.id, tree.seed, r.status, r.attempt, r.last_event_id FROM tree JOIN runlane_runs AS r USING (id)
WHERE r.status IN ('scheduled', 'pending', 'running', 'retrying')

-- name: cancel_run
UPDATE runlane_runs SET status = 'cancelled', error = ?, finished_at = ?, lease_owner = NULL,
    lease_expires_at = NULL, last_event_id = ?
WHERE id = ?

-- name: end_attempt
UPDATE runlane_attempts SET status = ?, finished_at = ?, error = ? WHERE run_id = ? AND number = ?

-- name: retry_state
SELECT status, attempt, last_event_id, dedup_id FROM runlane_runs WHERE id = ?

-- name: retry_run
UPDATE runlane_runs SET status = 'pending', max_attempts = max(max_attempts, attempt + 1), due_at = ?,
    finished_at = NULL, result = NULL, error = NULL, progress = NULL, progress_message = NULL,
    last_event_id = ?
WHERE id = ?

-- name: due_waiting
SELECT id, status, attempt, last_event_id FROM runlane_runs INDEXED BY runlane_runs_waiting
WHERE status IN ('scheduled', 'retrying') AND due_at <= ?

-- name: promote
UPDATE runlane_runs SET status = 'pending', last_event_id = ? WHERE id = ?

-- name: claim_arm
-- One arm per queue (`:queue` becomes :q0, :q1, …): an ordered scan of the claim index that stops at LIMIT.
SELECT {run_columns}, last_event_id, due_at FROM runlane_runs
WHERE status = 'pending' AND queue = :queue AND due_at <= :now
  AND (not_after IS NULL OR not_after > :now)
  AND job IN (SELECT value FROM json_each(:jobs))
ORDER BY priority DESC, due_at, id LIMIT :limit

-- name: claim_update
-- Not UPDATE … RETURNING: selecting the rows first and updating by id costs about half as much per run.
UPDATE runlane_runs SET status = 'running', attempt = attempt + 1, worker_id = :worker, lease_owner = :worker,
    lease_expires_at = :expires, started_at = :now, last_event_id = last_event_id + 1,
    progress = NULL, progress_message = NULL  -- progress belongs to the attempt that reports it
WHERE id IN (SELECT value FROM json_each(:ids))

-- name: insert_attempt
INSERT INTO runlane_attempts (run_id, number, worker_id, started_at, status) VALUES (?, ?, ?, ?, 'running')

-- name: heartbeat
UPDATE runlane_runs SET lease_expires_at = :expires
FROM (SELECT value ->> 0 AS lease_run_id, value ->> 1 AS lease_attempt FROM json_each(:leases)) AS lease
WHERE runlane_runs.id = lease.lease_run_id AND runlane_runs.attempt = lease.lease_attempt
  AND +runlane_runs.status = 'running' AND runlane_runs.lease_owner = :worker
  AND +runlane_runs.lease_expires_at > :now  -- an expired lease is not renewed, even before the reaper comes
RETURNING runlane_runs.id

-- name: held_leases
SELECT r.id FROM runlane_runs AS r
JOIN (SELECT value ->> 0 AS lease_run_id, value ->> 1 AS lease_attempt FROM json_each(:leases)) AS lease
  ON r.id = lease.lease_run_id AND r.attempt = lease.lease_attempt
WHERE +r.status = 'running' AND r.lease_owner = :worker AND +r.lease_expires_at > :now

-- name: finish_terminal
UPDATE runlane_runs SET status = ?, result = ?, error = ?, finished_at = ?, lease_owner = NULL,
    lease_expires_at = NULL, last_event_id = ?
WHERE id = ? AND attempt = ? AND status = 'running' AND lease_owner = ?

-- name: finish_retrying
UPDATE runlane_runs SET status = 'retrying', error = ?, due_at = ?, lease_owner = NULL, lease_expires_at = NULL,
    last_event_id = ?
WHERE id = ? AND attempt = ? AND status = 'running' AND lease_owner = ?

-- name: release
UPDATE runlane_runs SET status = 'pending', attempt = attempt - 1, lease_owner = NULL, lease_expires_at = NULL,
    last_event_id = last_event_id + 1, progress = NULL, progress_message = NULL,
    worker_id = (SELECT a.worker_id FROM runlane_attempts AS a
                 WHERE a.run_id = runlane_runs.id AND a.number = runlane_runs.attempt - 1),
    started_at = (SELECT a.started_at FROM runlane_attempts AS a
                  WHERE a.run_id = runlane_runs.id AND a.number = runlane_runs.attempt - 1)
FROM (SELECT value ->> 0 AS lease_run_id, value ->> 1 AS lease_attempt FROM json_each(:leases)) AS lease
WHERE runlane_runs.id = lease.lease_run_id AND runlane_runs.attempt = lease.lease_attempt
  AND +runlane_runs.status = 'running' AND runlane_runs.lease_owner = :worker
RETURNING runlane_runs.id, runlane_runs.attempt, runlane_runs.last_event_id

-- name: delete_attempt
DELETE FROM runlane_attempts WHERE run_id = ? AND number = ?

-- name: expired_leases
SELECT id, attempt, max_attempts, lease_owner, last_event_id FROM runlane_runs INDEXED BY runlane_runs_lease
WHERE status = 'running' AND lease_expires_at < ?

-- name: reap_run
UPDATE runlane_runs SET status = ?, error = ?, finished_at = ?, due_at = ?, lease_owner = NULL,
    lease_expires_at = NULL, last_event_id = ?
WHERE id = ? AND attempt = ? AND status = 'running'

-- name: past_not_after
SELECT id, status, attempt, last_event_id, not_after FROM runlane_runs INDEXED BY runlane_runs_not_after
WHERE not_after IS NOT NULL AND (status = 'scheduled' OR status = 'pending' OR status = 'retrying')
  AND not_after <= ?

-- name: next_due_at
SELECT min(due_at) FROM runlane_runs INDEXED BY runlane_runs_waiting
WHERE status IN ('scheduled', 'retrying') AND due_at IS NOT NULL
  AND queue IN (SELECT value FROM json_each(?)) AND job IN (SELECT value FROM json_each(?))

-- name: prune
-- Terminal runs finished before the cut-off, except ancestors of a non-terminal run, a bounded batch at a
-- time so that a large prune never holds the write lock for long. Attempts and events go by ON DELETE CASCADE.
-- (The CTE sits inside the subquery: sqlite3 reports no rowcount for a statement that starts with WITH.)
DELETE FROM runlane_runs WHERE id IN (
    WITH RECURSIVE ancestor (id) AS (
        SELECT parent_run_id FROM runlane_runs
        WHERE parent_run_id IS NOT NULL AND status IN ('scheduled', 'pending', 'running', 'retrying')
        UNION
        SELECT r.parent_run_id FROM runlane_runs AS r JOIN ancestor ON r.id = ancestor.id
        WHERE r.parent_run_id IS NOT NULL
    )
    SELECT id FROM runlane_runs INDEXED BY runlane_runs_finished
    WHERE finished_at < ? AND status IN ('succeeded', 'failed', 'cancelled', 'skipped')
      AND id NOT IN (SELECT id FROM ancestor)
    LIMIT ?
)

-- name: waiting_continuations
-- Continuations still waiting on one of the given runs, once that run is terminal.
SELECT c.id, c.continue_when, c.attempt, c.last_event_id, c.not_before, p.id, p.status
FROM runlane_runs AS p
JOIN runlane_runs AS c INDEXED BY runlane_runs_waiting_continuations
  ON c.parent_run_id = p.id AND c.continue_when IS NOT NULL AND c.status = 'scheduled'
WHERE p.id IN (SELECT value FROM json_each(?))
  AND (p.status = 'succeeded' OR p.status = 'failed' OR p.status = 'cancelled' OR p.status = 'skipped')
  AND c.due_at IS NULL
ORDER BY c.id

-- name: start_continuation
UPDATE runlane_runs SET status = ?, due_at = ?, last_event_id = ?
WHERE id = ? AND status = 'scheduled' AND due_at IS NULL

-- name: insert_batch
INSERT INTO runlane_batches (created_at, parent_run_id) VALUES (?, ?) RETURNING id

-- name: set_batch_counts
UPDATE runlane_batches SET total = ?, scheduled = ?, pending = ? WHERE id = ?

-- name: get_batch
SELECT id, created_at, parent_run_id, total, scheduled, pending, running, retrying, succeeded, failed,
       cancelled, skipped, finish_seq
FROM runlane_batches WHERE id = ?

-- name: batch_runs
SELECT batch_seq, {run_columns} FROM runlane_runs INDEXED BY runlane_runs_batch_seq
WHERE batch_id = ? AND batch_seq IS NOT NULL AND batch_seq > ? AND batch_seq <= ?
ORDER BY batch_seq LIMIT ?
