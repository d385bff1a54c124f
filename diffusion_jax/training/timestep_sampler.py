"""Timestep samplers for training: uniform, and importance sampling by the L_vlb history.

Nichol & Dhariwal (2021, §3.3) reduce the variance of the L_vlb objective by sampling t with
probability p_t ∝ √E[L_t²], estimated from the last `history_per_term` losses seen at each t,
and weighting each example by 1 / (T·p_t) so that the estimate stays unbiased. Until every t
has a full history the sampler stays uniform.

Functional: the history is a pytree carried in the training state and updated with pure
functions, so it is checkpointed and resumed with everything else.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array


@flax.struct.dataclass
class LossHistory:
  losses: Array  # [T, K] the last K losses seen at each timestep, newest last
  counts: Array  # [T] int32, how many losses each row has seen (capped at K)

  @property
  def num_timesteps(self) -> int:
    return self.losses.shape[0]

  @classmethod
  def create(cls, num_timesteps: int, history_per_term: int = 10) -> 'LossHistory':
    return cls(losses=jnp.zeros((num_timesteps, history_per_term), jnp.float32),
               counts=jnp.zeros((num_timesteps,), jnp.int32))


def sample_uniform(rng: Array, batch_size: int, num_timesteps: int) -> tuple[Array, Array]:
  """t ~ U{0, …, T−1} `[B]` int32 and unit weights `[B]`."""
  t = jax.random.randint(rng, (batch_size,), 0, num_timesteps, dtype=jnp.int32)
  return t, jnp.ones((batch_size,), jnp.float32)


def importance_probs(history: LossHistory, uniform_prob: float = 1e-3) -> Array:
  """p_t `[T]`: ∝ √E[L_t²] mixed with `uniform_prob` of uniform; uniform until warmed up."""
  big_t = history.num_timesteps
  warm = jnp.all(history.counts >= history.losses.shape[1])
  rms = jnp.sqrt(jnp.mean(jnp.square(history.losses), axis=1))
  p = rms / jnp.maximum(jnp.sum(rms), 1e-30)
  p = p * (1.0 - uniform_prob) + uniform_prob / big_t
  return jnp.where(warm & (jnp.sum(rms) > 0), p, jnp.full((big_t,), 1.0 / big_t))


def sample_importance(history: LossHistory, rng: Array, batch_size: int,
                      uniform_prob: float = 1e-3) -> tuple[Array, Array]:
  """t ~ p_t `[B]` and the unbiasing weights 1/(T·p_t) `[B]`."""
  p = importance_probs(history, uniform_prob)
  t = jax.random.choice(rng, history.num_timesteps, (batch_size,), p=p).astype(jnp.int32)
  weights = 1.0 / (history.num_timesteps * p[t])
  return t, weights


def update_history(history: LossHistory, t: Array, losses: Array) -> LossHistory:
  """Pushes each (t_i, loss_i) into row t_i, in batch order; `t`, `losses`: `[B]`.

  In data-parallel training, gather t and losses over devices first so every replica
  applies the same update.
  """
  def push(i, h):
    row = jnp.roll(h.losses[t[i]], -1).at[-1].set(losses[i].astype(jnp.float32))
    return LossHistory(losses=h.losses.at[t[i]].set(row),
                       counts=h.counts.at[t[i]].set(
                           jnp.minimum(h.counts[t[i]] + 1, h.losses.shape[1])))
  return jax.lax.fori_loop(0, t.shape[0], push, history)
