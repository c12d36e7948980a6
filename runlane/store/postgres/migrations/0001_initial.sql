-- Runlane on PostgreSQL, version 1. Every name is prefixed so the schema can share a database (and a
-- transaction, for transactional enqueue) with the application.

CREATE TABLE runlane_runs (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job              text        NOT NULL,
    args             jsonb       NOT NULL,
    status           text        NOT NULL CHECK (status IN ('scheduled', 'pending', 'running', 'retrying',
                                                            'succeeded', 'failed', 'cancelled', 'skipped')),
    queue            text        NOT NULL,
    priority         integer     NOT NULL DEFAULT 0,
    attempt          integer     NOT NULL DEFAULT 0,
    max_attempts     integer     NOT NULL,
    not_before       timestamptz,
    not_after        timestamptz,
    dedup_id         text,
    tags             text[]      NOT NULL DEFAULT '{}',
    -- No foreign key to the parent: prune removes finished parents whose children are finished too, and
    -- the store checks parents on insert.
    parent_run_id    bigint,
    root_run_id      bigint      NOT NULL,
    batch_id         bigint,
    schedule_id      text,
    created_at       timestamptz NOT NULL,
    started_at       timestamptz,
    finished_at      timestamptz,
    progress         double precision,
    progress_message text,
    result           jsonb,
    error            jsonb,
    worker_id        text,
    -- Internal: when the run becomes claimable, who holds it and until when, and the per-run event counter
    -- that hands out event ids in the same transaction as the event (commit order cannot reorder them).
    due_at           timestamptz NOT NULL,
    lease_owner      text,
    lease_expires_at timestamptz,
    last_event_id    bigint      NOT NULL DEFAULT 0
);

-- The claim query's ORDER BY, restricted to what a claim can take: stays small however large history grows.
CREATE INDEX runlane_runs_claim ON runlane_runs (queue, priority DESC, due_at, id) WHERE status = 'pending';

-- Promotion of due scheduled/retrying runs and next_due_at.
CREATE INDEX runlane_runs_waiting ON runlane_runs (due_at) WHERE status IN ('scheduled', 'retrying');

-- The reaper.
CREATE INDEX runlane_runs_leases ON runlane_runs (lease_expires_at) WHERE status = 'running';

-- expire_runs.
CREATE INDEX runlane_runs_not_after ON runlane_runs (not_after)
    WHERE not_after IS NOT NULL AND status IN ('scheduled', 'pending', 'retrying');

-- Exactly one active run per dedup id, enforced by the database (never "lock then look").
CREATE UNIQUE INDEX runlane_runs_dedup ON runlane_runs (dedup_id)
    WHERE dedup_id IS NOT NULL AND status IN ('scheduled', 'pending', 'running', 'retrying');

-- Trees, batches, schedules, filters and retention. Claims and finishes rewrite the row (its status is
-- indexed, so updates are never HOT) and every index that covers the new row version gains an entry: hence
-- partial indexes where the rows that matter are a subset, and no index on status alone (the active statuses
-- have the partial indexes above; terminal ones are listed newest first along the primary key).
CREATE INDEX runlane_runs_parent ON runlane_runs (parent_run_id) WHERE parent_run_id IS NOT NULL;
-- A root's tree is the root itself (by id) plus the runs that have a parent.
CREATE INDEX runlane_runs_root ON runlane_runs (root_run_id, id) WHERE parent_run_id IS NOT NULL;
CREATE INDEX runlane_runs_batch ON runlane_runs (batch_id, id) WHERE batch_id IS NOT NULL;
CREATE INDEX runlane_runs_schedule ON runlane_runs (schedule_id, id) WHERE schedule_id IS NOT NULL;
CREATE INDEX runlane_runs_job ON runlane_runs (job, id);
CREATE INDEX runlane_runs_tags ON runlane_runs USING gin (tags) WHERE tags <> '{}';
CREATE INDEX runlane_runs_finished ON runlane_runs (finished_at)
    WHERE status IN ('succeeded', 'failed', 'cancelled', 'skipped');

CREATE TABLE runlane_attempts (
    run_id      bigint      NOT NULL,
    number      integer     NOT NULL,
    worker_id   text        NOT NULL,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz,
    status      text        NOT NULL,
    error       jsonb,
    PRIMARY KEY (run_id, number)
);

CREATE TABLE runlane_events (
    run_id bigint      NOT NULL,
    id     bigint      NOT NULL,
    kind   text        NOT NULL CHECK (kind IN ('status', 'progress', 'log', 'output', 'input')),
    at     timestamptz NOT NULL,
    data   jsonb,
    PRIMARY KEY (run_id, id)
);

CREATE TABLE runlane_jobs (
    name        text        PRIMARY KEY,
    queue       text        NOT NULL,
    options     jsonb       NOT NULL DEFAULT '{}',
    args_schema jsonb       NOT NULL DEFAULT '{}',
    updated_at  timestamptz NOT NULL
);

CREATE TABLE runlane_workers (
    id           text        PRIMARY KEY,
    info         jsonb       NOT NULL DEFAULT '{}',
    started_at   timestamptz NOT NULL,
    last_seen_at timestamptz NOT NULL
);
