"""Helpers of the workflow methods: following a batch through its counters, and drawing a run tree.

Following a batch never re-reads its children wholesale: the store numbers each child's terminal transition
with the batch's ``finish_seq`` (in the same transaction, in commit order), so a follower reads the batch row
(one row) on each change and then only the children numbered since it last looked.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from runlane.errors import BatchNotFound
from runlane.models import Run, RunTree
from runlane.store import Store

if TYPE_CHECKING:
    from runlane.jobs import Job

_PAGE = 1000


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One child of ``run_batch([BatchItem(job, args), …])``: children of one batch may run different jobs."""

    job: str | Job[Any, Any]
    args: Mapping[str, Any] | None = None


async def follow_batch(store: Store, batch_id: int, poll_interval: float) -> AsyncIterator[Run]:
    """Yield each child of the batch as it becomes terminal (again, if it is retried and ends once more),
    until every child is terminal. Raises BatchNotFound."""
    notifier = store.notifier
    seen = 0
    while True:
        generation = notifier.generation("change")
        batch = await store.get_batch(batch_id)
        if batch is None:
            raise BatchNotFound(batch_id)
        unsettled = False  # a child counted as ended that was retried since: it will end again
        while seen < batch.finish_seq:
            page = await store.batch_runs(batch_id, after_seq=seen, up_to_seq=batch.finish_seq, limit=_PAGE)
            for seq, run in page:
                seen = seq
                if run.status.is_terminal:
                    yield run
                else:
                    unsettled = True
            if len(page) < _PAGE:
                # Numbers up to finish_seq that are missing belong to children that ended again later: they
                # come back with a higher number.
                seen = batch.finish_seq
        if batch.is_finished and not unsettled:
            return
        await notifier.wait("change", generation, poll_interval)


def build_tree(runs: Iterable[Run], root_run_id: int) -> RunTree:
    """Nest the runs of one root's tree. A child is always created after its parent, so building from the
    highest id down finishes every subtree before its parent needs it (no recursion, any depth). A run whose
    parent was pruned is attached under the root."""
    by_id = {run.id: run for run in runs}
    children: dict[int, list[int]] = {}
    top = root_run_id if root_run_id in by_id else min(by_id)
    for run in by_id.values():
        if run.id == top:
            continue
        parent = run.parent_run_id if run.parent_run_id in by_id else top
        children.setdefault(parent, []).append(run.id)
    nodes: dict[int, RunTree] = {}
    for run_id in sorted(by_id, reverse=True):
        kids = sorted(children.get(run_id, ()))
        nodes[run_id] = RunTree(by_id[run_id], tuple(nodes.pop(k) for k in kids))
    return nodes[top]
