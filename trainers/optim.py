"""Optimizers, learning-rate schedules and the EMA of trained weights."""
from __future__ import annotations

import contextlib
import logging
import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from .config import TrainConfig

log = logging.getLogger(__name__)

#: optimizers that need every parameter whole on every process (a global step-size estimate, factored
#: moments, iterate averaging): DeepSpeed's flat partitions would change what they compute
WHOLE_PARAMETERS = ("prodigy", "adamw_schedulefree", "adafactor")


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    o = cfg.optimizer
    kwargs = dict(lr=cfg.learning_rate, betas=o.betas, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, eps=o.eps, **kwargs)
    if o.name == "prodigy":
        from prodigyopt import Prodigy

        if cfg.learning_rate < 0.1:
            log.warning("train.learning_rate=%g with Prodigy, which estimates the step size itself and expects a "
                        "learning rate near 1.0 (scale its estimate with train.optimizer.prodigy.d_coef)",
                        cfg.learning_rate)
        return Prodigy(params, eps=o.eps, **kwargs, **o.prodigy.model_dump())
    if o.name == "adamw_schedulefree":
        from schedulefree import AdamWScheduleFree

        optimizer = AdamWScheduleFree(params, eps=o.eps, **kwargs, **o.schedulefree.model_dump())
        optimizer.train()  # the training iterate; `averaged_weights` switches to the average for sampling and export
        return optimizer
    if o.name == "adafactor":
        from transformers.optimization import Adafactor

        a = o.adafactor
        return Adafactor(params, lr=None if a.relative_step else cfg.learning_rate, weight_decay=o.weight_decay,
                         **a.model_dump())
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # pragma: no cover - bitsandbytes is a dependency
        raise RuntimeError(f"train.optimizer.name={o.name} needs bitsandbytes ({e}); use adamw") from e
    if o.name == "adamw8bit":
        return bnb.optim.AdamW8bit(params, eps=o.eps, **kwargs)
    return bnb.optim.Lion8bit(params, **kwargs)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> LambdaLR:
    """Linear warmup, then constant, cosine or linear decay to zero at max_steps."""
    warmup, total = cfg.warmup_steps, cfg.max_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if cfg.lr_scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.lr_scheduler == "linear":
            return 1.0 - progress
        return 1.0

    return LambdaLR(optimizer, factor)


@contextlib.contextmanager
def averaged_weights(optimizer: torch.optim.Optimizer):
    """Inside: the weights to sample and export. Schedule-free AdamW trains on an interpolation of its
    iterates and keeps their average apart; it swaps the average in (`eval`) and back (`train`). For
    every other optimizer the weights are the weights. Whatever must be saved for an exact resume is
    saved outside this block."""
    swap = hasattr(optimizer, "eval") and hasattr(optimizer, "train") and "ScheduleFree" in type(optimizer).__name__
    if not swap:
        yield
        return
    # eval() and train() interpolate in place and do not undo each other to the last bit: the training
    # iterate is kept (on the CPU) and put back, so that a run that sampled or checkpointed here goes on
    # exactly as one resumed from that checkpoint
    params = [p for group in optimizer.param_groups for p in group["params"]]
    kept = [p.detach().to("cpu", copy=True) for p in params]
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()
        with torch.no_grad():
            for p, k in zip(params, kept):
                p.copy_(k)


class EMA:
    """Exponential moving average of parameters, kept in float32 beside them. Below ZeRO-3 each
    rank averages only its own partition of each parameter; `full_shadow` puts the averages
    together (collective there: every rank calls it)."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        from .distributed import local

        self.params = list(params)
        self.decay = decay
        self.shadow = [local(p).detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        from .distributed import local

        for s, p in zip(self.shadow, self.params):
            s.lerp_(local(p).detach().float(), 1 - self.decay)

    def full_shadow(self) -> list[torch.Tensor]:
        """The averages as whole tensors, in parameter order."""
        from .distributed import gather_partitions

        return [gather_partitions(s, p) if hasattr(p, "ds_tensor") else s for s, p in zip(self.shadow, self.params)]

    def state_dict(self) -> dict:
        """Whole tensors, whatever the partitioning: a checkpoint's ema.safetensors reads without DeepSpeed."""
        return {"decay": self.decay, "shadow": [s.cpu() for s in self.full_shadow()]}

    def load_state_dict(self, state: dict) -> None:
        from .distributed import partition_of

        self.decay = state["decay"]
        self.shadow = [(partition_of(s, p) if hasattr(p, "ds_tensor") else s).float().to(p.device)
                       for s, p in zip(state["shadow"], self.params, strict=True)]
