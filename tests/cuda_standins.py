"""CPU stand-ins for torch.cuda's streams and events, which check the ordering a GPU would need.

A GPU runs each stream's work in the order it was queued and different streams concurrently: only an event (recorded
on one stream, waited on by another), wait_stream, or synchronize (for the host) orders two streams. Here every
operation runs when Python calls it, on the CPU: one of the orders a GPU may pick. That it is the only result a GPU
can give is checked as torch.cuda._sanitizer checks it on a GPU: each stream keeps a vector clock (how much of every
stream's work it has waited for), and a TorchDispatchMode sees every aten op. Two accesses to overlapping memory from
different streams, one of them a write, must be ordered by the clocks; else the stand-ins fail, naming both ops.

    cuda = StandInCuda(monkeypatch)  # replaces torch.cuda.{Stream, Event, current_stream, stream} and
    with cuda:                       #   torch.Tensor.{pin_memory, is_pinned}; ops in here run on cuda.current
        opt.step()                   # leaving `with` checks what returning from step() allows: check_released

A stream's clock counts the ops queued on it; an allocation (torch.empty) queues nothing and takes the time of the
stream's last op, since the caching allocator may hand out memory that op was still using.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ALLOCATIONS = {"empty", "empty_like", "empty_strided"}  # host-side calls into the allocator: no work on a stream


def join(clock: dict, other: dict) -> None:
    """clock ← max(clock, other), stream by stream: the owner of `clock` now waits for all that `other` waited for."""
    for stream, time in other.items():
        clock[stream] = max(clock.get(stream, 0), time)


def extent(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, last byte + 1) that the view t can touch."""
    n = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) if t.numel() else 0
    return t.data_ptr(), t.data_ptr() + n * t.element_size()


@dataclass
class Access:
    """One op's read or write of the bytes [lo, hi), the stream's `time`-th op."""
    lo: int  # bytes [lo, hi)
    hi: int
    stream: "Stream"
    time: int  # the stream's op count when it touched them
    write: bool
    op: str

    def overlaps(self, lo: int, hi: int) -> bool:
        return self.lo < hi and lo < self.hi


class Stream:
    def __init__(self, cuda: StandInCuda, name: str):
        self.cuda, self.name = cuda, name
        self.clock = {self: 0}  # stream -> how many of its ops this one waits for; its own entry: ops queued here
        self.log = []  # the ops queued here: aten names, "in" / "out" for copies from / to pinned host memory

    def __repr__(self):
        return self.name

    def wait_event(self, event: Event) -> None:
        assert event.clock is not None, f"{self} waits on an event that was never recorded (a no-op on CUDA)"
        join(self.clock, event.clock)

    def wait_stream(self, other: Stream) -> None:
        join(self.clock, other.clock)

    def record_event(self, event: Event = None) -> Event:
        event = event or Event(self.cuda)
        event.record(self)
        return event

    def synchronize(self) -> None:  # the host waits for everything queued here
        join(self.cuda.host, self.clock)


class Event:
    def __init__(self, cuda: StandInCuda):
        self.cuda, self.clock = cuda, None  # the recording stream's clock when it was recorded

    def record(self, stream: Stream = None) -> None:
        stream = stream or self.cuda.current
        join(stream.clock, self.cuda.host)  # queued after all that the host has waited for
        self.clock = dict(stream.clock)

    def wait(self, stream: Stream = None) -> None:
        (stream or self.cuda.current).wait_event(self)

    def synchronize(self) -> None:
        assert self.clock is not None, "the host waits on an event that was never recorded (a no-op on CUDA)"
        join(self.cuda.host, self.clock)


class StandInCuda(TorchDispatchMode):
    """The default stream, the side streams, the host's clock, and every access made inside `with`."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.host = {}  # stream -> how many of its ops the host has waited for (synchronize)
        self.default = self.current = Stream(self, "default stream")
        self.streams = [self.default]
        self.accesses = {}  # storage's data_ptr -> [Access], in program order
        self.allocations = []  # (storage's data_ptr, Access) of each fresh tensor since entering `with`
        self.pinned = []  # host memory: what the pin_memory stand-in returned
        self.seen = []  # every tensor an op touched, kept alive so that no address is reused while we watch
        self.paused = False
        monkeypatch.setattr(torch.cuda, "Stream", self.new_stream)
        monkeypatch.setattr(torch.cuda, "Event", lambda *args, **kwargs: Event(self))
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: self.current)
        monkeypatch.setattr(torch.cuda, "stream", self.stream)
        monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, device=None: self.pin(t))
        monkeypatch.setattr(torch.Tensor, "is_pinned", lambda t, device=None: self.is_pinned(t))

    def new_stream(self, device=None, priority=0) -> Stream:
        self.streams.append(Stream(self, f"side stream {len(self.streams)}"))
        return self.streams[-1]

    @contextlib.contextmanager
    def stream(self, s: Stream):
        before, self.current = self.current, s or self.current
        try:
            yield s
        finally:
            self.current = before

    def pin(self, t: torch.Tensor) -> torch.Tensor:
        """Tensor.pin_memory: a copy the host makes (on no stream), which is_pinned then knows as host memory."""
        self.paused, before = True, self.paused
        try:
            self.pinned.append(t.clone())
        finally:
            self.paused = before
        return self.pinned[-1]

    def is_pinned(self, t: torch.Tensor) -> bool:
        lo, hi = extent(t)
        return any(p.data_ptr() <= lo and hi <= extent(p)[1] for p in self.pinned)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.paused:
            return out
        touched = [(t, write, fresh) for t, write, fresh in self._touches(func, args, kwargs, out) if t.numel()]
        if not touched:  # a view, or metadata: no work for a stream
            return out
        s, name = self.current, func.overloadpacket.__name__
        join(s.clock, self.host)  # the host queues this op after all it has waited for
        if name not in ALLOCATIONS:
            s.clock[s] += 1
        if name == "copy_" and self.is_pinned(args[1]):
            name = "in"  # host -> device
        elif name == "copy_" and self.is_pinned(args[0]):
            name = "out"  # device -> host
        s.log.append(name)
        for t, write, fresh in touched:
            self._check(s, t, write, fresh, name)
        return out

    @staticmethod
    def _touches(func, args, kwargs, out):
        """(tensor, written, fresh) from the op's schema: an argument annotated (a!) is written, an alias (a view)
        is not touched, any other tensor argument is read (`*_like` ops read only its shape); a returned tensor that
        aliases no argument is fresh memory, written."""
        schema, name = func._schema, func.overloadpacket.__name__
        for i, arg in enumerate(schema.arguments):
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            if (arg.alias_info is not None and not arg.alias_info.is_write) or name.endswith("_like"):
                continue
            for t in tree_leaves(value):
                if isinstance(t, torch.Tensor):
                    yield t, arg.alias_info is not None, False
        for ret, value in zip(schema.returns, out if isinstance(out, (tuple, list)) else (out,)):
            if ret.alias_info is None:
                for t in tree_leaves(value):
                    if isinstance(t, torch.Tensor):
                        yield t, True, True

    def _check(self, s: Stream, t: torch.Tensor, write: bool, fresh: bool, op: str) -> None:
        self.seen.append(t)
        lo, hi = extent(t)
        new = Access(lo, hi, s, s.clock[s], write, op)
        storage = t.untyped_storage().data_ptr()
        history = self.accesses.setdefault(storage, [])
        for a in history:
            if a.stream is not s and (write or a.write) and a.overlaps(lo, hi):
                assert s.clock.get(a.stream, 0) >= a.time, (
                    f"{op} on the {s} {'writes' if write else 'reads'} bytes that {a.op} on the {a.stream} "
                    f"{'wrote' if a.write else 'read'}, and no event or wait_stream orders the two")
        history.append(new)
        if fresh:
            self.allocations.append((storage, new))

    def __exit__(self, exc_type, exc_value, traceback):
        super().__exit__(exc_type, exc_value, traceback)
        if exc_type is None:
            self.check_released()

    def check_released(self) -> None:
        """What leaving `with` (returning from step()) allows. The caching allocator gives memory freed here to the
        next op of the stream that allocated it, or of the host; so every other stream's use of it must be ordered
        before that. And the host (Python) may now read or write pinned memory, so no stream may still touch it."""
        for storage, alloc in self.allocations:
            after = dict(alloc.stream.clock)  # what the allocating stream's next op, or the host's, comes after
            join(after, self.host)
            for a in self.accesses[storage]:
                if a.stream is not alloc.stream and a.overlaps(alloc.lo, alloc.hi):
                    assert after.get(a.stream, 0) >= a.time, (
                        f"memory allocated on the {alloc.stream} (by {alloc.op}) goes back to the allocator while "
                        f"{a.op} on the {a.stream} may still use it: {alloc.stream}.wait_stream({a.stream}) first")
        self.allocations = []
        for p in self.pinned:
            lo, hi = extent(p)
            for a in self.accesses.get(p.untyped_storage().data_ptr(), []):
                if a.overlaps(lo, hi):
                    assert self.host.get(a.stream, 0) >= a.time, (
                        f"{a.op} on the {a.stream} may still {'write' if a.write else 'read'} pinned host memory "
                        f"when the host can look at it: {a.stream}.synchronize() first")


class OnCuda(torch.nn.Parameter):
    """A CPU tensor whose is_cuda says True: enough to run code that only routes on is_cuda (a dispatch) on the CPU.
    OnCuda(t) for any t, as a parameter (it can replace a module's weight); it does not require grad."""

    def __new__(cls, data):
        return super().__new__(cls, data, requires_grad=False)

    @property
    def is_cuda(self):
        return True
