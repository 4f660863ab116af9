"""AdamW and gradient clipping with torch's exact semantics, on MLX trees.

mlx.optimizers.AdamW differs from torch.optim.AdamW (what the torch backend and the official code
use) in its defaults (no bias correction, weight decay 0.01), computes the bias corrections in
float32 (b ** step on the device), decays every parameter, and updates m as b1 m + (1 - b1) g
where torch lerps. This one follows torch's single-tensor AdamW step by step: decay (matrices
only, as the torch backend's parameter groups), m lerp, v, bias corrections in float64 on the host,
p - lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps). betas (0.9, 0.999), eps 1e-8 (transformers'
adamw_torch defaults).

The per-parameter update is one `mx.compile`d elementwise kernel (shapeless: traced once for every
shape), its step-dependent scalars passed as arrays so that no step retraces it; the same operations in
the same order as the uncompiled update (identical results: tests/test_compile.py), about 2x faster on
the CPU (docs/benchmarks.md).
"""

from __future__ import annotations

import math
from functools import partial

import mlx.core as mx
from mlx.optimizers import Optimizer
from mlx.utils import tree_flatten, tree_map, tree_map_with_path


@partial(mx.compile, shapeless=True)
def adamw_update(parameter, gradient, m, v, decay, one_minus_b1, b2, one_minus_b2, step_size, sqrt_bc2, eps):
    """torch's AdamW step for one tensor: (new parameter, m, v)."""
    parameter = parameter * decay
    m = m + one_minus_b1 * (gradient - m)
    v = b2 * v + one_minus_b2 * gradient * gradient
    return parameter - step_size * (m / (mx.sqrt(v) / sqrt_bc2 + eps)), m, v


class TorchAdamW(Optimizer):
    """`module_lrs` gives modules their own peak learning rate (the torch backend's parameter groups:
    --mm-projector-lr, --moe-lr); the trainer sets `lr` and the schedule's `lr_factor` each step."""

    def __init__(self, lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, module_lrs: dict[str, float] | None = None):
        super().__init__()
        self.lr = lr  # set before each step (the schedule lives in the trainer)
        self.lr_factor = 1.0  # the schedule's factor, for the modules with their own peak lr
        self.module_lrs = {f"{k}.": v for k, v in (module_lrs or {}).items()}
        self.weight_decay = weight_decay
        self.betas = betas
        self.eps = eps
        self.num_steps = 0  # host copy of the step count (bias corrections in float64)

    def init_single(self, parameter: mx.array, state: dict) -> None:
        state["m"] = mx.zeros_like(parameter)
        state["v"] = mx.zeros_like(parameter)

    def lr_of(self, name: str) -> float:
        """The learning rate this step applies to the parameter `name` (MLX path)."""
        peak = next((v for k, v in self.module_lrs.items() if name.startswith(k)), None)
        return self.lr if peak is None else peak * self.lr_factor

    def apply_gradients(self, gradients: dict, parameters: dict):
        if not self._initialized:
            self.init(gradients)
        self.num_steps += 1
        self.state["step"] = self.step + 1
        base = self.lr

        def one(path, g, p, state):
            self.lr = self.lr_of(path)  # apply_single reads self.lr
            try:
                return self.apply_single(g, p, state)
            finally:
                self.lr = base

        return tree_map_with_path(one, gradients, parameters, self.state)

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        b1, b2 = self.betas
        t = self.num_steps
        decay = 1.0 - self.lr * self.weight_decay if self.weight_decay and parameter.ndim >= 2 else 1.0
        # host scalars (float64) rounded to the parameter's dtype, as Python scalars are in the uncompiled form
        scalars = [mx.array(x, parameter.dtype) for x in (decay, 1.0 - b1, b2, 1.0 - b2, self.lr / (1.0 - b1**t),
                                                         math.sqrt(1.0 - b2**t), self.eps)]
        parameter, state["m"], state["v"] = adamw_update(parameter, gradient, state["m"], state["v"], *scalars)
        return parameter


def clip_grad_norm(grads: dict, max_norm: float | None) -> tuple[dict, mx.array]:
    """torch.nn.utils.clip_grad_norm_: scale by min(1, max_norm / (norm + 1e-6)); returns the pre-clip norm."""
    leaves = [g for _, g in tree_flatten(grads)]
    total = mx.sqrt(sum((mx.sqrt(mx.sum(g.astype(mx.float32) ** 2)) ** 2 for g in leaves), mx.array(0.0)))
    if max_norm is None:
        return grads, total
    coef = mx.minimum(max_norm / (total + 1e-6), 1.0)
    return tree_map(lambda g: g * coef.astype(g.dtype), grads), total
