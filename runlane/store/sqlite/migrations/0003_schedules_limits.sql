-- Runlane's SQLite schema, version 3: schedules, paused queues, concurrency and rate limits.
--
-- Exactly-once fires: a schedule's run carries its intended fire time in not_before, and the unique index
-- runlane_runs_fire admits one run per (schedule, fire time) inside the inserting transaction, however many
-- schedulers race for it. Limits are enforced in the claim transaction from the definitions below.

-- The partition a run's job limits count in (concurrency_key, computed when it was triggered).
ALTER TABLE runlane_runs ADD COLUMN concurrency_key TEXT;

CREATE UNIQUE INDEX runlane_runs_fire ON runlane_runs (schedule_id, not_before)
    WHERE schedule_id IS NOT NULL AND not_before IS NOT NULL;

-- A schedule's active runs (overlap checks) and its held fires (overlap 'queue': scheduled, no due time).
CREATE INDEX runlane_runs_schedule_active ON runlane_runs (schedule_id)
    WHERE schedule_id IS NOT NULL AND (status = 'scheduled' OR status = 'pending' OR status = 'running' OR status = 'retrying');
CREATE INDEX runlane_runs_held ON runlane_runs (schedule_id, id)
    WHERE schedule_id IS NOT NULL AND status = 'scheduled' AND due_at IS NULL;

CREATE TABLE runlane_schedules (
    id               TEXT PRIMARY KEY,
    job              TEXT NOT NULL,
    args             TEXT NOT NULL DEFAULT '{}',
    cron             TEXT,
    interval         REAL,
    timezone         TEXT NOT NULL DEFAULT 'UTC',
    overlap          TEXT NOT NULL CHECK (overlap = 'skip' OR overlap = 'allow' OR overlap = 'queue'),
    misfire          TEXT NOT NULL CHECK (misfire = 'latest' OR misfire = 'skip' OR misfire = 'all'),
    max_catch_up     INTEGER NOT NULL DEFAULT 100,
    queue            TEXT NOT NULL,
    priority         INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL DEFAULT 3,
    concurrency_key  TEXT,
    source           TEXT NOT NULL CHECK (source = 'code' OR source = 'runtime'),
    enabled          INTEGER NOT NULL DEFAULT 1,
    disabled_reason  TEXT,
    next_fire_at     REAL,
    last_fire_at     REAL,
    created_at       REAL NOT NULL,
    updated_at       REAL NOT NULL
);

-- Queues with a pause flag or limits; a queue without a row is unpaused and unlimited.
CREATE TABLE runlane_queues (
    name             TEXT PRIMARY KEY,
    paused           INTEGER NOT NULL DEFAULT 0,
    max_concurrency  INTEGER,
    rate_count       INTEGER,
    rate_period      REAL,
    updated_at       REAL NOT NULL
);

-- Jobs with limits (written by workers at start); a job without a row is unlimited.
CREATE TABLE runlane_job_limits (
    job              TEXT PRIMARY KEY,
    max_concurrency  INTEGER,
    rate_count       INTEGER,
    rate_period      REAL,
    updated_at       REAL NOT NULL
);

-- Starts under a rate limit, for the sliding window: rows older than the longest period are deleted.
CREATE TABLE runlane_rate_starts (
    key  TEXT NOT NULL,
    at   REAL NOT NULL
);
CREATE INDEX runlane_rate_starts_key ON runlane_rate_starts (key, at);
