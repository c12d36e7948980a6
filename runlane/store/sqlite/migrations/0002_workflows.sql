-- Runlane's SQLite schema, version 2: workflows (batches, batch counters, continuations).
--
-- Batch counters live on the batch row and follow every status change of a child through a trigger, in the
-- same transaction as the change, whichever write verb made it (claim, finish, cancel, reap, release,
-- retry, expire, promote, and verbs added later). The writer thread serialises all writes, so the
-- `finish_seq` a child receives when it becomes terminal is also commit order: a reader that has seen
-- `finish_seq = n` on the batch row can fetch the children numbered up to n and miss none.

CREATE TABLE runlane_batches (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at     REAL NOT NULL,
    parent_run_id  INTEGER,
    total          INTEGER NOT NULL DEFAULT 0,
    scheduled      INTEGER NOT NULL DEFAULT 0,
    pending        INTEGER NOT NULL DEFAULT 0,
    running        INTEGER NOT NULL DEFAULT 0,
    retrying       INTEGER NOT NULL DEFAULT 0,
    succeeded      INTEGER NOT NULL DEFAULT 0,
    failed         INTEGER NOT NULL DEFAULT 0,
    cancelled      INTEGER NOT NULL DEFAULT 0,
    skipped        INTEGER NOT NULL DEFAULT 0,
    finish_seq     INTEGER NOT NULL DEFAULT 0
);

-- A continuation's condition ('succeeded', 'failed', 'cancelled', 'finished'); NULL for other runs. While it
-- waits for its parent it is 'scheduled' with a NULL due_at (never promoted by time).
ALTER TABLE runlane_runs ADD COLUMN continue_when TEXT;
-- The batch's finish_seq when this child last became terminal (NULL before).
ALTER TABLE runlane_runs ADD COLUMN batch_seq INTEGER;

-- Continuations still waiting, by parent: what a terminal transition looks up.
CREATE INDEX runlane_runs_waiting_continuations ON runlane_runs (parent_run_id)
    WHERE continue_when IS NOT NULL AND status = 'scheduled';
-- Finished children of a batch in finish order: waiting on a batch reads only what is new.
CREATE INDEX runlane_runs_batch_seq ON runlane_runs (batch_id, batch_seq) WHERE batch_seq IS NOT NULL;

CREATE TRIGGER runlane_runs_batch_counts AFTER UPDATE OF status ON runlane_runs
FOR EACH ROW WHEN NEW.batch_id IS NOT NULL AND NEW.status <> OLD.status
BEGIN
    UPDATE runlane_batches SET
        scheduled = scheduled + (NEW.status = 'scheduled') - (OLD.status = 'scheduled'),
        pending = pending + (NEW.status = 'pending') - (OLD.status = 'pending'),
        running = running + (NEW.status = 'running') - (OLD.status = 'running'),
        retrying = retrying + (NEW.status = 'retrying') - (OLD.status = 'retrying'),
        succeeded = succeeded + (NEW.status = 'succeeded') - (OLD.status = 'succeeded'),
        failed = failed + (NEW.status = 'failed') - (OLD.status = 'failed'),
        cancelled = cancelled + (NEW.status = 'cancelled') - (OLD.status = 'cancelled'),
        skipped = skipped + (NEW.status = 'skipped') - (OLD.status = 'skipped'),
        finish_seq = finish_seq + (NEW.status = 'succeeded' OR NEW.status = 'failed'
                                   OR NEW.status = 'cancelled' OR NEW.status = 'skipped')
    WHERE id = NEW.batch_id;
    -- Not an UPDATE OF status: this does not fire the trigger again.
    UPDATE runlane_runs SET batch_seq = (SELECT finish_seq FROM runlane_batches WHERE id = NEW.batch_id)
    WHERE id = NEW.id AND (NEW.status = 'succeeded' OR NEW.status = 'failed' OR NEW.status = 'cancelled'
                           OR NEW.status = 'skipped');
END;
