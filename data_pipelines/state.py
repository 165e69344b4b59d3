"""The loader's position, for checkpoints and exact resume.

Each reader (one per rank and DataLoader worker) reads its datasets epoch by epoch. Its position is,
per stream (a dataset; with ``data.image_ratio`` a dataset's images or its videos), ``(epoch, offset)``: how
many raw samples its seeded shuffle buffer has handed on in that epoch, plus ``draws`` (samples taken from
the mix), ``pending`` (samples waiting in bucket queues, by their position, stream and draw) and ``batches``
(batches made: the position of the image/video schedule). On restore a reader re-reads the same shards
and the same shuffle buffer and skips raw samples without decoding them; it decodes again only the
pending ones (without counting them twice), so the bucket queues are what they were. Frame offsets are seeded per sample
(by seed, epoch and key), so no generator state needs restoring. The main process also keeps the
order in which it takes batches from the workers (``next_worker``) and the counts so far.

A state is plain Python data (ints, strings, lists, dicts): ``torch.save`` / ``torch.load(weights_only=True)``
and JSON both take it.

Changed layout. Exact resume needs the same world size, ``data.num_workers``, shard lists, seed,
batch size and shuffle buffer. When any of these changed, the loader cannot map old positions onto new
readers, so it follows one rule: **start the epoch after the newest epoch any saved reader had begun**
(or that epoch itself when no saved reader had read anything of it). Nothing seen in that epoch is
read again; what the old readers had not reached of it is left out for that epoch (a warning says so).
Every rank must get the same state for this (one rank's, or ``merge_states`` of all of them), so that
all ranks agree on the epoch.
"""

from __future__ import annotations

import hashlib
import logging
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

log = logging.getLogger(__name__)

VERSION = 1
LAYOUT_KEYS = ("world_size", "num_workers", "shards", "seed", "batch_size", "shuffle_buffer", "epoch_seed", "buckets",
               "latents", "image_ratio")


def fingerprint(url_lists: list[list[str]]) -> str:
    """A short digest of the shard lists, to notice a changed dataset on resume."""
    h = hashlib.sha256()
    for urls in url_lists:
        h.update("\n".join(urls).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """Join the states of all ranks (e.g. from ``torch.distributed.all_gather_object``) into one.

    Loading the merged state on every rank gives each rank its own position back (same world size),
    and lets every rank apply the changed-layout rule to the same facts.
    """
    if not states:
        raise ValueError("merge_states needs at least one loader state")
    ranks = [r for s in states for r in s.get("ranks", [])]
    if len({r["rank"] for r in ranks}) != len(ranks):
        raise ValueError(f"loader states repeat a rank: {sorted(r['rank'] for r in ranks)}")
    return {**states[0], "ranks": sorted(ranks, key=lambda r: r["rank"])}


def check_state(state: Any) -> None:
    if not isinstance(state, dict) or state.get("version") != VERSION or "ranks" not in state:
        raise ValueError(f"not a loader state (version {VERSION}) from Loader.state_dict(): got "
                         f"{type(state).__name__} with keys {sorted(state)[:8] if isinstance(state, dict) else '-'}")


def plan_resume(state: dict[str, Any], layout: dict[str, Any], rank: int) -> dict[str, Any]:
    """What this rank's loader does next: ``{"epoch", "readers", "next_worker", "ended", "exact"}``.

    ``readers`` maps worker id to ``{"datasets": [[epoch, offset], ...], "draws", "pending"}``; empty means
    "start ``epoch`` fresh" (see the module docstring for the changed-layout rule).
    """
    check_state(state)
    changed = [k for k in LAYOUT_KEYS if state.get(k) != layout.get(k)]
    mine = [r for r in state["ranks"] if r["rank"] == rank]
    if not changed and mine:
        r = mine[0]
        readers = {int(w["worker"]): {"datasets": [list(p) for p in w["datasets"]], "draws": int(w["draws"]),
                                      "pending": [[[list(p) for p in pos], d, draw] for pos, d, draw in w["pending"]],
                                      "batches": int(w.get("batches", 0))}
                   for w in r["readers"]}
        return {"epoch": r["epoch"], "readers": readers, "next_worker": r["next_worker"],
                "ended": list(r["ended"]), "exact": True}
    if not changed:
        raise ValueError(
            f"the loader state holds ranks {[r['rank'] for r in state['ranks']]} but not rank {rank}: save every "
            "rank's Loader.state_dict() and join them with data_pipelines.state.merge_states (or keep one state "
            "file per rank)")
    positions = [p for r in state["ranks"] for w in r["readers"] for p in w["datasets"]]
    begun = [e for r in state["ranks"] for e in [r["epoch"]]] + [e for e, _ in positions]
    newest = max(begun)
    touched = any(e == newest and off != 0 for e, off in positions)
    epoch = newest + 1 if touched else newest
    log.warning("loader state was saved with a different %s (%s -> %s): exact resume is impossible; starting "
                "epoch %d fresh, so nothing already seen in epoch %d is repeated (its unread rest is skipped)",
                "/".join(changed), [state.get(k) for k in changed], [layout.get(k) for k in changed], epoch, newest)
    return {"epoch": epoch, "readers": {}, "next_worker": 0, "ended": [], "exact": False}


def in_worker_order(batches: Iterable[dict[str, Any]], num_readers: int, next_worker: int,
                    ended: set[int]) -> Iterator[dict[str, Any]]:
    """Yield batches round-robin by their ``worker`` field, starting at ``next_worker``.

    The DataLoader also takes workers round-robin, but always from worker 0; holding back at most a
    few batches here lets a resumed loader continue with the worker whose turn it was. A batch with
    ``end`` marks its worker as finished. Yields ``(batch, next_worker)``-annotated batches: the
    turn that follows is stored in ``batch["next_worker"]``.
    """
    queues: dict[int, deque] = {w: deque() for w in range(num_readers)}
    source = iter(batches)
    w = next_worker
    while len(ended) < num_readers:
        if w in ended:
            w = (w + 1) % num_readers
            continue
        while not queues[w]:
            batch = next(source, None)
            if batch is None:  # the source ended without every end marker (cannot happen with our stages)
                for q in queues.values():
                    yield from q
                return
            queues[batch["worker"]].append(batch)
        batch = queues[w].popleft()
        if batch.get("end"):
            ended.add(w)
        w = (w + 1) % num_readers
        batch["next_worker"] = w
        yield batch
