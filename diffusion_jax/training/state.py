"""All training state in one pytree (the optimizer is `spec.OptimizerConfig`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from diffusion_jax.training import timestep_sampler


@flax.struct.dataclass
class TrainState:
  """params, optimizer state, EMA params, step and the base rng: everything a resume needs.

  `rng` is the run's base key (raw uint32 data); step keys are `fold_in(rng, step)`.
  `loss_history` holds the L_vlb history of the importance timestep sampler (or None).
  A distillation (spec.distill) also holds its teacher's parameters (`teacher_params`: the
  teacher's EMA for cd, the current round's teacher for pd) and cd's target network
  (`target_params`); both are None otherwise, and checkpointed with the rest.
  """
  step: jax.Array                 # int32 []
  params: Any
  opt_state: Any
  ema_params: Any
  rng: jax.Array                  # uint32 [2]
  loss_history: timestep_sampler.LossHistory | None = None
  teacher_params: Any = None
  target_params: Any = None

  @classmethod
  def create(cls, params, tx: optax.GradientTransformation, rng: jax.Array,
             loss_history: timestep_sampler.LossHistory | None = None) -> 'TrainState':
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
               ema_params=jax.tree.map(jnp.copy, params), rng=rng, loss_history=loss_history)


def ema_update(ema_params, params, decay: float):
  """EMA ← decay·EMA + (1 − decay)·params."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)
