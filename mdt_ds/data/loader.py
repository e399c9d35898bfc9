"""The training stream: webdataset shards -> shuffled batches -> ``(x, y)`` tensors.

Batches are numbered by step ``k`` (0, 1, 2, ... batches of this loader on this rank). DataLoader
workers hand out batches round robin, so with ``N = max(1, num_workers)`` lanes, batch ``k`` comes
from lane ``k % N`` as that lane's batch ``j = k // N``. Each lane's stream is cut into chunks
whose content is fixed by (seed, rank, N, lane, chunk):

- resampled mode: chunks of ``segment_batches`` batches; each re-seeds ``ResampledShards``
  (``deterministic=True``) and the shuffle buffer. Restoring position ``j`` therefore replays at
  most one chunk (raw bytes only, nothing decoded) instead of the whole history.
- split mode: a chunk is an epoch; the epoch's shard permutation is shared by all ranks and split
  by rank then by lane (``split_by_node``/``split_by_worker``); every lane yields the same number
  of batches per epoch, so all ranks stay in the same epoch.

The posterior draw ``z = (mean + exp(logvar / 2) eps) * scale`` and the flip choice happen after
batching, vectorised, with a generator seeded from (seed, rank, k). So ``start_step=k`` yields
exactly batches k, k+1, ... of an uninterrupted stream with the same settings (both modes). The
stream depends on ``num_workers`` (0 and 1 agree).

Corruption: every sample's crc32 (header, array, key) and its label (``0 <= y < num_classes``) are
checked as the shard is read, before any bytes reach the shuffle buffer. A bad sample raises a
``SampleError`` naming the shard, the sample and the fix; with ``skip_corrupt`` it is logged
(rate-limited), counted (:attr:`Loader.skipped_samples`) and its slot taken by the next sample. A
split lane left short wraps around its own shards, so every lane still yields the epoch's batch
count and ranks stay in step. Skipping breaks bit-exact replay only for the chunk (resampled
segment or split epoch) that holds the bad sample.

World-size changes (elastic resume): ``Loader.position(k)`` describes the stream after k
micro-batches per rank; ``build_loader(start_step=k, resume_from=position)`` continues it. Resampled
mode: the new layout's stream is its own deterministic stream from step k (``resume_from`` is
not needed). Split mode: the new layout finishes the current epoch over the samples the old layout
has not consumed, then runs its ordinary epochs; see :mod:`mdt_ds.data.position` for the bound.
"""

from __future__ import annotations

import logging
import math
import random
import signal
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mdt_ds.data.position import (
    Plan,
    epoch_batches,
    epoch_lane_shards,
    lane_seed,
    make_plan,
    position,
    remainder_seed,
    shuffled,
)
from mdt_ds.data.shards import (
    EXT,
    HEADER,
    MAGIC,
    REEXTRACT_HINT,
    LayoutError,
    SampleError,
    SampleLayout,
    ShardError,
    check_payload,
    manifest_layout,
    pixels_to_float,
    read_manifest,
    sample_problem,
    validate_shards,
)
from mdt_ds.dist import derive_seed

log = logging.getLogger(__name__)

NAMED_SOURCES = ("mnist16", "mnist32", "tiny-latents")


@dataclass(frozen=True)
class StreamSpec:
    """Everything that fixes the stream (picklable: DataLoader workers get a copy)."""

    shards: tuple[str, ...]
    counts: tuple[int, ...]
    layout: SampleLayout
    batch_size: int
    seed: int
    rank: int
    world_size: int
    lanes: int
    shuffle_buffer: int
    resampled: bool
    flip: bool
    segment_batches: int
    skip_corrupt: bool
    with_index: bool
    num_classes: int | None = None  # labels outside [0, num_classes) are corruption


# --------------------------------------------------------------------------- raw samples
_TAR_BLOCK = 512
_SKIP_TYPES = (b"x", b"g", b"5")  # pax headers (metadata only for our short names) and directories


def _octal(field: bytes) -> int:
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def read_tar_members(url: str) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular member. A lean reader for the plain ustar shards we write:
    Python's tarfile stream parser costs ~100 us per member on this CPU, a tenth of the budget of a
    10,000 latents/s loader. Header checksums are checked, so corruption still fails loudly."""
    with open(url, "rb", buffering=1 << 20) as fh:
        while True:
            header = fh.read(_TAR_BLOCK)
            if len(header) < _TAR_BLOCK:
                raise ShardError(f"unexpected end of file after {fh.tell() - len(header)} bytes (truncated)")
            if header[0] == 0 and header.count(0) == _TAR_BLOCK:
                return  # end-of-archive block
            try:
                checksum, size = _octal(header[148:156]), _octal(header[124:136])
            except ValueError as err:
                raise ShardError(f"bad tar header at byte {fh.tell() - _TAR_BLOCK}") from err
            if checksum != sum(header[:148]) + 256 + sum(header[156:]):
                raise ShardError(f"tar header checksum mismatch at byte {fh.tell() - _TAR_BLOCK}")
            name = header[:100].split(b"\0", 1)[0].decode("utf-8")
            pad = -size % _TAR_BLOCK
            data = fh.read(size)  # read the padding separately: slicing it off would copy the payload
            if len(data) < size or len(fh.read(pad)) < pad:
                raise ShardError(f"unexpected end of file in member {name} (truncated)")
            if header[156:157] not in _SKIP_TYPES:
                yield name, data


class Skips:
    """Counts the samples ``skip_corrupt`` dropped, per lane, in a shared-memory tensor: DataLoader
    workers are other processes, and a plain counter there would never reach the main process."""

    def __init__(self, lanes: int):
        self.counts = torch.zeros(lanes, dtype=torch.int64).share_memory_()
        self.lane = 0  # set in each worker (its own copy of this object) before reading

    def add(self, url: str, key: str, problem: str) -> None:
        self.counts[self.lane] += 1
        n = _WARNED[0] = _WARNED[0] + 1
        # Rate-limited: the first few in full, then one line per 100 (with the running total).
        if n <= 5 or n % 100 == 0:
            log.warning("skipping corrupt sample %s of shard %s (%s); %d skipped so far", key, url, problem, n)


_WARNED = [0]  # bad samples met by this process (for the log's rate limit only)


def _bad_sample(url: str, key: str, data: bytes, problem: str, spec: StreamSpec, skips: Skips | None) -> None:
    if not spec.skip_corrupt:
        source = data[HEADER.size + spec.layout.nbytes :].decode("utf-8", "replace")
        raise SampleError(f"shard {url}, sample {key} (source key {source!r}): {problem}; {REEXTRACT_HINT}")
    if skips is not None:
        skips.add(url, key, problem)


def _shard_samples(url: str, spec: StreamSpec, skips: Skips | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard in webdataset's sample form (``__key__``, ``__url__``, extension,
    plus ``__ord__``, the member's ordinal in the shard). Each sample's crc and label are checked
    here, before any bytes become tensors; a corrupt shard raises naming it, or is logged and cut
    short when ``skip_corrupt``."""
    try:
        for ordinal, (name, data) in enumerate(read_tar_members(url)):
            key, ext = name.split(".", 1)
            problem = sample_problem(data, spec.layout, spec.num_classes)
            if problem is not None:
                _bad_sample(url, key, data, problem, spec, skips)
                continue
            yield {"__key__": key, "__url__": url, "__ord__": ordinal, ext: data}
    except ShardError as err:
        if isinstance(err, (SampleError, LayoutError)):
            raise
        _bad_shard(url, err, spec.skip_corrupt)
    except (OSError, ValueError, UnicodeDecodeError) as err:
        _bad_shard(url, err, spec.skip_corrupt)


def _bad_shard(url: str, err: Exception, skip_corrupt: bool) -> None:
    if not skip_corrupt:
        raise ShardError(
            f"shard {url} is corrupt or truncated ({err}); re-extract it "
            "(mdt-extract-latents redoes missing shards) or set data.skip_corrupt=true"
        ) from err
    log.warning("skipping the rest of corrupt shard %s (%s)", url, err)


def _batches(samples: Iterable[dict[str, Any]], spec: StreamSpec, shuffle_seed: int) -> Iterator[list[dict]]:
    """Seeded shuffle buffer (:func:`~mdt_ds.data.position.shuffled`), then full batches (a partial
    last batch is dropped)."""
    batch: list[dict] = []
    for sample in shuffled(samples, spec.shuffle_buffer, random.Random(shuffle_seed)):
        batch.append(sample)
        if len(batch) == spec.batch_size:
            yield batch
            batch = []


def _resampled_chunk(spec: StreamSpec, lane: int, chunk: int, skips: Skips | None) -> Iterator[list[dict]]:
    import webdataset as wds

    base = (spec.seed, spec.rank, spec.lanes, lane, chunk)
    urls = wds.ResampledShards(
        list(spec.shards), seed=derive_seed(*base, "shards"), deterministic=True, worker_seed=lambda: 0
    )  # our seed already says which rank and lane

    def samples() -> Iterator[dict[str, Any]]:
        for entry in urls:
            yield from _shard_samples(entry["url"], spec, skips)

    stream = _batches(samples(), spec, derive_seed(*base, "shuffle"))
    for _ in range(spec.segment_batches):
        yield next(stream)
    stream.close()  # closes the open shard now rather than at garbage collection


def _lane_samples(spec: StreamSpec, parts: list[tuple[int, Any]], skips: Skips | None) -> Iterator[dict[str, Any]]:
    """Samples of ``(shard, wanted ordinals or None for all)`` in order. With ``skip_corrupt`` a lane
    that lost samples wraps around its own parts, so it still fills the epoch's batch count (a few
    samples of this chunk are then seen twice)."""
    while True:
        got = 0
        for i, wanted in parts:
            for sample in _shard_samples(spec.shards[i], spec, skips):
                if wanted is None or sample["__ord__"] in wanted:
                    got += 1
                    yield sample
        if not spec.skip_corrupt:
            return
        if got == 0:
            raise ShardError(f"no readable sample left in shards {[spec.shards[i] for i, _ in parts]}")


def _take(stream: Iterator[list[dict]], n: int) -> Iterator[list[dict]]:
    for _, batch in zip(range(n), stream):
        yield batch
    stream.close()  # type: ignore[attr-defined]


def _split_chunk(spec: StreamSpec, lane: int, epoch: int, skips: Skips | None) -> Iterator[list[dict]]:
    mine = epoch_lane_shards(spec, epoch)[spec.rank * spec.lanes + lane]
    samples = _lane_samples(spec, [(i, None) for i in mine], skips)
    yield from _take(_batches(samples, spec, lane_seed(spec, spec.rank, lane, epoch)), epoch_batches(spec, epoch))


def _remainder_chunk(spec: StreamSpec, plan: Plan, lane: int, skips: Skips | None) -> Iterator[list[dict]]:
    """This lane's share of the rest of an epoch that another layout began (see data.position)."""
    parts: dict[int, set[int]] = {}
    for i, m in plan.blocks[lane]:
        parts.setdefault(i, set()).add(m)
    rem = plan.remainder
    assert rem is not None
    samples = _lane_samples(spec, list(parts.items()), skips)
    seed = remainder_seed(spec, spec.rank, lane, rem["epoch"], rem["step"])
    yield from _take(_batches(samples, spec, seed), rem["batches"])


def lane_raw_batches(
    spec: StreamSpec, lane: int, start: int, first_epoch: int = 0, skips: Skips | None = None
) -> Iterator[tuple[int, list[dict]]]:
    """``(j, raw batch)`` for this lane from its batch ``start`` on, forever (split epochs counted
    from ``first_epoch``). Fast-forward replays the raw bytes of the current chunk only."""
    if spec.resampled:
        chunk, skip = divmod(start, spec.segment_batches)
    else:
        chunk, skip = first_epoch, start
        while skip >= (n := epoch_batches(spec, chunk)):
            chunk, skip = chunk + 1, skip - n
    j = start
    while True:
        make = _resampled_chunk if spec.resampled else _split_chunk
        for i, batch in enumerate(make(spec, lane, chunk, skips)):
            if i >= skip:
                yield j, batch
                j += 1
        chunk, skip = chunk + 1, 0


def step_raw_batches(spec: StreamSpec, plan: Plan, first: int, skips: Skips | None) -> Iterator[tuple[int, list[dict]]]:
    """``(step, raw batch)`` for steps ``first, first + lanes, ...``: the plan's remainder steps (if
    any), then ordinary lane batches counted from the plan's base step."""
    lanes, step = spec.lanes, first
    rem = plan.remainder
    if rem is not None and step < plan.base_step:
        lane, skip = (step - rem["step"]) % lanes, (step - rem["step"]) // lanes
        for i, batch in enumerate(_remainder_chunk(spec, plan, lane, skips)):
            if i >= skip:
                yield step, batch
                step += lanes
    rel = step - plan.base_step
    lane = rel % lanes
    for j, batch in lane_raw_batches(spec, lane, rel // lanes, plan.base_epoch, skips):
        yield plan.base_step + lane + lanes * j, batch


# --------------------------------------------------------------------------- decoding
def decode_batch(
    batch: list[dict[str, Any]], layout: SampleLayout, flips: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw samples -> (arrays in the stored dtype, labels int64, sample indices int64).
    Moments with ``flips`` given: only the chosen half (image or flip) is copied, ``[B, *shape[1:]]``,
    which halves the memory traffic of the loader's largest copy; otherwise ``[B, *shape]``."""
    n, nbytes, fingerprint = len(batch), layout.nbytes, layout.fingerprint
    pick = layout.kind == "moments" and flips is not None
    width = nbytes // 2 if pick else nbytes
    offsets = (HEADER.size + flips.to(torch.int64) * width).tolist() if pick else [HEADER.size] * n
    buf = np.empty((n, width), np.uint8)
    labels = np.empty(n, np.int64)
    index = np.empty(n, np.int64)
    for i, sample in enumerate(batch):
        payload = sample.get(EXT, b"")
        # The crc and label were checked as the shard was read (_shard_samples); this is the cheap
        # guard for batches built by other code.
        magic, fp, label, key_len, _ = HEADER.unpack_from(payload) if len(payload) >= HEADER.size else (b"", 0, 0, 0, 0)
        if magic != MAGIC or fp != fingerprint or len(payload) != HEADER.size + nbytes + key_len:
            check_payload(payload, layout, f"shard {sample.get('__url__')}, sample {sample.get('__key__')}")
        buf[i] = np.frombuffer(payload, np.uint8, width, offsets[i])
        labels[i] = label
        index[i] = int(sample["__key__"])
    shape = layout.shape[1:] if pick else layout.shape
    arrays = torch.from_numpy(buf).view(layout.torch_dtype).view(n, *shape)
    return arrays, torch.from_numpy(labels), torch.from_numpy(index)


def draw_flips(n: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Which samples are mirrored; drawn first from the step's generator (then the posterior noise)."""
    return torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)


def make_inputs(
    arrays: torch.Tensor, layout: SampleLayout, flips: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Decoded arrays -> float32 model inputs. Pixels: mirror where ``flips``. Moments (already the
    chosen image/flip half, see :func:`decode_batch`): draw ``(mean + exp(logvar / 2) eps) * scale``."""
    if layout.kind == "pixels":
        x = pixels_to_float(arrays)
        # Read the CPU mask through numpy: ``bool(tensor)`` would dispatch _local_scalar_dense,
        # which the trainer's sync count (mdt_ds.syncs) would take for a device sync.
        return torch.where(flips[:, None, None, None], x.flip(-1), x) if flips.numpy().any() else x
    chosen = arrays.float()
    scale = float(layout.codec.get("scale_factor", 1.0))
    if layout.moments == "mean":
        return chosen.mul_(scale)
    mean, logvar = chosen.chunk(2, dim=1)
    eps = torch.randn(mean.shape, generator=generator)  # torch's CPU RNG: ~25% of the loader's time
    # (mean + exp(logvar / 2) eps) * scale, as scale * mean + exp(logvar / 2 + log scale) eps, in
    # place: each pass over a batch is a visible share of the loader's time.
    std = logvar.mul_(0.5).add_(math.log(scale)).exp_()
    return eps.mul_(std).add_(mean.mul_(scale))


def batch_inputs(
    raw: list[dict[str, Any]], spec: StreamSpec, step: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One raw batch -> (x, y, sample indices); all randomness from (seed, rank, step)."""
    gen = torch.Generator().manual_seed(derive_seed(spec.seed, spec.rank, step))
    flips = draw_flips(len(raw), spec.flip, gen)
    arrays, labels, index = decode_batch(raw, spec.layout, flips)
    return make_inputs(arrays, spec.layout, flips, gen), labels, index


class ShardStream(torch.utils.data.IterableDataset):
    """Infinite stream of decoded batches starting at ``start_step`` (see the module docstring)."""

    def __init__(self, spec: StreamSpec, start_step: int = 0, plan: Plan | None = None):
        super().__init__()
        self.spec = spec
        self.start_step = start_step
        self.plan = plan or Plan()
        self.skips = Skips(spec.lanes)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        spec = self.spec
        if workers != spec.lanes:
            raise RuntimeError(f"stream built for {spec.lanes} lanes but run by {workers} workers")
        # The DataLoader asks worker 0 first: it serves step start_step, worker 1 the next, ...
        first = self.start_step + worker
        self.skips.lane = first % spec.lanes
        for step, raw in step_raw_batches(spec, self.plan, first, self.skips):
            x, labels, index = batch_inputs(raw, spec, step)
            yield (x, labels, index) if spec.with_index else (x, labels)


@dataclass
class Loader:
    """What :func:`build_loader` returns: iterate for batches; the manifest and shapes ride along."""

    stream: ShardStream
    num_workers: int
    manifest: dict[str, Any]
    directory: Path
    skipped_shards: list[str]
    pin_memory: bool = False

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return self.stream.spec.layout.sample_shape

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def skipped_samples(self) -> int:
        """Corrupt samples skipped so far by this rank's reading (all workers: the count lives in
        shared memory). Workers read ahead of the trainer by the prefetch depth, and a resume's
        fast-forward re-reads (and re-counts) the current chunk."""
        return int(self.stream.skips.counts.sum())

    def position(self, start_step: int) -> dict[str, Any]:
        """Where this layout's stream is after ``start_step`` micro-batches per rank: a small JSON
        dict for ``build_loader(resume_from=...)`` by a run with another world size (no data read)."""
        return position(self.stream.spec, self.stream.plan, start_step)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        # Pinned (page-locked) batches are what make ``.to("cuda", non_blocking=True)`` overlap
        # with compute; from pageable memory that copy blocks the host. CUDA only: pinning needs
        # a CUDA runtime, and on a CPU-only machine the DataLoader only warns.
        if self.num_workers == 0:
            stream = iter(self.stream)
            return (tuple(t.pin_memory() for t in batch) for batch in stream) if self.pin_memory else stream
        loader = torch.utils.data.DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=4,
            worker_init_fn=_ignore_interrupts,
        )
        return iter(loader)


def _ignore_interrupts(worker_id: int) -> None:
    """A Ctrl-C reaches every process of the terminal's group, data-loader workers too: they must
    keep feeding the trainer, which finishes its step and checkpoints (a second Ctrl-C stops the
    trainer, which ends its workers)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def resolve_source(source: str, data_root: str | None = None) -> Path:
    """A shard directory, or a named embedded set built on first use."""
    if source in NAMED_SOURCES:
        from mdt_ds.data import demo

        root = data_root or demo.default_data_root()
        if source == "tiny-latents":
            return demo.ensure_tiny_latents(root)
        return demo.ensure_mnist_shards(root, source)
    path = Path(source).expanduser()
    if not path.is_dir():
        raise ShardError(f"data source {source!r} is neither a shard directory nor one of {', '.join(NAMED_SOURCES)}")
    return path


def check_shards(source: str, skip_corrupt: bool = False, data_root: str | None = None) -> tuple[list[str], list[str]]:
    """Open and check every shard of ``source`` (sizes, first headers): the usable shards' names
    and the messages of those skipped (``skip_corrupt``). Run once per job: each rank of a large
    job opening every shard of an ImageNet set at start-up is tens of thousands of opens."""
    directory = resolve_source(source, data_root)
    good, bad = validate_shards(directory, read_manifest(directory), skip_corrupt=skip_corrupt)
    return [p.name for p in good], bad


def build_loader(
    source: str,
    *,
    batch_size: int,
    seed: int,
    rank: int,
    world_size: int,
    num_workers: int,
    shuffle_buffer: int,
    resampled: bool = True,
    start_step: int = 0,
    skip_corrupt: bool = False,
    data_root: str | None = None,
    flip: bool | None = None,
    segment_batches: int = 1000,
    with_index: bool = False,
    pin_memory: bool = False,
    resume_from: dict[str, Any] | None = None,
    checked: tuple[list[str], list[str]] | None = None,
) -> Loader:
    """Validate the shards (layout, sizes) and return the stream of ``(x, y)`` batches for this rank.
    ``start_step`` counts batches of this loader (micro-batches); ``flip=None`` follows the manifest.
    ``resume_from``: a :meth:`Loader.position` saved by the run being resumed; None, or one of the
    same layout, gives exactly the stream without it (see the module docstring). ``checked``: the
    result of :func:`check_shards` done once elsewhere (rank 0 for every rank), else it runs here."""
    if batch_size < 1 or num_workers < 0 or not 0 <= rank < world_size:
        raise ValueError(
            f"bad loader arguments: batch_size={batch_size} num_workers={num_workers} "
            f"rank={rank} world_size={world_size}"
        )
    directory = resolve_source(source, data_root)
    manifest = read_manifest(directory)
    names, bad = checked if checked is not None else check_shards(source, skip_corrupt, data_root)
    good = [directory / name for name in names]
    counts = {e["name"]: e["samples"] for e in manifest["shards"]}
    lanes = max(1, num_workers)
    if not resampled and world_size * lanes > len(good):
        raise ShardError(
            f"{directory}: {len(good)} shards cannot be split over {world_size} ranks x {lanes} "
            "workers; use resampled mode, fewer workers, or smaller shards"
        )
    spec = StreamSpec(
        shards=tuple(str(p) for p in good),
        counts=tuple(counts[p.name] for p in good),
        layout=manifest_layout(manifest),
        batch_size=batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        lanes=lanes,
        shuffle_buffer=shuffle_buffer,
        resampled=resampled,
        flip=bool(manifest["flip"]) if flip is None else flip,
        segment_batches=max(1, segment_batches),
        skip_corrupt=skip_corrupt,
        with_index=with_index,
        num_classes=int(manifest["num_classes"]),
    )
    if not resampled and epoch_batches(spec, 0) == 0:
        raise ShardError(f"{directory}: a rank's share of an epoch holds fewer than batch_size={batch_size} samples")
    plan = make_plan(spec, start_step, resume_from)
    return Loader(ShardStream(spec, start_step, plan), num_workers, manifest, directory, bad, pin_memory)
