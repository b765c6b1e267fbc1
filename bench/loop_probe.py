"""Watch the real training loop from outside: time its steps and count its host synchronizations.

`train.py` and `train_warmup.py` build an `Objective` that the loop calls once per micro-batch. Swapping that class
for a subclass that does something just before chosen calls lets a caller of `train.main(argv)` observe the loop
between two micro-batches without touching the trainer:

    probe = ObjectiveProbe(start=10, stop=30, watch_syncs=True)
    with probing(train, probe):
        train.main(argv)
    probe.seconds, probe.sync_warnings

The window runs from just before call `start` (0-based) to just before call `stop`: the forward, backward, optimizer
step, EMA update and hooks of micro-batches start+1 .. stop, and the data loading and teacher forward of micro-batches
start+2 .. stop+1.
"""
import contextlib
import time
import warnings
from typing import List, Optional

import torch

# The text of the warning torch emits in sync debug mode "warn" (c10/cuda/CUDAFunctions.cpp).
SYNC_WARNING = "called a synchronizing CUDA operation"


class ObjectiveProbe:
    """Times the window with torch.cuda.synchronize() at both ends (`seconds`), and with `watch_syncs` turns on CUDA
    sync debug mode "warn" inside it, so that `probing` can collect one warning per synchronizing operation (on a
    machine without CUDA there is nothing to watch)."""

    def __init__(self, start: int, stop: int, watch_syncs: bool = False):
        if not 0 <= start < stop:
            raise ValueError(f"need 0 <= start < stop, got {start}, {stop}")
        self.start, self.stop, self.watch_syncs = start, stop, watch_syncs
        self.calls = 0
        self.seconds: Optional[float] = None
        self.sync_warnings: List[warnings.WarningMessage] = []
        self._t0 = 0.0

    def before_call(self) -> None:
        cuda = torch.cuda.is_available()  # on the CPU every op is synchronous: the clock alone times the window
        if self.calls == self.start:
            if cuda:
                torch.cuda.synchronize()
            self._t0 = time.perf_counter()
            if self.watch_syncs and cuda:
                torch.cuda.set_sync_debug_mode("warn")
        elif self.calls == self.stop:
            if self.watch_syncs and cuda:
                torch.cuda.set_sync_debug_mode("default")  # before synchronize(), which would warn itself
            if cuda:
                torch.cuda.synchronize()
            self.seconds = time.perf_counter() - self._t0
        self.calls += 1

    @property
    def steps(self) -> int:
        """Micro-batches inside the window."""
        return self.stop - self.start

    def sync_sites(self) -> List[str]:
        """'file:line (count)' of the Python lines whose operations synchronized, most frequent first."""
        counts = {}
        for w in self.sync_warnings:
            site = f"{w.filename}:{w.lineno}"
            counts[site] = counts.get(site, 0) + 1
        return [f"{site} ({n}x)" for site, n in sorted(counts.items(), key=lambda kv: -kv[1])]


@contextlib.contextmanager
def probing(entry_module, probe: ObjectiveProbe):
    """Within the block, `entry_module.Objective` (train or train_warmup) is a subclass that calls
    probe.before_call() first. With probe.watch_syncs the sync warnings are collected into probe.sync_warnings
    (every occurrence, not once per line); other warnings are passed on as usual."""
    original = entry_module.Objective

    class ProbedObjective(original):
        def __call__(self, *args, **kwargs):
            probe.before_call()
            return super().__call__(*args, **kwargs)

    entry_module.Objective = ProbedObjective
    caught: List[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) if probe.watch_syncs else contextlib.nullcontext(caught) as caught:
            if probe.watch_syncs:
                warnings.simplefilter("always")
            yield probe
    finally:
        entry_module.Objective = original
        if probe.watch_syncs and torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")  # also when the run failed inside the window
        probe.sync_warnings = [w for w in caught if SYNC_WARNING in str(w.message)]
        for w in caught:
            if SYNC_WARNING not in str(w.message):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
