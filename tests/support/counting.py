"""What one rank does, counted from outside the library: collectives and the bytes they bring this
rank, operations on the group's store, bytes read and written. For the scale tests
(``multiprocess/test_scale.py``) and ``bench/bench_scale.py``.

- **Collectives**: torch.distributed's tensor collectives are wrapped where both anndist and torch's
  own object collectives find them (``torch.distributed`` and ``distributed_c10d``), so each call on
  the wire counts once: ``broadcast_object`` is two broadcasts. "Received" is what the call brings
  this rank from the others by its definition (a broadcast: the tensor, except on its source; a
  gather: the others' tensors, on the destination only; an all-reduce: the tensor), not the
  transport's own traffic, which depends on the algorithm.
- **Store operations**: ``CountingStore`` wraps the store the group is made with (a Python
  ``Store``: torch's own C++ calls, gloo's connections included, come through it).
- **Bytes read**: the process's ``rchar`` (every ``read`` system call: Python's and torch's C++
  reads alike; gloo receives with ``recv``, which it does not count) plus the size of every file under
  ``root`` that is memory-mapped (read through the map without system calls).
- **Bytes written**: what goes through Python file objects opened for writing under ``root`` (torch.save
  to a file object and DCP write through them); ``wchar`` would count gloo's socket writes too.
"""
from __future__ import annotations

import builtins
import collections
import inspect
import io
import mmap
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

PRIMITIVES = ("all_reduce", "broadcast", "gather", "scatter", "all_gather", "all_gather_into_tensor", "reduce",
              "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "barrier", "send", "recv",
              "isend", "irecv")


@dataclass
class Counts:
    collectives: int = 0
    received: int = 0  # bytes
    store: collections.Counter = field(default_factory=collections.Counter)
    read: int = 0  # bytes
    written: int = 0  # bytes

    @property
    def store_ops(self) -> int:
        return sum(self.store.values())

    def as_dict(self) -> dict[str, Any]:
        return {"collectives": self.collectives, "received": self.received, "store_ops": self.store_ops,
                "store": dict(self.store), "read": self.read, "written": self.written}


class CountingStore(dist.Store):
    """A store that counts the operations made on it, and passes them to ``inner``."""

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner, self.ops = inner, collections.Counter()
        self._lock = threading.Lock()

    def _count(self, name: str) -> None:
        with self._lock:
            self.ops[name] += 1

    def set(self, key, value):
        self._count("set")
        return self.inner.set(key, value)

    def get(self, key):
        self._count("get")
        return self.inner.get(key)

    def add(self, key, value):
        self._count("add")
        return self.inner.add(key, value)

    def compare_set(self, key, expected, desired):
        self._count("compare_set")
        return self.inner.compare_set(key, expected, desired)

    def check(self, keys):
        self._count("check")
        return self.inner.check(keys)

    def delete_key(self, key):
        self._count("delete_key")
        return self.inner.delete_key(key)

    def num_keys(self):
        return self.inner.num_keys()  # what the tests ask, not counted

    def wait(self, keys, timeout=None):
        self._count("wait")
        return self.inner.wait(keys) if timeout is None else self.inner.wait(keys, timeout)

    def set_timeout(self, timeout):
        return self.inner.set_timeout(timeout)

    def append(self, key, value):
        self._count("append")
        return self.inner.append(key, value)

    def multi_get(self, keys):
        self._count("multi_get")
        return self.inner.multi_get(keys)

    def multi_set(self, keys, values):
        self._count("multi_set")
        return self.inner.multi_set(keys, values)

    def has_extended_api(self):
        return True


def _nbytes(tensor: Any) -> int:
    return tensor.numel() * tensor.element_size() if isinstance(tensor, torch.Tensor) else 0


def _received(name: str, bound: dict[str, Any], me: int) -> int:
    """What the call ``name(**bound)`` brings rank ``me`` from the others, by its definition."""
    if name in ("all_reduce", "recv", "irecv"):
        return _nbytes(bound.get("tensor"))
    if name in ("broadcast", "scatter"):
        src = bound.get("src") if bound.get("src") is not None else bound.get("group_src")
        return 0 if src == me else _nbytes(bound.get("tensor"))
    if name in ("gather", "reduce"):
        dst = bound.get("dst") if bound.get("dst") is not None else bound.get("group_dst")
        if dst != me:
            return 0
        if name == "reduce":
            return _nbytes(bound.get("tensor"))
        return sum(map(_nbytes, bound.get("gather_list") or [])) - _nbytes(bound.get("tensor"))
    if name == "all_gather":
        return sum(map(_nbytes, bound.get("tensor_list") or [])) - _nbytes(bound.get("tensor"))
    if name == "all_gather_into_tensor":
        return _nbytes(bound.get("output_tensor")) - _nbytes(bound.get("input_tensor"))
    if name in ("reduce_scatter", "reduce_scatter_tensor"):
        return _nbytes(bound.get("output"))
    if name in ("all_to_all", "all_to_all_single"):
        return sum(map(_nbytes, bound.get("output_tensor_list") or [])) + _nbytes(bound.get("output"))
    return 0


class _CountingFileIO(io.FileIO):
    meter: "Meter | None" = None

    def write(self, data: Any) -> int:
        written = super().write(data)
        if self.meter is not None and written:
            self.meter.add("written", written)
        return written


class Meter:
    """Counts this process's collectives, store operations and file bytes into ``Counts`` (``measure``)."""

    def __init__(self, store: CountingStore | None, root: str | os.PathLike) -> None:
        self.store, self.root = store, os.path.realpath(root)
        self.current: Counts | None = None
        self._lock = threading.Lock()
        self._mapped = 0

    def add(self, what: str, amount: int) -> None:
        with self._lock:
            if self.current is not None:
                setattr(self.current, what, getattr(self.current, what) + amount)

    def _under_root(self, path: Any) -> bool:
        try:
            return os.path.realpath(os.fspath(path)).startswith(self.root + os.sep)
        except TypeError:
            return False

    def install(self) -> "Meter":
        """Wrap torch.distributed's collectives, ``mmap.mmap`` and ``open`` in this process (for good)."""
        meter = self
        for name in PRIMITIVES:
            original = getattr(c10d, name)
            signature = inspect.signature(original)

            def wrapped(*args: Any, _name: str = name, _original: Any = original, _sig: Any = signature,
                        **kwargs: Any) -> Any:
                bound = _sig.bind(*args, **kwargs).arguments
                meter.add("collectives", 1)
                meter.add("received", _received(_name, bound, dist.get_rank()))
                return _original(*args, **kwargs)

            setattr(c10d, name, wrapped)
            setattr(dist, name, wrapped)

        self._wrap_ddp_setup()

        class CountingMmap(mmap.mmap):
            def __new__(cls, fileno: int, length: int, *args: Any, **kwargs: Any) -> Any:
                path = os.readlink(f"/proc/self/fd/{fileno}") if fileno >= 0 else ""
                if meter._under_root(path):
                    meter.add("read", length or os.fstat(fileno).st_size)
                return super().__new__(cls, fileno, length, *args, **kwargs)

        mmap.mmap = CountingMmap  # type: ignore[misc]
        original_open = io.open

        def counting_open(file: Any, mode: str = "r", buffering: int = -1, encoding: Any = None, errors: Any = None,
                          newline: Any = None, closefd: bool = True, opener: Any = None) -> Any:
            if not (isinstance(file, (str, os.PathLike)) and set(mode) & set("wxa") and meter._under_root(file)):
                return original_open(file, mode, buffering, encoding, errors, newline, closefd, opener)
            raw = _CountingFileIO(file, mode.replace("b", "").replace("t", ""), closefd=closefd, opener=opener)
            raw.meter = meter
            if "b" in mode and buffering == 0:
                return raw
            size = buffering if buffering > 1 else io.DEFAULT_BUFFER_SIZE
            buffered = io.BufferedRandom(raw, size) if "+" in mode else io.BufferedWriter(raw, size)
            return buffered if "b" in mode else io.TextIOWrapper(buffered, encoding, errors, newline)

        io.open = builtins.open = counting_open  # type: ignore[assignment]
        return self

    def _wrap_ddp_setup(self) -> None:
        """DDP's construction runs two collectives from C++ bindings that Python calls: count them too (the
        parameter check's bytes estimated: each rank's shapes and strides, 8 bytes a number)."""
        meter, broadcast, verify = self, dist._broadcast_coalesced, dist._verify_params_across_processes

        def broadcast_coalesced(group: Any, tensors: Any, buffer_size: int, src: int = 0) -> Any:
            meter.add("collectives", 1)
            meter.add("received", 0 if dist.get_rank() == src else sum(map(_nbytes, tensors)))
            return broadcast(group, tensors, buffer_size, src)

        def verify_params(group: Any, tensors: Any, logger: Any = None) -> Any:
            meter.add("collectives", 1)
            meter.add("received", 8 * (dist.get_world_size() - 1) * sum(2 * t.dim() + 1 for t in tensors))
            return verify(group, tensors, logger)

        dist._broadcast_coalesced, dist._verify_params_across_processes = broadcast_coalesced, verify_params

    @contextmanager
    def measure(self, counts: Counts) -> Iterator[Counts]:
        """Add what this process does inside the block to ``counts``."""
        store_before = collections.Counter(self.store.ops) if self.store is not None else collections.Counter()
        read_before = _rchar()
        self.current = counts
        try:
            yield counts
        finally:
            self.current = None
            counts.read += _rchar() - read_before
            if self.store is not None:
                counts.store.update(collections.Counter(self.store.ops) - store_before)


def _rchar() -> int:
    with builtins.open("/proc/self/io") as file:  # a few dozen bytes of rchar itself
        return int(next(line for line in file if line.startswith("rchar:")).split()[1])


def count_ddp_gradients(module: Any) -> None:
    """DDP's gradient all-reduces run in C++, out of the meter's sight: torch's own all-reduce hook makes
    each bucket's go through ``torch.distributed.all_reduce``, which the meter counts (once, its bytes)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    module.register_comm_hook(None, allreduce_hook)


def spawn_with_counting_store(rank: int, world_size: int, store_path: str) -> CountingStore:
    """This rank's gloo group, made on a ``CountingStore`` around a FileStore at ``store_path``."""
    store = CountingStore(dist.FileStore(store_path, world_size))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    return store
