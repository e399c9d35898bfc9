"""Where a split-mode stream stands, and how another layout (world size, workers, batch size) takes over.

A *layout* is (world size, lanes, micro batch size) plus what fixes the stream (seed, shuffle
buffer, the shard list). :func:`position` describes a layout's stream after ``step`` micro-batches
per rank as a small JSON dict; it is computed from the spec alone, without reading data.

Split mode, on a layout change mid-epoch ``e`` (see :func:`make_plan`):

1. The samples the old layout consumed in epoch ``e`` are recomputed by simulating each old lane on
   sample ids ``(shard, ordinal)`` only: the lane's shard list is a function of (seed, epoch, old
   world size, old lanes), our shuffle buffer (:func:`shuffled`) draws from a seeded
   ``random.Random`` whose calls depend on the number of items, never on their content.
2. The unseen rest of epoch ``e``, in the epoch's shard order, is cut into ``world * lanes``
   contiguous blocks (balanced to one sample, so a lane reads about its share plus two partial
   shards), shuffled per lane and batched: ``batches = (len(rest) // lanes) // batch_size`` per
   lane. What does not fill a batch is this epoch's remainder, as in any split epoch.
3. Epochs ``e + 1, ...`` are the new layout's ordinary epochs, starting right after.

Bound: old lanes differ by at most one batch, so near an epoch boundary some old lanes may already
have consumed a batch of epoch ``e + 1``; that batch (at most ``lanes - 1`` per old rank) can be seen
again in the new layout's epoch ``e + 1``. Within epoch ``e`` no sample is seen twice. A sample that
``skip_corrupt`` dropped changes the real stream but not the simulation, so accounting across a
change is exact only for chunks without bad samples.

A position saved by a layout that is itself finishing a remainder keeps that history (``remainder``,
with the older position nested), so a further restart inside the remainder, with the same or yet
another layout, stays deterministic. Once the remainder is over the history is dropped.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Any, TypeVar

from mdt_ds.dist import derive_seed

if TYPE_CHECKING:
    from mdt_ds.data.loader import StreamSpec

log = logging.getLogger(__name__)
T = TypeVar("T")
SampleId = tuple[int, int]  # (shard position in the spec, member ordinal in the shard)
POSITION_VERSION = 1


# --------------------------------------------------------------------------- shuffle and epochs
def shuffled(items: Iterable[T], size: int, rng: random.Random) -> Iterator[T]:
    """A shuffle buffer of ``size`` items. Our own (not webdataset's) so that the permutation is a
    documented function of the item count and the seed: :func:`simulate` replays it on ids."""
    if size <= 1:
        yield from items
        return
    buf: list[T] = []
    for item in items:
        buf.append(item)
        if len(buf) >= size:
            k = rng.randrange(len(buf))
            buf[k], buf[-1] = buf[-1], buf[k]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def epoch_order(spec: StreamSpec, epoch: int) -> list[int]:
    """The epoch's shard permutation: shared by all ranks and every layout (seed and epoch only)."""
    order = list(range(len(spec.shards)))
    random.Random(derive_seed(spec.seed, "epoch", epoch)).shuffle(order)
    return order


def epoch_lane_shards(spec: StreamSpec, epoch: int) -> list[list[int]]:
    """Shard indices of every (rank, lane) in this epoch, split by node then by worker as
    webdataset's split_by_node/split_by_worker do."""
    order = epoch_order(spec, epoch)
    return [
        order[r :: spec.world_size][lane :: spec.lanes] for r in range(spec.world_size) for lane in range(spec.lanes)
    ]


def epoch_batches(spec: StreamSpec, epoch: int) -> int:
    """Batches every lane yields in this epoch: the smallest lane's share, so ranks stay in step."""
    return min(sum(spec.counts[i] for i in part) for part in epoch_lane_shards(spec, epoch)) // spec.batch_size


def lane_seed(spec: StreamSpec, rank: int, lane: int, epoch: int) -> int:
    return derive_seed(spec.seed, rank, spec.lanes, lane, epoch, "shuffle")


def remainder_seed(spec: StreamSpec, rank: int, lane: int, epoch: int, step: int) -> int:
    return derive_seed(spec.seed, rank, spec.lanes, lane, epoch, step, "remainder")


def served(steps: int, lane: int, lanes: int) -> int:
    """How many of steps ``0 .. steps-1`` lane ``lane`` served (step ``s`` is lane ``s % lanes``'s)."""
    return max(0, (steps - lane + lanes - 1) // lanes)


def simulate(ids: list[SampleId], size: int, seed: int, n: int) -> list[SampleId]:
    """The first ``n`` ids a lane yields: the reading order through the seeded shuffle buffer."""
    return list(islice(shuffled(ids, size, random.Random(seed)), n))


# --------------------------------------------------------------------------- positions
def data_id(spec: StreamSpec) -> int:
    """Which data set (shard names and counts): a position only applies to the same shards."""
    names = [s.rsplit("/", 1)[-1] for s in spec.shards]
    return zlib.crc32(repr((names, list(spec.counts))).encode())


def layout_of(spec: StreamSpec) -> dict[str, Any]:
    return {
        "mode": "resampled" if spec.resampled else "split",
        "world_size": spec.world_size,
        "lanes": spec.lanes,
        "batch_size": spec.batch_size,
        "seed": spec.seed,
        "shuffle_buffer": spec.shuffle_buffer,
        "data": data_id(spec),
    }


@dataclass(frozen=True)
class Plan:
    """How this layout's split stream is laid out in steps: an optional remainder of epoch
    ``rem_epoch`` over steps ``[rem_step, base_step)``, then ordinary epochs from ``base_epoch`` at
    ``base_step``. ``blocks``: this rank's remainder ids per lane (read in this order)."""

    base_step: int = 0
    base_epoch: int = 0
    remainder: dict[str, Any] | None = None
    blocks: tuple[tuple[SampleId, ...], ...] = ()


def position(spec: StreamSpec, plan: Plan, step: int) -> dict[str, Any]:
    """JSON-serialisable description of this layout's stream after ``step`` micro-batches per rank."""
    pos = dict(layout_of(spec), version=POSITION_VERSION, step=step)
    pos["samples"] = step * spec.batch_size * spec.world_size  # the invariant across layouts
    pos["base"] = {"step": plan.base_step, "epoch": plan.base_epoch}
    pos["remainder"] = plan.remainder if plan.remainder is not None and step < plan.base_step else None
    return pos


def spec_of(spec: StreamSpec, pos: dict[str, Any]) -> StreamSpec:
    """The spec of the layout that saved ``pos`` (same shards; rank is irrelevant here)."""
    return dataclasses.replace(
        spec,
        world_size=pos["world_size"],
        lanes=pos["lanes"],
        batch_size=pos["batch_size"],
        seed=pos["seed"],
        shuffle_buffer=pos["shuffle_buffer"],
        rank=0,
    )


def lane_ids(spec: StreamSpec, rank: int, lane: int, epoch: int) -> list[SampleId]:
    mine = epoch_lane_shards(spec, epoch)[rank * spec.lanes + lane]
    return [(i, m) for i in mine for m in range(spec.counts[i])]


def consumed(spec: StreamSpec, pos: dict[str, Any]) -> tuple[int, set[SampleId]]:
    """(epoch in progress, ids of it consumed) for the layout and step in ``pos``."""
    old = spec_of(spec, pos)
    step, lanes, rem = pos["step"], old.lanes, pos.get("remainder")
    if rem is not None and step < pos["base"]["step"]:
        epoch, seen = consumed(spec, rem["from"])
        blocks = split_blocks(unseen(spec, epoch, seen), old.world_size * lanes)
        for r in range(old.world_size):
            for q in range(lanes):
                n = served(step - rem["step"], q, lanes) * old.batch_size
                seed = remainder_seed(old, r, q, epoch, rem["step"])
                seen.update(simulate(list(blocks[r * lanes + q]), old.shuffle_buffer, seed, n))
        return epoch, seen
    walked = []
    for lane in range(lanes):
        epoch, left = pos["base"]["epoch"], served(step - pos["base"]["step"], lane, lanes)
        while left >= (n := epoch_batches(old, epoch)):
            epoch, left = epoch + 1, left - n
        walked.append((epoch, left))
    current = min(e for e, _ in walked)
    seen: set[SampleId] = set()
    for r in range(old.world_size):
        for lane, (epoch, left) in enumerate(walked):
            # A lane already in the next epoch finished this one (its next-epoch batch: the bound).
            n = (left if epoch == current else epoch_batches(old, current)) * old.batch_size
            seen.update(
                simulate(lane_ids(old, r, lane, current), old.shuffle_buffer, lane_seed(old, r, lane, current), n)
            )
    return current, seen


def unseen(spec: StreamSpec, epoch: int, seen: set[SampleId]) -> list[SampleId]:
    """The ids of ``epoch`` not in ``seen``, in the epoch's shard order."""
    return [(i, m) for i in epoch_order(spec, epoch) for m in range(spec.counts[i]) if (i, m) not in seen]


def split_blocks(ids: list[SampleId], parts: int) -> list[tuple[SampleId, ...]]:
    """Contiguous, balanced (to one sample) blocks: each lane reads few shards."""
    return [tuple(ids[g * len(ids) // parts : (g + 1) * len(ids) // parts]) for g in range(parts)]


def make_plan(spec: StreamSpec, start_step: int, resume_from: dict[str, Any] | None) -> Plan:
    """The plan of a loader starting at ``start_step`` after a run that saved ``resume_from``."""
    if resume_from is None or spec.resampled or resume_from.get("mode") != "split":
        return Plan()  # resampled streams follow from (seed, rank, lanes, step) alone
    if resume_from.get("data") != data_id(spec):
        log.warning("the saved data position is for other shards; starting split epochs afresh")
        return Plan()
    expected = start_step * spec.batch_size * spec.world_size
    if resume_from["samples"] != expected:
        log.warning("resuming at %d samples but the saved position is at %d", expected, resume_from["samples"])
    same = all(resume_from[k] == v for k, v in layout_of(spec).items())
    if same:
        base = resume_from["base"]
        return plan_with(spec, base["step"], base["epoch"], resume_from.get("remainder"))
    epoch, seen = consumed(spec, resume_from)
    if not seen:  # exactly at an epoch boundary: no remainder to finish
        return Plan(start_step, epoch)
    from_pos = dict(resume_from)
    if from_pos.get("remainder") is not None and from_pos["step"] >= from_pos["base"]["step"]:
        from_pos["remainder"] = None
    rest = unseen(spec, epoch, seen)
    batches = len(rest) // (spec.world_size * spec.lanes) // spec.batch_size
    rem = {"step": start_step, "epoch": epoch, "batches": batches, "from": from_pos}
    return plan_with(spec, start_step + batches * spec.lanes, epoch + 1, rem)


def plan_with(spec: StreamSpec, base_step: int, base_epoch: int, rem: dict[str, Any] | None) -> Plan:
    """A plan with this rank's remainder blocks recomputed from the nested position."""
    if rem is None:
        return Plan(base_step, base_epoch)
    epoch, seen = consumed(spec, rem["from"])
    if epoch != rem["epoch"]:
        raise ValueError(f"inconsistent data position: remainder of epoch {rem['epoch']} but history says {epoch}")
    blocks = split_blocks(unseen(spec, epoch, seen), spec.world_size * spec.lanes)
    mine = tuple(blocks[spec.rank * spec.lanes + q] for q in range(spec.lanes))
    return Plan(base_step, base_epoch, rem, mine)
