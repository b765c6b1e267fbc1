"""Observing what reaches the training loop and what it does, without changing it: tests use these to check the
entry points' wiring and the loop's arithmetic against references of their own, and the GPU tests (tests/test_gpu.py)
to time a window of the loop's micro-batches and count its host synchronizations."""
import contextlib
import time
import warnings
from types import SimpleNamespace
from typing import Callable, List, Optional

import torch

import train
import train_warmup
from erw import loop


def observe_fit(monkeypatch, train_it: bool = True, before: Optional[Callable] = None) -> List[SimpleNamespace]:
    """Wrap the entry points' call of erw.loop.fit: each call is recorded as a namespace (run, model, model_args,
    objective, dataset, teachers, hooks) in the returned list, `before(call)` runs first (it may append to
    call.hooks), and the real loop runs unless train_it=False (then the run is closed at once, and nothing is
    trained or written by the loop)."""
    calls = []

    def fit(run, model, model_args, objective, dataset, teachers, hooks=()):
        call = SimpleNamespace(run=run, model=model, model_args=model_args, objective=objective, dataset=dataset,
                               teachers=teachers, hooks=list(hooks))
        calls.append(call)
        if before is not None:
            before(call)
        if not train_it:
            run.close()
            return {"step": 0, "history": [], "model": model, "ema": None}
        return loop.fit(run, model, model_args, objective, dataset, teachers, call.hooks)

    for module in (train, train_warmup):
        monkeypatch.setattr(module, "fit", fit)
    return calls


class StepHook:
    """A loop hook (erw.loop.Hook) that calls fn(run, step, ema) after step 0 and every optimizer step, on the main
    process."""
    all_processes = False

    def __init__(self, fn: Callable):
        self.fn = fn

    def start(self, run) -> None:
        pass

    def __call__(self, run, step, ema) -> None:
        self.fn(run, step, ema)


def record_optimizer_steps(monkeypatch) -> List[dict]:
    """Wrap AdamW.step: for every call, {id(param): the gradient it was handed, in the units it applies (divided by
    the grad_scale a GradScaler may pass), float64}, plus 'found_inf'."""
    steps = []
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        grads = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    g = p.grad.detach().double()
                    grads[id(p)] = g / scale.double() if scale is not None else g.clone()
        steps.append({"grads": grads, "found_inf": None if found_inf is None else float(found_inf)})
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return steps


# The text of the warning torch emits in sync debug mode "warn" (c10/cuda/CUDAFunctions.cpp).
SYNC_WARNING = "called a synchronizing CUDA operation"


class ObjectiveProbe:
    """A window of the loop's calls of its Objective (one per micro-batch), from just before call `start` (0-based)
    to just before call `stop`: the forward, backward, optimizer step, EMA and hooks of micro-batches start+1..stop.
    Times it with torch.cuda.synchronize() at both ends (`seconds`), and with `watch_syncs` turns on CUDA sync debug
    mode "warn" inside it, so that `probing` can collect one warning per synchronizing operation (on a machine
    without CUDA there is nothing to watch)."""

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
