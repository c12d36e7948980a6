-- Runlane's SQLite schema, version 1.
--
-- Times are REAL epoch seconds; JSON values are TEXT. A partial index serves only queries that repeat its
-- WHERE expression literally (see queries.sql). Lists of three or more values in CHECK constraints and index
-- WHERE clauses are spelled as OR chains: SQLite evaluates those per written row, and `x IN (a, b, c)` there
-- costs several microseconds each time (an ephemeral table), an OR chain a fraction of one.
-- Later features (batches, schedules, paused queues, limits) add their own tables and nullable columns:
-- `batch_id` and `schedule_id` are already plain columns, and a NULL `due_at` is reserved for runs that
-- wait on something other than time (continuations waiting for their parent).

CREATE TABLE runlane_migrations (
    version     INTEGER PRIMARY KEY,
    name        TEXT NOT NULL,
    applied_at  REAL NOT NULL
);

-- AUTOINCREMENT: a run id is never reused, even after the newest runs were pruned, so an id held by a
-- client or a stale worker can never come to mean another run.
CREATE TABLE runlane_runs (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    job               TEXT NOT NULL,
    args              TEXT NOT NULL,
    status            TEXT NOT NULL CHECK (status = 'pending' OR status = 'running' OR status = 'succeeded'
                        OR status = 'scheduled' OR status = 'retrying' OR status = 'failed'
                        OR status = 'cancelled' OR status = 'skipped'),
    queue             TEXT NOT NULL,
    priority          INTEGER NOT NULL DEFAULT 0,
    attempt           INTEGER NOT NULL DEFAULT 0,
    max_attempts      INTEGER NOT NULL,
    not_before        REAL,
    not_after         REAL,
    due_at            REAL,
    dedup_id          TEXT,
    tags              TEXT NOT NULL DEFAULT '[]',
    parent_run_id     INTEGER,
    root_run_id       INTEGER NOT NULL,
    batch_id          INTEGER,
    schedule_id       TEXT,
    created_at        REAL NOT NULL,
    started_at        REAL,
    finished_at       REAL,
    progress          REAL,
    progress_message  TEXT,
    result            TEXT,
    error             TEXT,
    worker_id         TEXT,
    lease_owner       TEXT,
    lease_expires_at  REAL,
    last_event_id     INTEGER NOT NULL DEFAULT 0
);

-- The claim: one ordered range scan per queue that stops after LIMIT rows.
CREATE INDEX runlane_runs_claim ON runlane_runs (queue, priority DESC, due_at, id)
    WHERE status = 'pending';
-- Promotion of due scheduled/retrying runs, and next_due_at for idle workers.
CREATE INDEX runlane_runs_waiting ON runlane_runs (due_at)
    WHERE status IN ('scheduled', 'retrying');
-- The reaper: running runs by lease expiry.
CREATE INDEX runlane_runs_lease ON runlane_runs (lease_expires_at)
    WHERE status = 'running';
-- expire_runs: not-yet-started runs with a deadline.
CREATE INDEX runlane_runs_not_after ON runlane_runs (not_after)
    WHERE not_after IS NOT NULL AND (status = 'scheduled' OR status = 'pending' OR status = 'retrying');
-- Deduplication: at most one non-terminal run per dedup id; the atomic source of RunConflict.
CREATE UNIQUE INDEX runlane_runs_dedup ON runlane_runs (dedup_id)
    WHERE dedup_id IS NOT NULL
      AND (status = 'scheduled' OR status = 'pending' OR status = 'running' OR status = 'retrying');
-- Listing newest first under the common filters (the primary key serves the unfiltered list).
CREATE INDEX runlane_runs_by_status ON runlane_runs (status, id);
CREATE INDEX runlane_runs_by_job ON runlane_runs (job, id);
-- Run trees: cancel cascades walk parent -> children; the dashboard draws a tree by its root.
CREATE INDEX runlane_runs_by_parent ON runlane_runs (parent_run_id, id) WHERE parent_run_id IS NOT NULL;
CREATE INDEX runlane_runs_by_root ON runlane_runs (root_run_id, id);
CREATE INDEX runlane_runs_by_batch ON runlane_runs (batch_id, id) WHERE batch_id IS NOT NULL;
CREATE INDEX runlane_runs_by_schedule ON runlane_runs (schedule_id, id) WHERE schedule_id IS NOT NULL;
-- Retention (only terminal runs have a finished_at).
CREATE INDEX runlane_runs_finished ON runlane_runs (finished_at) WHERE finished_at IS NOT NULL;

-- Attempts and events are small rows read by their run: clustered on (run_id, …) without a rowid.
CREATE TABLE runlane_attempts (
    run_id       INTEGER NOT NULL REFERENCES runlane_runs (id) ON DELETE CASCADE,
    number       INTEGER NOT NULL,
    worker_id    TEXT NOT NULL,
    started_at   REAL NOT NULL,
    finished_at  REAL,
    status       TEXT NOT NULL,
    error        TEXT,
    PRIMARY KEY (run_id, number)
) WITHOUT ROWID;

CREATE TABLE runlane_events (
    run_id  INTEGER NOT NULL REFERENCES runlane_runs (id) ON DELETE CASCADE,
    id      INTEGER NOT NULL,
    kind    TEXT NOT NULL CHECK (kind = 'status' OR kind = 'progress' OR kind = 'log' OR kind = 'output'
                                 OR kind = 'input'),
    at      REAL NOT NULL,
    data    TEXT,
    PRIMARY KEY (run_id, id)
) WITHOUT ROWID;

CREATE TABLE runlane_jobs (
    name         TEXT PRIMARY KEY,
    queue        TEXT NOT NULL,
    options      TEXT NOT NULL DEFAULT '{}',
    args_schema  TEXT NOT NULL DEFAULT '{}',
    updated_at   REAL NOT NULL
);

CREATE TABLE runlane_workers (
    id            TEXT PRIMARY KEY,
    info          TEXT NOT NULL DEFAULT '{}',
    started_at    REAL NOT NULL,
    last_seen_at  REAL NOT NULL
);
