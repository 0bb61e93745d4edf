"""Long-context training: chunks that keep their activations in host memory instead of recomputing
them in the backward (`training.chunk_offload`, `RwkvForCausalLMBase.train_chunk_offload`).

A chunk run under activation checkpointing (`RwkvForCausalLMBase._chunked_loss`) runs its forward
twice, the second time in the backward; that second forward is 0.34-0.40 of an unchunked step
(H100, 2026-12-05), which caps a chunked step near 0.71-0.75x the unchunked one. An offloaded chunk
runs its forward once: every tensor autograd saves for its backward is copied to pinned host memory
on a side stream while the forward goes on, and copied back during the backward of the chunk after
it, at most `PREFETCH_BYTES` ahead of their use (what the step's peak may grow by).

The copies cross PCIe (~50 GB/s each way) and a chunk's activations are GiBs, so offloading every
chunk makes the forward wait on the copies: `offloaded_chunks` spreads a share of them between
recomputed ones, whose forwards give the copies time. The host memory (about one chunk's
activations per offloaded chunk) is pinned once and kept for the process (`HostMemoryPool`); when
the host runs short, the remaining chunks of the step are recomputed instead, with a warning.

The host's work per saved tensor matters: recomputing, the chunked RWKV-7 step keeps the GPU busy,
and an offloaded one leaves it idle while the host runs the hooks. So a block's saved tensors are
copied out together when it returns (one stream wait and one event), and come back as one piece
(`_Group`): one copy back per block, each tensor a view of it.

Measured on an H100 (2026-12-06, 65,536 tokens): the same gradient bit for bit (RWKV-7); RWKV-7 1.5B
0.83x the 4,096-token speed at share 0.5 and 0.86x at 0.7 (three processes; 0.76x recomputing),
RWKV-4 1.6B no faster (its copies outrun PCIe). benchmarks/NOTES.md.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import weakref
from collections import deque
from collections.abc import Iterator

import torch

logger = logging.getLogger(__name__)

ALIGN = 256  # bytes: where each tensor's piece of a host buffer starts (any dtype's alignment)
BLOCK_BYTES = 256 << 20  # host memory is pinned in buffers of this size (larger tensors get their own)
MIN_BYTES = 64 << 10  # smaller saved tensors stay on the device: their copy would cost more than it frees
HOST_RESERVE_BYTES = 4 << 30  # host memory never taken: the rest of the process, the data loader
# Activations copied out but not yet freed on the device: past this (or past the largest chunk's
# activations, whichever is more) the forward waits for the copies. One chunk in flight lets the
# copies run on through the next (recomputed) chunk's forward, which holds little.
MAX_IN_FLIGHT_BYTES = 2 << 30
# Copies back that no autograd node has used yet: at most this many bytes, which is what the step's
# peak may grow by. Enough to keep the copies ahead of the backward wherever PCIe outruns it.
PREFETCH_BYTES = 1 << 30


def offloaded_chunks(n_chunks: int, share: float) -> list[bool]:
    """Which of `n_chunks` chunks keep their activations in host memory: `share` (0..1) of the chunks
    before the last, spread evenly from the first. The last chunk never is: its backward runs first,
    straight after its forward, so it keeps its activations on the device and recomputes nothing."""
    candidates = n_chunks - 1
    count = min(candidates, int(share * candidates + 1e-9)) if candidates > 0 else 0  # rounded down
    # chunk i is offloaded when ceil(i * count / candidates) steps up at i + 1: evenly spaced, chunk 0 first
    plan = [_ceil_div((i + 1) * count, candidates) > _ceil_div(i * count, candidates) for i in range(candidates)]
    return plan + [False] if n_chunks > 0 else []


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(n: int, multiple: int) -> int:
    return _ceil_div(n, multiple) * multiple


def is_dense(t: torch.Tensor) -> bool:
    """Whether `t`'s elements fill a span of its storage exactly once, in some order of its dims (a
    contiguous tensor or a permutation of one): then that span is all there is to copy."""
    expected = 1
    for stride, size in sorted((s, n) for n, s in zip(t.shape, t.stride()) if n > 1):
        if stride != expected:
            return False
        expected *= size
    return True


def available_host_bytes() -> int | None:
    """Host memory the kernel says is available (MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def _spare_host_bytes() -> int | None:
    """Host memory the offload may still take (None: unknown, so no limit)."""
    available = available_host_bytes()
    return None if available is None else available - HOST_RESERVE_BYTES


@functools.cache
def warn_host_memory_short() -> None:
    """Once per process: the host ran short and some chunks were recomputed instead."""
    logger.warning(
        "training.chunk_offload: the host is short of memory, so some chunks planned for host memory were "
        "recomputed instead (slower, same gradient); lower training.chunk_offload or free host memory"
    )


class HostMemoryPool:
    """Host buffers (pinned when the device is a GPU: asynchronous copies need it), kept for reuse by
    later steps: pinning GiBs takes a while, and the step after needs as many again."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self.free: dict[int, list[torch.Tensor]] = {}
        self.total_bytes = 0
        self.chunk_bytes_hint = 0  # the largest chunk offloaded so far: what the next one will likely take

    def can_lease(self, nbytes: int) -> bool:
        """Whether `nbytes` more could be leased, from free buffers or fresh host memory."""
        free = sum(size * len(buffers) for size, buffers in self.free.items())
        spare = _spare_host_bytes()
        return spare is None or nbytes <= free + max(0, spare)

    def lease(self, nbytes: int) -> torch.Tensor | None:
        """A uint8 buffer of at least `nbytes`, or None when the host cannot spare one."""
        size = BLOCK_BYTES if nbytes <= BLOCK_BYTES else 1 << (nbytes - 1).bit_length()
        free = self.free.get(size)
        if free:
            return free.pop()
        spare = _spare_host_bytes()
        if spare is not None and size > spare:
            return None
        buffer = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)
        self.total_bytes += size
        return buffer

    def give_back(self, buffers: list[torch.Tensor], copies: torch.cuda.Stream | None = None) -> None:
        """Take `buffers` back for reuse, once `copies` (the stream that copied to and from them) has
        nothing left in flight: a copy still running, e.g. of a group copied back and never used,
        must not meet the next step's copies into the same memory."""
        if copies is not None:
            copies.synchronize()
        for buffer in buffers:
            self.free.setdefault(buffer.numel(), []).append(buffer)
        buffers.clear()


_POOLS: dict[bool, HostMemoryPool] = {}


def host_memory_pool(pin: bool) -> HostMemoryPool:
    """The process's pool (one per pinning): the host memory of one step serves the next."""
    if pin not in _POOLS:
        _POOLS[pin] = HostMemoryPool(pin)
    return _POOLS[pin]


class HostArena:
    """One chunked step's host memory: aligned pieces cut from buffers leased from the pool, given
    back when the arena is collected, i.e. when autograd has dropped every tensor packed into it (a
    second forward before the first one's backward gets buffers of its own)."""

    def __init__(self, pool: HostMemoryPool, copies: torch.cuda.Stream | None = None) -> None:
        self.buffers: list[torch.Tensor] = []
        self.current: torch.Tensor | None = None
        self.offset = 0
        self.pool = pool
        # not at exit: the pool goes with the process, and CUDA may be gone before this runs
        weakref.finalize(self, pool.give_back, self.buffers, copies).atexit = False

    def room(self) -> int:
        """Bytes left in the buffer being cut."""
        return 0 if self.current is None else max(0, self.current.numel() - self.offset)

    def take(self, nbytes: int) -> tuple[torch.Tensor, int] | None:
        """`nbytes` of host memory: (uint8 buffer, byte offset in it), or None when the pool has no
        more to lease. Pieces taken one after another from one buffer are adjacent (but for the
        alignment), so what a block saved can come back in one copy (`_Group`)."""
        own_buffer = nbytes > BLOCK_BYTES
        if own_buffer or self.current is None or nbytes > self.room():
            buffer = self.pool.lease(nbytes)
            if buffer is None:
                return None
            self.buffers.append(buffer)
            if own_buffer:
                return buffer, 0
            self.current, self.offset = buffer, 0
        offset = self.offset
        self.offset = _round_up(offset + nbytes, ALIGN)
        return self.current, offset


class _Group:
    """Saved tensors copied out together (what one block saved, in one run of one host buffer) and
    copied back together: one host-to-device copy into one device buffer, of which each tensor is a
    view. Copied back one by one, each tensor cost the backward's host an allocation, a copy, a
    stream record and the prefetch's bookkeeping: a third of what the host ran while the compute
    stream sat idle in a profiled step (H200, 2026-12-06)."""

    __slots__ = (
        "offload", "chunk", "host", "members", "unserved", "on_device", "ready", "fetched", "ahead", "__weakref__",
    )  # fmt: skip

    def __init__(self, offload: ChunkOffload, chunk: int, host: torch.Tensor, members: int) -> None:
        self.offload = offload  # keeps the arena (and its host memory) as long as this lives
        self.chunk = chunk
        self.host = host  # uint8, the run of the host buffer its tensors were copied to
        self.members = members
        self.unserved = members  # tensors whose last unpack has not come yet in this backward
        self.on_device: torch.Tensor | None = None  # uint8, once copied back
        self.ready: torch.cuda.Event | None = None
        self.fetched = False  # copied back once already (the prefetch skips it)
        self.ahead = False  # copied back by the prefetch, none of its tensors used yet

    @property
    def nbytes(self) -> int:
        return self.host.numel()


class _Packed:
    """A saved tensor that waits in host memory: its group, where in the group it lies, and the
    layout to rebuild it with."""

    __slots__ = ("group", "offset", "nbytes", "size", "stride", "dtype", "saves", "uses", "on_device", "__weakref__")

    def __init__(self, offset: int, source: torch.Tensor) -> None:
        self.group: _Group | None = None  # set when the copy out is issued (`ChunkOffload.flush`)
        self.offset = offset  # bytes from the group's start (from the host buffer's, until then)
        self.nbytes = source.nbytes
        self.size, self.stride, self.dtype = source.size(), source.stride(), source.dtype
        self.saves = 1  # how many autograd nodes saved it (the same tensor is packed once)
        self.uses = 1  # how many of them have yet to unpack it in this backward
        self.on_device: torch.Tensor | None = None

    @property
    def chunk(self) -> int:
        return self.group.chunk


class ChunkOffload:
    """The saved-tensor hooks of one chunked forward's offloaded chunks, and the prefetch that brings
    their tensors back in the backward.

    `enter_chunk(i)` comes before every chunk's forward, `start_chunk()` says whether an offloaded
    one can be, and `saving()` wraps its forward; `drain()` waits for the copies out before the last
    chunk (which keeps its activations: they must not meet a chunk's worth still in flight).
    `block_output_hook` is called with every block's output hidden state of every chunk
    (`RwkvModelBase.block_output_hook`): in the forward it issues the copies out of what the block
    saved, together (`flush`: one `_Group`), and it makes each block's backward first top up the
    prefetch; `finish_forward()` waits for the last copies out and opens the prefetch. The prefetch
    keeps at most `PREFETCH_BYTES` copied back ahead of their use, a group at a time, and brings back
    only the chunk right before the one in its backward: one further back would sit in memory
    through the recompute of the chunks between, raising the peak. (It counts its own bytes: asking
    the allocator, `torch.cuda.memory_allocated`, builds every statistic at each call, and thousands of
    calls per step cost more host time than the offload saves.)
    """

    def __init__(self, device: torch.device, protected: set[int]) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.arena = HostArena(host_memory_pool(pin=self.cuda), self.stream)
        self.protected = protected  # storages never copied: the parameters and buffers
        self.by_key: dict[tuple, tuple[weakref.ref, weakref.ref]] = {}
        self.queue: list[weakref.ref] = []  # groups in the order they were saved
        # Copies out not yet issued, (tensor, host buffer, packed): a compiled block saves all its
        # tensors at its end, so they are copied together, one stream wait and one event for the lot.
        self.pending: list[tuple[torch.Tensor, torch.Tensor, _Packed]] = []
        # Copies out issued and not known to have ended: (event, bytes, their device tensors, held
        # until then: their memory must not be reused before the copies have read it).
        self.in_flight: deque[tuple[torch.cuda.Event, int, list[torch.Tensor]]] = deque()
        self.in_flight_bytes = 0
        self.last_waited: tuple | None = None  # (stream, event): the copies back that stream last waited for
        self.window: int | None = None  # bytes the prefetch may hold ahead; None: no prefetch
        self.ahead_bytes = 0
        self.host_full = False
        self.packed_bytes = 0
        self.chunk = 0  # the chunk whose forward runs

    @classmethod
    def for_model(cls, model: torch.nn.Module, device: torch.device) -> ChunkOffload:
        protected = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        return cls(device, protected)

    def enter_chunk(self, index: int) -> None:
        self.chunk = index

    def start_chunk(self) -> bool:
        """Whether the next chunk can be offloaded: the host can take as much as the largest chunk
        so far (the first one ever: any memory at all). Otherwise it and the rest are recomputed, so
        that no chunk is left holding its activations on the device half-way."""
        pool = self.arena.pool
        if not self.host_full:
            needed = max(pool.chunk_bytes_hint, 1) - self.arena.room()
            self.host_full = needed > 0 and not pool.can_lease(needed)
        return not self.host_full

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """Around an offloaded chunk's forward (after `start_chunk` said yes)."""
        start = self.packed_bytes
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            yield
        self.flush()
        pool = self.arena.pool
        pool.chunk_bytes_hint = max(pool.chunk_bytes_hint, self.packed_bytes - start)

    # -- the forward: copies out --------------------------------------------------------------

    def _worth_offloading(self, t: torch.Tensor) -> bool:
        return (
            t.device == self.device
            and t.layout == torch.strided
            and t.nbytes >= MIN_BYTES
            and (t.is_contiguous() or is_dense(t))
            and t.untyped_storage().data_ptr() not in self.protected
        )

    def pack(self, t: torch.Tensor) -> torch.Tensor | _Packed:
        if self.host_full or not self._worth_offloading(t):
            return t
        # A tensor saved by several nodes (LoRA's input, for one) is copied once. The key holds the
        # version (in-place changes) and the tensor itself, weakly: memory freed and reused by another
        # tensor of the same shape must not match.
        key = (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t._version)
        seen = self.by_key.get(key)
        if seen is not None and seen[0]() is t and (packed := seen[1]()) is not None:
            packed.saves += 1
            packed.uses += 1
            return packed
        place = self.arena.take(t.nbytes)
        if place is None:
            self.host_full = True
            return t
        buffer, offset = place
        packed = _Packed(offset, t)
        self.pending.append((t, buffer, packed))  # copied at the block's end (`flush`)
        self.by_key[key] = (weakref.ref(t), weakref.ref(packed))
        self.packed_bytes += packed.nbytes
        return packed

    def flush(self) -> None:
        """Issue the pending copies out: on a GPU, on the side stream once the compute stream has made
        them (the forward goes on meanwhile); on a CPU, at once. Each run of them in one host buffer
        becomes a `_Group`."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        sources = [t.as_strided((t.numel(),), (1,)).view(torch.uint8) for t, _, _ in pending]  # the dense spans
        pieces = [buffer[p.offset : p.offset + p.nbytes] for _, buffer, p in pending]
        self._group(pending)
        if not self.cuda:
            _copy_all(pieces, sources, non_blocking=False)
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            _copy_all(pieces, sources, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        self._bound_in_flight(done, sum(piece.numel() for piece in pieces), sources)

    def _group(self, pending: list[tuple[torch.Tensor, torch.Tensor, _Packed]]) -> None:
        """Make groups of the pending copies, one per run of them in one host buffer."""
        for _, entries in itertools.groupby(pending, key=lambda entry: id(entry[1])):
            entries = list(entries)
            run = [packed for _, _, packed in entries]
            first, last = run[0].offset, run[-1].offset + run[-1].nbytes
            group = _Group(self, self.chunk, entries[0][1][first:last], len(run))
            for packed in run:
                packed.group, packed.offset = group, packed.offset - first
            self.queue.append(weakref.ref(group))

    def _bound_in_flight(self, done: torch.cuda.Event, nbytes: int, sources: list[torch.Tensor]) -> None:
        self.in_flight.append((done, nbytes, sources))
        self.in_flight_bytes += nbytes
        cap = max(MAX_IN_FLIGHT_BYTES, self.arena.pool.chunk_bytes_hint)
        while self.in_flight and (self.in_flight_bytes > cap or self.in_flight[0][0].query()):
            event, size, _ = self.in_flight.popleft()
            event.synchronize()
            self.in_flight_bytes -= size

    def drain(self) -> None:
        """Wait until every copy out has ended (their device memory is free again)."""
        self.flush()
        for event, _, _ in self.in_flight:
            event.synchronize()
        self.in_flight.clear()
        self.in_flight_bytes = 0

    def finish_forward(self) -> None:
        """The forward is over: the copies out end, and the backward may prefetch (on a GPU)."""
        self.by_key.clear()
        self.drain()
        if self.cuda:
            self.window = PREFETCH_BYTES

    # -- the backward: copies back --------------------------------------------------------------

    def _fetch(self, groups: list[_Group], ahead: bool = False) -> None:
        """Copy `groups` back to the device, each in one piece: one stream wait and one event for all."""
        self.flush()  # their copies out first (a no-op once the forward is over)
        buffers = [torch.empty(g.nbytes, dtype=torch.uint8, device=self.device) for g in groups]
        hosts = [g.host for g in groups]
        if self.cuda:
            # allocated on the compute stream: the copies start once that stream is done with the memory
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                _copy_all(buffers, hosts, non_blocking=True)
                for buffer in buffers:
                    buffer.record_stream(self.stream)
                ready = torch.cuda.Event()
                ready.record(self.stream)
        else:
            ready = None
            _copy_all(buffers, hosts, non_blocking=False)
        for group, buffer in zip(groups, buffers):
            group.on_device, group.ready, group.fetched, group.ahead = buffer, ready, True, ahead
            self.ahead_bytes += group.nbytes if ahead else 0

    def unpack(self, saved: torch.Tensor | _Packed) -> torch.Tensor:
        if isinstance(saved, torch.Tensor):
            return saved
        if saved.group is None:  # unpacked before its block ended (not in a model's backward)
            self.flush()
        group = saved.group
        tensor = saved.on_device
        if tensor is None:
            top_up = group.on_device is None  # needed before the prefetch brought it: fetched now
            if top_up:
                self._fetch([group])
            piece = group.on_device[saved.offset : saved.offset + saved.nbytes]
            tensor = saved.on_device = piece.view(saved.dtype).as_strided(saved.size, saved.stride)
            if group.ahead:  # its first use: no longer ahead, so the prefetch has room again
                group.ahead = False
                self.ahead_bytes -= group.nbytes
                top_up = True
            if top_up:
                self.prefetch(group.chunk)
        if group.ready is not None:
            compute = torch.cuda.current_stream(self.device)
            if self.last_waited != (compute, group.ready):  # a batch's event is waited for once
                compute.wait_event(group.ready)
                self.last_waited = (compute, group.ready)
        saved.uses -= 1
        if saved.uses <= 0:  # its last user has it: the device copy goes when that node is done
            saved.on_device, saved.uses = None, saved.saves
            group.unserved -= 1
            if group.unserved <= 0:  # all handed out: the views hold the device buffer from now on
                group.on_device, group.ready, group.unserved = None, None, group.members
        return tensor

    def block_output_hook(self, hidden: torch.Tensor) -> None:
        """Called with each block's output in the forward: before that block's backward, top up the
        prefetch (the blocks after it have freed their activations by then). In the forward the block
        has saved its tensors by then: their copies out are issued together."""
        self.flush()
        if hidden.requires_grad:
            hidden.register_hook(functools.partial(self._prefetch_hook, self.chunk))

    def _prefetch_hook(self, chunk: int, grad: torch.Tensor) -> None:
        self.prefetch(chunk)

    def prefetch(self, in_backward_of: int) -> None:
        """Start copying back the groups needed next (the last saved first) of the chunk whose
        backward runs and the one before it, up to `window` bytes not yet used."""
        if self.window is None:
            return
        batch, nbytes = [], self.ahead_bytes
        while self.queue:
            group = self.queue[-1]()
            if group is None or group.fetched:
                self.queue.pop()
                continue
            if group.chunk < in_backward_of - 1 or nbytes + group.nbytes > self.window:
                break
            self.queue.pop()
            batch.append(group)
            nbytes += group.nbytes
        if batch:
            self._fetch(batch, ahead=True)


def _copy_all(destinations: list[torch.Tensor], sources: list[torch.Tensor], non_blocking: bool) -> None:
    """destination[i].copy_(sources[i]) for each i, in one call: the loop runs in C++ (torch's
    foreach copy; between devices it copies each pair in turn), sparing the host a Python call per
    tensor."""
    torch._foreach_copy_(destinations, sources, non_blocking=non_blocking)
