"""The chaos harness (../shared RELIABILITY.md §1): an execution ledger kept outside the store, a client log,
a nemesis that injects faults and logs them, worker processes it can kill, pause and restart, and one checker
that judges a run of a test from those records alone."""
