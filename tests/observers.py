"""Observing what reaches the training loop and what it does, without changing it: tests use these to check the
entry points' wiring and the loop's arithmetic against references of their own."""
from types import SimpleNamespace
from typing import Callable, List, Optional

import torch

from erw.trainer import Trainer


def observe_fit(monkeypatch, train: bool = True, before: Optional[Callable] = None) -> List[SimpleNamespace]:
    """Wrap Trainer.fit: each call is recorded as a namespace (trainer, model, model_args, objective, dataset,
    teachers, hooks) in the returned list, `before(call)` runs first (it may append to call.hooks), and the real
    loop runs unless train=False (then fit returns at once, and nothing is trained or written by it)."""
    calls = []
    real_fit = Trainer.fit

    def fit(self, model, model_args, objective, dataset, teachers, hooks=None):
        call = SimpleNamespace(trainer=self, model=model, model_args=model_args, objective=objective,
                               dataset=dataset, teachers=teachers, hooks=list(hooks or []))
        calls.append(call)
        if before is not None:
            before(call)
        if not train:
            return {"step": 0, "history": [], "model": model, "ema": None}
        return real_fit(self, model, model_args, objective, dataset, teachers, hooks=call.hooks)

    monkeypatch.setattr(Trainer, "fit", fit)
    return calls


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
