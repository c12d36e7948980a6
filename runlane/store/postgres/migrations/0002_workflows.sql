-- Runlane on PostgreSQL, version 2: workflows (batches, batch counters, continuations).

CREATE TABLE runlane_batches (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at    timestamptz NOT NULL,
    parent_run_id bigint,
    total         integer NOT NULL DEFAULT 0,
    scheduled     integer NOT NULL DEFAULT 0,
    pending       integer NOT NULL DEFAULT 0,
    running       integer NOT NULL DEFAULT 0,
    retrying      integer NOT NULL DEFAULT 0,
    succeeded     integer NOT NULL DEFAULT 0,
    failed        integer NOT NULL DEFAULT 0,
    cancelled     integer NOT NULL DEFAULT 0,
    skipped       integer NOT NULL DEFAULT 0,
    -- How many terminal transitions the children have made; each one numbers the child (batch_seq).
    finish_seq    bigint  NOT NULL DEFAULT 0
);

-- A continuation's condition; NULL for other runs. While it waits for its parent it is 'scheduled' with
-- due_at 'infinity' (never promoted by time; next_due_at already ignores it).
ALTER TABLE runlane_runs ADD COLUMN continue_when text
    CHECK (continue_when IN ('succeeded', 'failed', 'cancelled', 'finished'));
-- The batch's finish_seq when this child last became terminal.
ALTER TABLE runlane_runs ADD COLUMN batch_seq bigint;

CREATE INDEX runlane_runs_waiting_continuations ON runlane_runs (parent_run_id)
    WHERE continue_when IS NOT NULL AND status = 'scheduled';
CREATE INDEX runlane_runs_batch_seq ON runlane_runs (batch_id, batch_seq) WHERE batch_seq IS NOT NULL;

-- Batch counters follow every status change of a child in the same transaction, whichever statement made
-- it: one statement-level trigger with transition tables, so a claim or finish of many children updates each
-- batch row once. Batch rows are locked in id order first, so two statements touching the same batches
-- cannot deadlock on them. The row lock also orders finish_seq by commit: a reader that sees finish_seq = n
-- on the batch row sees every child numbered up to n.
CREATE FUNCTION runlane_batch_counts() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF pg_trigger_depth() > 1 OR NOT EXISTS (SELECT 1 FROM new_runs WHERE batch_id IS NOT NULL) THEN
        RETURN NULL;  -- not a batch child, or our own batch_seq update below
    END IF;
    PERFORM 1 FROM runlane_batches
    WHERE id IN (SELECT n.batch_id FROM new_runs n JOIN old_runs o ON o.id = n.id
                 WHERE n.batch_id IS NOT NULL AND n.status <> o.status)
    ORDER BY id
    FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    WITH d AS (
        SELECT n.id, n.batch_id, o.status AS old_status, n.status AS new_status,
               n.status IN ('succeeded', 'failed', 'cancelled', 'skipped') AS ends
        FROM new_runs n JOIN old_runs o ON o.id = n.id
        WHERE n.batch_id IS NOT NULL AND n.status <> o.status
    ), agg AS (
        SELECT batch_id,
               count(*) FILTER (WHERE new_status = 'scheduled') - count(*) FILTER (WHERE old_status = 'scheduled') AS scheduled,
               count(*) FILTER (WHERE new_status = 'pending') - count(*) FILTER (WHERE old_status = 'pending') AS pending,
               count(*) FILTER (WHERE new_status = 'running') - count(*) FILTER (WHERE old_status = 'running') AS running,
               count(*) FILTER (WHERE new_status = 'retrying') - count(*) FILTER (WHERE old_status = 'retrying') AS retrying,
               count(*) FILTER (WHERE new_status = 'succeeded') - count(*) FILTER (WHERE old_status = 'succeeded') AS succeeded,
               count(*) FILTER (WHERE new_status = 'failed') - count(*) FILTER (WHERE old_status = 'failed') AS failed,
               count(*) FILTER (WHERE new_status = 'cancelled') - count(*) FILTER (WHERE old_status = 'cancelled') AS cancelled,
               count(*) FILTER (WHERE new_status = 'skipped') - count(*) FILTER (WHERE old_status = 'skipped') AS skipped,
               count(*) FILTER (WHERE ends) AS ended
        FROM d GROUP BY batch_id
    ), upd AS (
        UPDATE runlane_batches b
        SET scheduled = b.scheduled + agg.scheduled, pending = b.pending + agg.pending,
            running = b.running + agg.running, retrying = b.retrying + agg.retrying,
            succeeded = b.succeeded + agg.succeeded, failed = b.failed + agg.failed,
            cancelled = b.cancelled + agg.cancelled, skipped = b.skipped + agg.skipped,
            finish_seq = b.finish_seq + agg.ended
        FROM agg WHERE b.id = agg.batch_id
        RETURNING b.id, b.finish_seq - agg.ended AS base
    ), seq AS (
        SELECT d.id, upd.base + row_number() OVER (PARTITION BY d.batch_id ORDER BY d.id) AS seq
        FROM d JOIN upd ON upd.id = d.batch_id
        WHERE d.ends
    )
    UPDATE runlane_runs r SET batch_seq = seq.seq FROM seq WHERE r.id = seq.id;
    RETURN NULL;
END
$$;

CREATE TRIGGER runlane_runs_batch_counts AFTER UPDATE ON runlane_runs
    REFERENCING OLD TABLE AS old_runs NEW TABLE AS new_runs
    FOR EACH STATEMENT EXECUTE FUNCTION runlane_batch_counts();
