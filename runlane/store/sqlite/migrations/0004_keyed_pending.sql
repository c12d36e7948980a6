-- Runlane's SQLite schema, version 4: which jobs have pending runs with a concurrency key.
--
-- The limit-aware claim leaves a job out of its search while the job's unkeyed partition is at its limit,
-- unless the job has keyed runs pending (other partitions may have room). Without this index the search
-- walked every pending run of the queue to find none, inside the write transaction, on every claim of a
-- saturated limit: 25 ms per claim with 50,000 runs pending. Only keyed runs enter it.
CREATE INDEX runlane_runs_keyed ON runlane_runs (job) WHERE status = 'pending' AND concurrency_key IS NOT NULL;
