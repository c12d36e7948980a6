-- Named queries of the PostgreSQL store, loaded by queries.py.
--
-- Placeholders expanded once at load time: {now} is the store's clock (the injected one when given, else the
-- database's now(), so one host decides "due" and "expired"); {run_columns} is the Run record's columns of
-- alias r; {active} / {terminal} are status lists. Parameters use psycopg's %(name)s style.
--
-- Batched verbs take parallel arrays and UNNEST them: one statement per batch, whatever its size. Every
-- worker write is fenced on (run id, attempt, lease owner). Statements that change rows notify their channels
-- from a one-row pg_notify subquery that is CROSS JOINed (so it runs) and gated on "some row changed": no
-- extra round trip, one NOTIFY per channel, and PostgreSQL delivers a transaction's duplicates once.

-- name: insert_runs
-- Ids are drawn in input order before the insert, so that a root's root_run_id can be its own id. Only what
-- the database decides comes back; the rest of each Run is the caller's input. The runs travel as one JSON
-- document of positional rows (see insert.py `rows_document`): one json.dumps on the client instead of
-- fourteen arrays built element by element, and the arguments are embedded, not encoded twice.
-- The sequence is looked up once (an InitPlan): pg_get_serial_sequence per row cost ~3 us of the ~14 us
-- each row takes on the server.
WITH src AS MATERIALIZED (
    SELECT u.r ->> 0 AS job, u.r -> 1 AS args, u.r ->> 2 AS queue, (u.r ->> 3)::int AS priority,
           (u.r ->> 4)::int AS max_attempts, (u.r ->> 5)::timestamptz AS not_before,
           (u.r ->> 6)::timestamptz AS not_after, u.r ->> 7 AS dedup_id, u.r ->> 8 AS tags,
           (u.r ->> 9)::bigint AS parent_run_id, (u.r ->> 10)::bigint AS batch_id, u.r ->> 11 AS schedule_id,
           u.r ->> 12 AS continue_when, u.r ->> 13 AS concurrency_key, u.ord,
           nextval((SELECT pg_get_serial_sequence('runlane_runs', 'id'))::regclass) AS id
    FROM jsonb_array_elements(%(rows)s::jsonb) WITH ORDINALITY AS u(r, ord)
), ins AS (
    INSERT INTO runlane_runs AS r (id, job, args, status, queue, priority, max_attempts, not_before, not_after,
                                   dedup_id, tags, parent_run_id, root_run_id, batch_id, schedule_id,
                                   created_at, due_at, continue_when, concurrency_key)
    OVERRIDING SYSTEM VALUE
    SELECT s.id, s.job, s.args,
           CASE WHEN s.continue_when IS NOT NULL OR s.not_before > {now} THEN 'scheduled' ELSE 'pending' END,
           s.queue, s.priority, s.max_attempts, s.not_before, s.not_after, s.dedup_id, s.tags::text[],
           s.parent_run_id,
           CASE WHEN s.parent_run_id IS NULL THEN s.id
                ELSE (SELECT p.root_run_id FROM runlane_runs p WHERE p.id = s.parent_run_id) END,
           s.batch_id, s.schedule_id, {now},
           -- A continuation waits for its parent, not for a time.
           CASE WHEN s.continue_when IS NOT NULL THEN 'infinity' ELSE coalesce(s.not_before, {now}) END,
           s.continue_when, s.concurrency_key
    FROM src s
    ORDER BY s.ord
    ON CONFLICT (dedup_id) WHERE dedup_id IS NOT NULL AND status IN {active} DO NOTHING
    RETURNING r.id, r.status, r.root_run_id, r.created_at
), note AS (
    SELECT count(pg_notify(ch, %(token)s)) AS n FROM unnest(%(channels)s::text[]) AS ch
    WHERE EXISTS (SELECT 1 FROM ins)
)
SELECT s.ord, i.id, i.status, i.root_run_id, i.created_at
FROM src s LEFT JOIN ins i ON i.id = s.id CROSS JOIN note
ORDER BY s.ord;

-- name: insert_one
-- insert_runs for one run, with scalar parameters: no unnest, no ordering, and a plan that PostgreSQL can
-- cache (insert_runs is planned again on every call), at half its cost per trigger.
WITH ins AS (
    INSERT INTO runlane_runs AS r (id, job, args, status, queue, priority, max_attempts, not_before, not_after,
                                   dedup_id, tags, parent_run_id, root_run_id, batch_id, schedule_id,
                                   created_at, due_at, continue_when, concurrency_key)
    OVERRIDING SYSTEM VALUE
    SELECT s.id, %(job)s::text, %(args)s::jsonb,
           CASE WHEN %(continue_when)s::text IS NOT NULL OR %(not_before)s::timestamptz > {now}
                THEN 'scheduled' ELSE 'pending' END,
           %(queue)s::text, %(priority)s::int, %(max_attempts)s::int, %(not_before)s::timestamptz,
           %(not_after)s::timestamptz, %(dedup_id)s::text, %(tags)s::text[], %(parent_run_id)s::bigint,
           CASE WHEN %(parent_run_id)s::bigint IS NULL THEN s.id
                ELSE (SELECT p.root_run_id FROM runlane_runs p WHERE p.id = %(parent_run_id)s::bigint) END,
           %(batch_id)s::bigint, %(schedule_id)s::text, {now},
           CASE WHEN %(continue_when)s::text IS NOT NULL THEN 'infinity'
                ELSE coalesce(%(not_before)s::timestamptz, {now}) END,
           %(continue_when)s::text, %(concurrency_key)s::text
    FROM (SELECT nextval(pg_get_serial_sequence('runlane_runs', 'id')) AS id) AS s
    ON CONFLICT (dedup_id) WHERE dedup_id IS NOT NULL AND status IN {active} DO NOTHING
    RETURNING r.id, r.status, r.root_run_id, r.created_at
), note AS (
    SELECT count(pg_notify(ch, %(token)s)) AS n FROM unnest(%(channels)s::text[]) AS ch
    WHERE EXISTS (SELECT 1 FROM ins)
)
SELECT 1, i.id, i.status, i.root_run_id, i.created_at
FROM (SELECT 1) AS one LEFT JOIN ins i ON true CROSS JOIN note;

-- name: insert_plain
-- insert_one for the common trigger: no dedup id, parent, batch, schedule, time window or limit key. Nothing
-- can conflict, so no ON CONFLICT arbiter; eight parameters instead of seventeen and a constant channel:
-- psycopg's parameter dumping was a sixth of the client's time per trigger.
WITH ins AS (
    INSERT INTO runlane_runs AS r (id, job, args, status, queue, priority, max_attempts, tags, root_run_id,
                                   created_at, due_at)
    OVERRIDING SYSTEM VALUE
    SELECT s.id, %(job)s::text, %(args)s::jsonb, 'pending', %(queue)s::text, %(priority)s::int,
           %(max_attempts)s::int, %(tags)s::text[], s.id, {now}, {now}
    FROM (SELECT nextval(pg_get_serial_sequence('runlane_runs', 'id')) AS id) AS s
    RETURNING r.id, r.status, r.root_run_id, r.created_at
), note AS (
    SELECT pg_notify('runlane_work', %(token)s)
)
SELECT 1, i.id, i.status, i.root_run_id, i.created_at FROM ins i CROSS JOIN note;

-- name: missing_parents
SELECT p FROM unnest(%(ids)s::bigint[]) AS p
WHERE NOT EXISTS (SELECT 1 FROM runlane_runs WHERE id = p);

-- name: active_by_dedup
SELECT {run_columns} FROM runlane_runs r WHERE r.dedup_id = ANY(%(dedup_ids)s::text[]) AND r.status IN {active};

-- name: get_runs
SELECT {run_columns} FROM runlane_runs r WHERE r.id = ANY(%(ids)s::bigint[]);

-- name: attempts
SELECT number, worker_id, started_at, finished_at, status, error
FROM runlane_attempts WHERE run_id = %(run_id)s ORDER BY number;

-- name: events
SELECT id, run_id, kind, at, data FROM runlane_events
WHERE run_id = %(run_id)s AND id > %(since)s ORDER BY id LIMIT %(limit)s;

-- name: append_events
WITH g AS (
    SELECT * FROM unnest(%(g_run)s::bigint[], %(g_attempt)s::int[], %(g_count)s::int[],
                         %(g_has_progress)s::bool[], %(g_progress)s::float8[], %(g_message)s::text[])
        AS g(run_id, attempt, n, has_progress, progress, message)
), upd AS (
    UPDATE runlane_runs r
    SET last_event_id = r.last_event_id + g.n,
        progress = CASE WHEN g.has_progress THEN g.progress ELSE r.progress END,
        progress_message = CASE WHEN g.has_progress THEN g.message ELSE r.progress_message END
    FROM g
    WHERE r.id = g.run_id
      AND CASE WHEN g.attempt IS NULL THEN r.status IN {active}
               ELSE r.status = 'running' AND r.attempt = g.attempt AND r.lease_owner = %(worker)s
                    AND r.lease_expires_at > {now} END
    RETURNING r.id, r.last_event_id - g.n AS base
), ins AS (
    INSERT INTO runlane_events (run_id, id, kind, at, data)
    SELECT e.run_id, upd.base + e.seq, e.kind, coalesce(e.at, {now}), e.data::jsonb
    FROM unnest(%(e_run)s::bigint[], %(e_seq)s::int[], %(e_kind)s::text[], %(e_at)s::timestamptz[],
                %(e_data)s::text[]) AS e(run_id, seq, kind, at, data)
    JOIN upd ON upd.id = e.run_id
), note AS (
    SELECT count(pg_notify(ch, %(token)s)) AS n FROM unnest(%(channels)s::text[]) AS ch
    WHERE EXISTS (SELECT 1 FROM upd)
)
SELECT upd.id FROM upd CROSS JOIN note;

-- name: _promote_ctes
-- A fragment (a name starting with "_" is spliced into the queries that name it in braces): due
-- scheduled and retrying runs made pending, their events and the notification.
due AS MATERIALIZED (
    SELECT id, status FROM runlane_runs
    WHERE status IN ('scheduled', 'retrying') AND due_at <= {now}
    ORDER BY due_at
    LIMIT %(promote_limit)s
    FOR UPDATE SKIP LOCKED
), promoted AS (
    UPDATE runlane_runs r SET status = 'pending', last_event_id = r.last_event_id + 1
    -- By primary key (see claimed below); joined to due only for the old status.
    FROM due WHERE r.id = ANY(ARRAY(SELECT id FROM due)) AND r.id = due.id
    RETURNING r.id, r.attempt, r.last_event_id, due.status AS old
), promoted_ev AS (
    INSERT INTO runlane_events (run_id, id, kind, at, data)
    SELECT id, last_event_id, 'status', {now},
           jsonb_build_object('from', old, 'to', 'pending', 'attempt', attempt, 'reason', NULL)
    FROM promoted
), promoted_note AS (
    SELECT count(pg_notify(ch, %(token)s)) AS n FROM unnest(%(promote_channels)s::text[]) AS ch
    WHERE EXISTS (SELECT 1 FROM promoted)
)

-- name: promote_due
WITH {_promote_ctes}
SELECT count(*) FROM promoted CROSS JOIN promoted_note;

-- name: _claim_ctes
-- A fragment: the claim's candidates, the claimed runs, their attempts, events and notification.
-- Candidates are materialised: written as "id IN (SELECT … LIMIT n FOR UPDATE SKIP LOCKED)" the planner may
-- run the locking subquery more than once and lock (and claim) more than n rows. Each queue's candidates come
-- from an ordered scan of the partial index runlane_runs_claim (queue = one value keeps the index order, which
-- "queue = ANY(…)" would lose, sorting every pending run of the queues instead); the outer ORDER BY merges
-- the queues. With k queues up to k·n rows are locked for the instant of this transaction, n are claimed.
-- Queues that are paused or limited and jobs that are limited are left to the limit-aware claim (flow.py);
-- with no job left, no queue is read (the scan would walk every pending run of the queue to find none).
open_jobs AS MATERIALIZED (
    SELECT coalesce(array_agg(u.job), '{}'::text[]) AS jobs FROM unnest(%(jobs)s::text[]) AS u(job)
    WHERE NOT EXISTS (SELECT 1 FROM runlane_job_limits l WHERE l.job = u.job)
), open_queues AS MATERIALIZED (
    SELECT u.queue FROM unnest(%(queues)s::text[]) AS u(queue)
    WHERE NOT EXISTS (SELECT 1 FROM runlane_queues g WHERE g.name = u.queue
                      AND (g.paused OR g.max_concurrency IS NOT NULL OR g.rate_count IS NOT NULL))
      AND (SELECT cardinality(jobs) FROM open_jobs) > 0
), candidates AS MATERIALIZED (
    SELECT c.id FROM open_queues AS q
    CROSS JOIN LATERAL (
        SELECT id, priority, due_at FROM runlane_runs
        WHERE status = 'pending' AND queue = q.queue AND job = ANY((SELECT jobs FROM open_jobs)::text[])
          AND due_at <= {now} AND (not_after IS NULL OR not_after > {now})
        ORDER BY priority DESC, due_at, id
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    ) AS c
    ORDER BY c.priority DESC, c.due_at, c.id
    LIMIT %(limit)s
), claimed AS (
    UPDATE runlane_runs r
    SET status = 'running', attempt = r.attempt + 1, worker_id = %(worker)s, lease_owner = %(worker)s,
        lease_expires_at = {now} + make_interval(secs => %(lease_timeout)s), started_at = {now},
        last_event_id = r.last_event_id + 1,
        progress = NULL, progress_message = NULL  -- progress belongs to the attempt that reports it
    -- By primary key, not joined to the candidates: a generic plan made from statistics that saw a backlog
    -- guesses hundreds of candidates and hashes a sequential scan of every run (7.0 against 0.7 ms).
    WHERE r.id = ANY(ARRAY(SELECT id FROM candidates))
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

-- name: claim
WITH {_claim_ctes}
SELECT {run_columns} FROM claimed r CROSS JOIN note
ORDER BY r.priority DESC, r.due_at, r.id;

-- name: promote_and_claim
-- A claim with no finishes to carry (an idle worker woken, or polling): the promotion of due runs and the
-- claim as one autocommit statement, without a pipeline, BEGIN and COMMIT (a woken claim 1.8 -> 1.46 ms).
-- They see one snapshot, so runs promoted here are claimed by the next claim (store.py goes again when
-- some were). The two lock disjoint rows (scheduled/retrying, pending). The first column is how many were
-- promoted; the claimed runs follow, or NULLs when none was claimed.
WITH {_promote_ctes}, {_claim_ctes}, counted AS (
    SELECT (SELECT count(*) FROM promoted) AS promoted FROM promoted_note CROSS JOIN note
)
SELECT counted.promoted, {run_columns} FROM counted LEFT JOIN claimed r ON true
ORDER BY r.priority DESC, r.due_at, r.id;

-- name: heartbeat
WITH l AS (
    SELECT * FROM unnest(%(run)s::bigint[], %(attempt)s::int[]) AS l(run_id, attempt)
), upd AS (
    UPDATE runlane_runs r SET lease_expires_at = {now} + make_interval(secs => %(lease_timeout)s)
    FROM l
    WHERE r.id = l.run_id AND r.attempt = l.attempt AND coalesce(r.status, '') = 'running'
      AND r.lease_owner = %(worker)s  -- by primary key, see finish_attempts
      AND r.lease_expires_at > {now}  -- an expired lease is not renewed, even before the reaper comes
    RETURNING r.id
), seen AS (
    UPDATE runlane_workers SET last_seen_at = {now} WHERE id = %(worker)s
)
SELECT id FROM upd;

-- name: held_leases
SELECT r.id FROM runlane_runs r
JOIN unnest(%(run)s::bigint[], %(attempt)s::int[]) AS l(run_id, attempt)
  ON r.id = l.run_id AND r.attempt = l.attempt
WHERE coalesce(r.status, '') = 'running' AND r.lease_owner = %(worker)s  -- by primary key, see finish_attempts
  AND r.lease_expires_at > {now};

-- name: finish_attempts
-- The finishes and their events travel as two JSON documents of positional rows (rows.py `finish_params`):
-- one json.dumps on the worker instead of fifteen arrays built element by element; results, errors and
-- event data are embedded, not encoded twice.
WITH f AS (
    SELECT (x.r ->> 0)::bigint AS run_id, (x.r ->> 1)::int AS attempt, x.r ->> 2 AS outcome,
           x.r -> 3 AS result, nullif(x.r -> 4, 'null'::jsonb) AS error, (x.r ->> 5)::float8 AS delay,
           (x.r ->> 6)::int AS n, (x.r ->> 7)::bool AS has_progress, (x.r ->> 8)::float8 AS progress,
           x.r ->> 9 AS message
    FROM jsonb_array_elements(%(finishes)s::jsonb) AS x(r)
), upd AS (
    UPDATE runlane_runs r
    SET status = f.outcome,
        result = CASE WHEN f.outcome = 'succeeded' THEN f.result END,
        error = CASE WHEN f.outcome = 'succeeded' THEN NULL ELSE f.error END,
        finished_at = CASE WHEN f.outcome = 'retrying' THEN NULL ELSE {now} END,
        due_at = CASE WHEN f.outcome = 'retrying' THEN {now} + make_interval(secs => f.delay) ELSE r.due_at END,
        lease_owner = NULL, lease_expires_at = NULL,
        progress = CASE WHEN f.has_progress THEN f.progress ELSE r.progress END,
        progress_message = CASE WHEN f.has_progress THEN f.message ELSE r.progress_message END,
        last_event_id = r.last_event_id + f.n + 1
    FROM f
    -- The fence is checked on the row found by primary key: written as a plain "status = 'running'" it
    -- lets the planner scan the partial lease index instead, which holds every run that was running since
    -- the last vacuum (dead entries included) and costs O(runs finished) during a drain.
    -- An expired lease fences too, reaped or not: its owner has stopped the attempt (heartbeat.py) and a
    -- statement it sent before losing the store may reach the server only now (T08).
    -- The ids again as an array: the planner guesses 100 rows for jsonb_array_elements and, without it,
    -- chose a hash join over a sequential scan of every run (1.5 ms for 16 finishes among 8,000 runs).
    WHERE r.id = ANY(%(ids)s::bigint[]) AND r.id = f.run_id AND coalesce(r.status, '') = 'running'
      AND r.attempt = f.attempt
      AND r.lease_owner = %(worker)s AND r.lease_expires_at > {now}
    RETURNING r.id, r.attempt, r.last_event_id, f.outcome, f.n, r.error
), att AS (
    UPDATE runlane_attempts a
    SET status = CASE WHEN upd.outcome = 'retrying' THEN 'failed' ELSE upd.outcome END,
        finished_at = {now}, error = upd.error
    FROM upd WHERE a.run_id = upd.id AND a.number = upd.attempt
), ev AS (
    INSERT INTO runlane_events (run_id, id, kind, at, data)
    SELECT e.run_id, upd.last_event_id - upd.n - 1 + e.seq, e.kind, coalesce(e.at, {now}), e.data
    FROM (SELECT (x.r ->> 0)::bigint AS run_id, (x.r ->> 1)::int AS seq, x.r ->> 2 AS kind,
                 (x.r ->> 3)::timestamptz AS at, x.r -> 4 AS data
          FROM jsonb_array_elements(%(events)s::jsonb) AS x(r)) AS e
    JOIN upd ON upd.id = e.run_id
    UNION ALL
    SELECT id, last_event_id, 'status', {now},
           jsonb_build_object('from', 'running', 'to', outcome, 'attempt', attempt, 'reason', NULL)
    FROM upd
), note AS (
    SELECT count(pg_notify(ch, %(token)s)) AS n FROM unnest(%(channels)s::text[]) AS ch
    WHERE EXISTS (SELECT 1 FROM upd)
)
SELECT upd.id FROM upd CROSS JOIN note;

-- name: release_runs
WITH l AS (
    SELECT * FROM unnest(%(run)s::bigint[], %(attempt)s::int[]) AS l(run_id, attempt)
), upd AS (
    UPDATE runlane_runs r
    SET status = 'pending', attempt = r.attempt - 1, lease_owner = NULL, lease_expires_at = NULL,
        progress = NULL, progress_message = NULL,
        worker_id = (SELECT a.worker_id FROM runlane_attempts a WHERE a.run_id = r.id AND a.number = r.attempt - 1),
        started_at = (SELECT a.started_at FROM runlane_attempts a WHERE a.run_id = r.id AND a.number = r.attempt - 1),
        last_event_id = r.last_event_id + 1
    FROM l
    WHERE r.id = l.run_id AND r.attempt = l.attempt AND coalesce(r.status, '') = 'running'
      AND r.lease_owner = %(worker)s  -- by primary key, see finish_attempts
    RETURNING r.id, r.attempt, l.attempt AS released, r.last_event_id
), att AS (
    DELETE FROM runlane_attempts a USING upd WHERE a.run_id = upd.id AND a.number = upd.released
), ev AS (
    INSERT INTO runlane_events (run_id, id, kind, at, data)
    SELECT id, last_event_id, 'status', {now},
           jsonb_build_object('from', 'running', 'to', 'pending', 'attempt', attempt, 'reason', 'released by worker ' || %(worker)s)
    FROM upd
), note AS (
    SELECT count(pg_notify(ch, %(token)s)) AS n FROM unnest(%(channels)s::text[]) AS ch
    WHERE EXISTS (SELECT 1 FROM upd)
)
SELECT upd.id FROM upd CROSS JOIN note;

-- name: reap_expired_leases
WITH lost AS MATERIALIZED (
    SELECT id FROM runlane_runs
    WHERE status = 'running' AND lease_expires_at < {now}
    ORDER BY id
    FOR UPDATE SKIP LOCKED
), upd AS (
    UPDATE runlane_runs r
    SET status = CASE WHEN r.attempt < r.max_attempts THEN 'pending' ELSE 'failed' END,
        error = jsonb_build_object('type', 'WorkerLost', 'traceback', NULL, 'message',
                                   'worker ' || coalesce(r.lease_owner, '?') || ' lost its lease (no heartbeat)'),
        finished_at = CASE WHEN r.attempt < r.max_attempts THEN NULL ELSE {now} END,
        lease_owner = NULL, lease_expires_at = NULL, last_event_id = r.last_event_id + 1
    FROM lost WHERE r.id = lost.id
    RETURNING r.id, r.attempt, r.status, r.error, r.last_event_id
), att AS (
    UPDATE runlane_attempts a SET status = 'failed', finished_at = {now}, error = upd.error
    FROM upd WHERE a.run_id = upd.id AND a.number = upd.attempt
), ev AS (
    INSERT INTO runlane_events (run_id, id, kind, at, data)
    SELECT id, last_event_id, 'status', {now},
           jsonb_build_object('from', 'running', 'to', status, 'attempt', attempt, 'reason', 'worker lost')
    FROM upd
), note AS (
    SELECT count(pg_notify(ch, %(token)s)) AS n FROM unnest(%(channels)s::text[]) AS ch
    WHERE EXISTS (SELECT 1 FROM upd)
)
SELECT upd.id FROM upd CROSS JOIN note;

-- name: expire_runs
WITH late AS MATERIALIZED (
    SELECT id, status FROM runlane_runs
    WHERE not_after IS NOT NULL AND not_after <= {now} AND status IN ('scheduled', 'pending', 'retrying')
    ORDER BY id
    FOR UPDATE SKIP LOCKED
), upd AS (
    UPDATE runlane_runs r
    SET status = 'cancelled', finished_at = {now}, last_event_id = r.last_event_id + 1,
        error = jsonb_build_object('type', 'Expired', 'traceback', NULL,
                                   'message', 'not_after passed before the run started')
    FROM late WHERE r.id = late.id
    RETURNING r.id, r.attempt, r.last_event_id, late.status AS old
), ev AS (
    INSERT INTO runlane_events (run_id, id, kind, at, data)
    SELECT id, last_event_id, 'status', {now},
           jsonb_build_object('from', old, 'to', 'cancelled', 'attempt', attempt, 'reason', 'expired')
    FROM upd
), note AS (
    SELECT count(pg_notify(ch, %(token)s)) AS n FROM unnest(%(channels)s::text[]) AS ch
    WHERE EXISTS (SELECT 1 FROM upd)
)
SELECT upd.id FROM upd CROSS JOIN note;

-- name: cancel_runs
-- Rows are locked in id order so that two overlapping cancels cannot deadlock each other. Continuations still
-- waiting on their parent are not descended into: resolve_continuations decides them after this statement.
-- Only non-terminal runs seed the cascade: cancelling a run that already ended changes nothing (as on SQLite).
WITH RECURSIVE tree(id, origin, depth) AS (
    SELECT id, id, 0 FROM runlane_runs WHERE id = ANY(%(ids)s::bigint[]) AND status IN {active}
    UNION
    SELECT c.id, t.origin, t.depth + 1 FROM runlane_runs c JOIN tree t ON c.parent_run_id = t.id
    WHERE NOT (c.continue_when IS NOT NULL AND c.status = 'scheduled' AND c.due_at = 'infinity')
), locked AS MATERIALIZED (
    SELECT r.id, r.status FROM runlane_runs r
    WHERE r.id IN (SELECT id FROM tree) AND r.status IN {active}
    ORDER BY r.id
    FOR UPDATE
), upd AS (
    UPDATE runlane_runs r
    SET status = 'cancelled', finished_at = {now}, lease_owner = NULL, lease_expires_at = NULL,
        last_event_id = r.last_event_id + 1,
        error = jsonb_build_object('type', 'Cancelled', 'traceback', NULL, 'message',
            CASE WHEN r.id = ANY(%(ids)s::bigint[]) THEN %(reason)s
                 ELSE 'cancelled by cascade from run '
                      || (SELECT t.origin FROM tree t WHERE t.id = r.id ORDER BY t.depth LIMIT 1) END)
    FROM locked WHERE r.id = locked.id
    RETURNING r.id, r.attempt, r.last_event_id, r.error, locked.status AS old
), att AS (
    UPDATE runlane_attempts a SET status = 'cancelled', finished_at = {now}, error = upd.error
    FROM upd WHERE upd.old = 'running' AND a.run_id = upd.id AND a.number = upd.attempt
), ev AS (
    INSERT INTO runlane_events (run_id, id, kind, at, data)
    SELECT id, last_event_id, 'status', {now},
           jsonb_build_object('from', old, 'to', 'cancelled', 'attempt', attempt, 'reason', error ->> 'message')
    FROM upd
), note AS (
    SELECT count(pg_notify(ch, %(token)s)) AS n FROM unnest(%(channels)s::text[]) AS ch
    WHERE EXISTS (SELECT 1 FROM upd)
      AND (ch <> 'runlane_cancel' OR EXISTS (SELECT 1 FROM upd WHERE old = 'running'))
)
SELECT upd.id, upd.old FROM upd CROSS JOIN note;

-- name: retry_run
WITH old AS MATERIALIZED (
    SELECT id, status FROM runlane_runs WHERE id = %(id)s AND status IN ('failed', 'cancelled') FOR UPDATE
), upd AS (
    UPDATE runlane_runs r
    SET status = 'pending', max_attempts = greatest(r.max_attempts, r.attempt + 1), due_at = {now},
        finished_at = NULL, result = NULL, error = NULL, progress = NULL, progress_message = NULL,
        lease_owner = NULL, lease_expires_at = NULL, last_event_id = r.last_event_id + 1
    FROM old WHERE r.id = old.id
    RETURNING r.id, r.attempt, r.last_event_id, old.status AS old
), ev AS (
    INSERT INTO runlane_events (run_id, id, kind, at, data)
    SELECT id, last_event_id, 'status', {now},
           jsonb_build_object('from', old, 'to', 'pending', 'attempt', attempt, 'reason', 'retried by user')
    FROM upd
), note AS (
    SELECT count(pg_notify(ch, %(token)s)) AS n FROM unnest(%(channels)s::text[]) AS ch
    WHERE EXISTS (SELECT 1 FROM upd)
)
SELECT upd.id FROM upd CROSS JOIN note;

-- name: run_status
SELECT status FROM runlane_runs WHERE id = %(id)s;

-- name: next_due_at
SELECT min(due_at) FROM runlane_runs
WHERE status IN ('scheduled', 'retrying') AND due_at < 'infinity'
  AND queue = ANY(%(queues)s::text[]) AND job = ANY(%(jobs)s::text[]);

-- name: prune
-- Terminal runs stay while any descendant is active: walk up from every active child to all its ancestors.
WITH RECURSIVE keep(id) AS (
    SELECT parent_run_id FROM runlane_runs WHERE status IN {active} AND parent_run_id IS NOT NULL
    UNION
    SELECT r.parent_run_id FROM runlane_runs r JOIN keep k ON r.id = k.id WHERE r.parent_run_id IS NOT NULL
), doomed AS MATERIALIZED (
    SELECT id FROM runlane_runs
    WHERE status IN {terminal} AND finished_at < %(older_than)s AND id NOT IN (SELECT id FROM keep)
), gone_events AS (
    DELETE FROM runlane_events e USING doomed d WHERE e.run_id = d.id
), gone_attempts AS (
    DELETE FROM runlane_attempts a USING doomed d WHERE a.run_id = d.id
), gone AS (
    DELETE FROM runlane_runs r USING doomed d WHERE r.id = d.id RETURNING r.id
)
SELECT count(*) FROM gone;

-- name: register_jobs
INSERT INTO runlane_jobs AS j (name, queue, options, args_schema, updated_at)
SELECT u.name, u.queue, u.options::jsonb, u.args_schema::jsonb, {now}
FROM unnest(%(name)s::text[], %(queue)s::text[], %(options)s::text[], %(args_schema)s::text[])
     AS u(name, queue, options, args_schema)
ON CONFLICT (name) DO UPDATE
SET queue = excluded.queue, options = excluded.options, args_schema = excluded.args_schema,
    updated_at = excluded.updated_at;

-- name: get_job
SELECT name, queue, options, args_schema FROM runlane_jobs WHERE name = %(name)s;

-- name: register_worker
INSERT INTO runlane_workers (id, info, started_at, last_seen_at)
VALUES (%(id)s, %(info)s::jsonb, {now}, {now})
ON CONFLICT (id) DO UPDATE SET info = excluded.info, last_seen_at = excluded.last_seen_at;

-- name: deregister_worker
DELETE FROM runlane_workers WHERE id = %(id)s;

-- name: notify
SELECT count(pg_notify(ch, %(token)s)) FROM unnest(%(channels)s::text[]) AS ch;

-- name: lock_parents
-- Before inserting continuations: a parent's terminal transition either committed before (the insert then
-- sees it and decides at once) or waits for this insert to commit (and its resolve step then sees it).
SELECT id, status FROM runlane_runs WHERE id = ANY(%(ids)s::bigint[]) ORDER BY id FOR SHARE;

-- name: resolve_continuations
-- Decide the continuations waiting on those of the given runs that are terminal, and down the chains this
-- cancels (a cancelled continuation is the terminal parent of the next level). Runs in each transaction that
-- makes runs terminal, as a statement of its own so that its snapshot includes continuations committed while
-- that transaction waited for the parent's row lock.
-- It runs after every finish, almost always to find nothing, so the children are looked up by parent in
-- runlane_runs_parent, and the coalesce()s keep the planner off the partial indexes whose predicates the plain
-- conditions would match: started from the parents, the plan was a BitmapAnd with runlane_runs_finished, and
-- with "status = 'scheduled'" it may scan runlane_runs_waiting; both grow with history or with delayed runs
-- (0.4 ms for 16 runs after 5,000 finishes).
WITH RECURSIVE decided (id, parent_id, parent_status, go) AS (
    SELECT c.id, p.id, p.status, c.continue_when IN ('finished', p.status)
    FROM runlane_runs c
    JOIN runlane_runs p ON p.id = c.parent_run_id
    WHERE c.parent_run_id = ANY(%(ids)s::bigint[]) AND c.continue_when IS NOT NULL
      AND coalesce(c.status, '') = 'scheduled' AND coalesce(c.due_at, 'infinity') = 'infinity'
      AND coalesce(p.status, '') IN {terminal}
    UNION ALL
    SELECT c.id, d.id, 'cancelled', c.continue_when IN ('finished', 'cancelled')
    FROM decided d JOIN runlane_runs c ON c.parent_run_id = d.id
    WHERE NOT d.go AND c.continue_when IS NOT NULL
      AND coalesce(c.status, '') = 'scheduled' AND coalesce(c.due_at, 'infinity') = 'infinity'
), locked AS MATERIALIZED (
    SELECT r.id FROM runlane_runs r
    WHERE r.id IN (SELECT id FROM decided) AND coalesce(r.status, '') = 'scheduled'
      AND coalesce(r.due_at, 'infinity') = 'infinity'
    ORDER BY r.id
    FOR UPDATE
), upd AS (
    UPDATE runlane_runs r
    SET status = CASE WHEN NOT d.go THEN 'cancelled' WHEN r.not_before > {now} THEN 'scheduled'
                      ELSE 'pending' END,
        due_at = CASE WHEN d.go THEN greatest(r.not_before, {now}) ELSE r.due_at END,
        finished_at = CASE WHEN d.go THEN NULL ELSE {now} END,
        error = CASE WHEN d.go THEN NULL
                     ELSE jsonb_build_object('type', 'Cancelled', 'traceback', NULL, 'message',
                          'parent run ' || d.parent_id || ' ' || d.parent_status
                          || '; this continuation runs when ' || r.continue_when) END,
        last_event_id = r.last_event_id + CASE WHEN d.go AND r.not_before > {now} THEN 0 ELSE 1 END
    FROM decided d JOIN locked l ON l.id = d.id
    WHERE r.id = d.id
    RETURNING r.id, r.attempt, r.status, r.last_event_id, r.error, d.parent_id, d.parent_status
), ev AS (
    INSERT INTO runlane_events (run_id, id, kind, at, data)
    SELECT id, last_event_id, 'status', {now},
           jsonb_build_object('from', 'scheduled', 'to', status, 'attempt', attempt, 'reason',
                              coalesce(error ->> 'message', 'parent run ' || parent_id || ' ' || parent_status))
    FROM upd WHERE status <> 'scheduled'
), note AS (
    SELECT count(pg_notify(ch, %(token)s)) AS n FROM unnest(%(channels)s::text[]) AS ch
    WHERE EXISTS (SELECT 1 FROM upd)
)
SELECT upd.id, upd.status FROM upd CROSS JOIN note;

-- name: insert_batch
-- The batch row and all its children in one statement (batch children carry no dedup id, so nothing can
-- conflict). No row at all comes back when the parent run does not exist.
-- The children are insert_runs' JSON rows; the fields a batch child cannot have are not read.
WITH src AS MATERIALIZED (
    SELECT u.r ->> 0 AS job, u.r -> 1 AS args, u.r ->> 2 AS queue, (u.r ->> 3)::int AS priority,
           (u.r ->> 4)::int AS max_attempts, (u.r ->> 5)::timestamptz AS not_before,
           (u.r ->> 6)::timestamptz AS not_after, u.r ->> 8 AS tags, u.ord,
           nextval((SELECT pg_get_serial_sequence('runlane_runs', 'id'))::regclass) AS id
    FROM jsonb_array_elements(%(rows)s::jsonb) WITH ORDINALITY AS u(r, ord)
), parent AS (
    SELECT p.root_run_id FROM runlane_runs p WHERE p.id = %(parent_run_id)s::bigint
), b AS (
    INSERT INTO runlane_batches AS b (created_at, parent_run_id, total, scheduled, pending)
    SELECT {now}, %(parent_run_id)s::bigint, count(*),
           count(*) FILTER (WHERE s.not_before > {now}),
           count(*) FILTER (WHERE NOT coalesce(s.not_before > {now}, false))
    FROM src s
    HAVING %(parent_run_id)s::bigint IS NULL OR EXISTS (SELECT 1 FROM parent)
    RETURNING b.id, b.created_at, b.parent_run_id, b.total, b.scheduled, b.pending, b.running, b.retrying,
              b.succeeded, b.failed, b.cancelled, b.skipped, b.finish_seq
), ins AS (
    INSERT INTO runlane_runs AS r (id, job, args, status, queue, priority, max_attempts, not_before, not_after,
                                   tags, parent_run_id, root_run_id, batch_id, created_at, due_at)
    OVERRIDING SYSTEM VALUE
    SELECT s.id, s.job, s.args, CASE WHEN s.not_before > {now} THEN 'scheduled' ELSE 'pending' END,
           s.queue, s.priority, s.max_attempts, s.not_before, s.not_after, s.tags::text[],
           %(parent_run_id)s::bigint, coalesce((SELECT root_run_id FROM parent), s.id), b.id, {now},
           coalesce(s.not_before, {now})
    FROM src s CROSS JOIN b
    ORDER BY s.ord
    RETURNING r.id, r.status, r.root_run_id, r.created_at
), note AS (
    SELECT count(pg_notify(ch, %(token)s)) AS n FROM unnest(%(channels)s::text[]) AS ch
    WHERE EXISTS (SELECT 1 FROM ins)
)
SELECT b.*, i.id, i.status, i.root_run_id, i.created_at
FROM b LEFT JOIN ins i ON true CROSS JOIN note
ORDER BY i.id;

-- name: get_batch
SELECT id, created_at, parent_run_id, total, scheduled, pending, running, retrying, succeeded, failed,
       cancelled, skipped, finish_seq
FROM runlane_batches WHERE id = %(id)s;

-- name: batch_runs
SELECT r.batch_seq, {run_columns} FROM runlane_runs r
WHERE r.batch_id = %(batch_id)s AND r.batch_seq > %(after)s AND r.batch_seq <= %(upto)s
ORDER BY r.batch_seq
LIMIT %(limit)s;
