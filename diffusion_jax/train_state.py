"""All training state in one pytree, and the optimizer that updates it."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from diffusion_jax import timestep_sampler


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Adam with linear warm-up and global-norm clipping (the DDPM recipe)."""
  learning_rate: float = 2e-4
  warmup_steps: int = 5000
  grad_clip: float = 1.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8

  def __post_init__(self):
    def bad(name, allowed):
      value = getattr(self, name)
      return ValueError(f'optimizer.{name} must be {allowed}, got {value!r}')
    finite = lambda v: isinstance(v, (int, float)) and math.isfinite(v)
    if not (finite(self.learning_rate) and self.learning_rate > 0):
      raise bad('learning_rate', 'a finite number > 0')
    if not (isinstance(self.warmup_steps, int) and self.warmup_steps >= 0):
      raise bad('warmup_steps', 'an integer >= 0')
    if self.grad_clip is not None and not (finite(self.grad_clip) and self.grad_clip >= 0):
      raise bad('grad_clip', 'a finite number >= 0 (0 or None: no clipping)')
    for name in ('b1', 'b2'):
      if not (finite(getattr(self, name)) and 0 <= getattr(self, name) < 1):
        raise bad(name, 'in [0, 1)')
    if not (finite(self.eps) and self.eps > 0):
      raise bad('eps', 'a finite number > 0')

  def learning_rate_schedule(self) -> optax.Schedule:
    if self.warmup_steps <= 0:
      return optax.constant_schedule(self.learning_rate)
    return optax.linear_schedule(0.0, self.learning_rate, self.warmup_steps)

  def make(self) -> optax.GradientTransformation:
    parts = []
    if self.grad_clip and self.grad_clip > 0:
      parts.append(optax.clip_by_global_norm(self.grad_clip))
    parts.append(optax.adam(self.learning_rate_schedule(), b1=self.b1, b2=self.b2, eps=self.eps))
    return optax.chain(*parts)


@flax.struct.dataclass
class TrainState:
  """params, optimizer state, EMA params, step and the base rng: everything a resume needs.

  `rng` is the run's base key (raw uint32 data); step keys are `fold_in(rng, step)`.
  `loss_history` holds the L_vlb history of the importance timestep sampler (or None).
  """
  step: jax.Array                 # int32 []
  params: Any
  opt_state: Any
  ema_params: Any
  rng: jax.Array                  # uint32 [2]
  loss_history: timestep_sampler.LossHistory | None = None

  @classmethod
  def create(cls, params, tx: optax.GradientTransformation, rng: jax.Array,
             loss_history: timestep_sampler.LossHistory | None = None) -> 'TrainState':
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
               ema_params=jax.tree.map(jnp.copy, params), rng=rng, loss_history=loss_history)


def ema_update(ema_params, params, decay: float):
  """EMA ← decay·EMA + (1 − decay)·params."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)
