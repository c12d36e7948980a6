-- Runlane on PostgreSQL, version 3: schedules, paused queues, concurrency and rate limits.
--
-- Exactly-once fires: a schedule's run carries its intended fire time in not_before, and the unique index
-- runlane_runs_fire admits one run per (schedule, fire time) inside the inserting transaction, however many
-- schedulers race for it. Limits are enforced in the claim transaction from the definitions below, under a
-- transaction-scoped advisory lock per limited job and queue.

ALTER TABLE runlane_runs ADD COLUMN concurrency_key text;

CREATE UNIQUE INDEX runlane_runs_fire ON runlane_runs (schedule_id, not_before)
    WHERE schedule_id IS NOT NULL AND not_before IS NOT NULL;

-- A schedule's active runs (overlap checks) and its held fires (overlap 'queue': scheduled, no due time).
CREATE INDEX runlane_runs_schedule_active ON runlane_runs (schedule_id)
    WHERE schedule_id IS NOT NULL AND status IN ('scheduled', 'pending', 'running', 'retrying');
CREATE INDEX runlane_runs_held ON runlane_runs (schedule_id, id)
    WHERE schedule_id IS NOT NULL AND status = 'scheduled' AND due_at = 'infinity';

CREATE TABLE runlane_schedules (
    id               text        PRIMARY KEY,
    job              text        NOT NULL,
    args             jsonb       NOT NULL DEFAULT '{}',
    cron             text,
    "interval"       double precision,
    timezone         text        NOT NULL DEFAULT 'UTC',
    overlap          text        NOT NULL CHECK (overlap IN ('skip', 'allow', 'queue')),
    misfire          text        NOT NULL CHECK (misfire IN ('latest', 'skip', 'all')),
    max_catch_up     integer     NOT NULL DEFAULT 100,
    queue            text        NOT NULL,
    priority         integer     NOT NULL DEFAULT 0,
    max_attempts     integer     NOT NULL DEFAULT 3,
    concurrency_key  text,
    source           text        NOT NULL CHECK (source IN ('code', 'runtime')),
    enabled          boolean     NOT NULL DEFAULT true,
    disabled_reason  text,
    next_fire_at     timestamptz,
    last_fire_at     timestamptz,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL
);

CREATE TABLE runlane_queues (
    name             text        PRIMARY KEY,
    paused           boolean     NOT NULL DEFAULT false,
    max_concurrency  integer,
    rate_count       integer,
    rate_period      double precision,
    updated_at       timestamptz NOT NULL
);

CREATE TABLE runlane_job_limits (
    job              text        PRIMARY KEY,
    max_concurrency  integer,
    rate_count       integer,
    rate_period      double precision,
    updated_at       timestamptz NOT NULL
);

CREATE TABLE runlane_rate_starts (
    key  text        NOT NULL,
    at   timestamptz NOT NULL
);
CREATE INDEX runlane_rate_starts_key ON runlane_rate_starts (key, at);
