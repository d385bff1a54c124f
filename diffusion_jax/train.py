"""Training: `train_and_evaluate(config, workdir)` runs a DDPM end to end.

One loop in sections: mesh, input, model and optimizer, state and sharding, update step,
checkpoint, logging, loop. Data-parallel over every device of every process; re-running the
same command resumes from the latest checkpoint in `workdir/checkpoints`, bit-identically.
"""

from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from diffusion_jax import checkpointing
from diffusion_jax import gaussian_diffusion as gd
from diffusion_jax import preemption
from diffusion_jax import sampling
from diffusion_jax import schedules
from diffusion_jax import timestep_sampler
from diffusion_jax import train_step as step_lib
from diffusion_jax import workdir_lock
from diffusion_jax.data import digits as digits_lib
from diffusion_jax.data import input_pipeline
from diffusion_jax.images import save_png
from diffusion_jax.models.unet import UNetConfig
from diffusion_jax.train_state import OptimizerConfig, TrainState

AXIS = step_lib.AXIS


class NonFiniteLossError(FloatingPointError):
  """The loss or gradient norm became NaN or infinite; the error names the safe checkpoint."""


# ------------------------------------------------------------------------------------------
# Building blocks, shared with sample.py and evaluation.
# ------------------------------------------------------------------------------------------


def make_diffusion(diffusion_cfg) -> gd.GaussianDiffusion:
  betas = schedules.get_beta_schedule(
      diffusion_cfg.schedule, diffusion_cfg.num_timesteps, beta_start=diffusion_cfg.beta_start,
      beta_end=diffusion_cfg.beta_end, zero_terminal_snr=diffusion_cfg.zero_terminal_snr)
  return gd.GaussianDiffusion.from_betas(betas)


_MODEL_KEYS_NOT_FOR_UNET = ('class_conditional',)
_DTYPES = ('float32', 'bfloat16')


def model_config(config: ml_collections.ConfigDict,
                 info: input_pipeline.ImageDatasetInfo) -> UNetConfig:
  """The typed U-Net config: out_ch from the data and variance type, classes from the data."""
  var_type = gd.VarType.parse(config.diffusion.var_type)
  fields = {k: v for k, v in config.model.to_dict().items() if k not in _MODEL_KEYS_NOT_FOR_UNET}
  channels = info.image_shape[-1]
  fields['out_ch'] = channels * (2 if var_type.is_learned else 1)
  if config.model.class_conditional:
    if not info.num_classes:
      raise ValueError(f'model.class_conditional=True but dataset {info.name!r} has no labels')
    fields['num_classes'] = info.num_classes
  dtype = config.training.compute_dtype
  if dtype not in _DTYPES:
    raise ValueError(f'unknown training.compute_dtype {dtype!r}; allowed: {", ".join(_DTYPES)}')
  fields['dtype'] = dtype
  return UNetConfig.from_dict(fields)


def optimizer_config(config: ml_collections.ConfigDict) -> OptimizerConfig:
  return OptimizerConfig(**config.optimizer.to_dict())


def init_params(model, image_shape, rng):
  """Initial U-Net parameters for images `image_shape` (H, W, C)."""
  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  y = jnp.zeros((1,), jnp.int32) if model.num_classes else None
  return model.init({'params': rng}, x, t, y=y, train=False)['params']


def init_state_fn(model, image_shape, tx, diffusion: gd.GaussianDiffusion,
                  step_cfg: step_lib.StepConfig, init_rng, state_rng):
  """`init_state() -> TrainState`: fresh parameters (EMA = params), optimizer state, rng.

  `jax.eval_shape(init_state)` is the shape of every checkpoint of this config.
  """
  def init_state():
    params = init_params(model, image_shape, init_rng)
    history = (timestep_sampler.LossHistory.create(diffusion.num_timesteps)
               if step_cfg.importance_sampling else None)
    return TrainState.create(params, tx, state_rng, history)
  return init_state


def make_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh over every device of every process, axis 'data'."""
  return jax.make_mesh((jax.device_count(),), (AXIS,),
                       axis_types=(jax.sharding.AxisType.Explicit,))


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: --workdir must be a training workdir')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the fields that would otherwise fail deep inside the run."""
  t = config.training
  for name in ('batch_size', 'num_train_steps', 'log_every_steps', 'checkpoint_every_steps'):
    value = t[name]
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f'training.{name} must be a positive integer, got {value!r}')
  n = jax.device_count()
  if t.batch_size % n:
    raise ValueError(f'training.batch_size={t.batch_size} is not divisible by the '
                     f'{n} devices; use a multiple of {n}')
  optimizer_config(config)  # [reliability] its own checks: learning rate > 0, b1/b2 in [0, 1) ...
  if not 0.0 <= t.ema_decay < 1.0:
    raise ValueError(f'training.ema_decay must be in [0, 1), got {t.ema_decay!r}')
  if (t.batch_size // n) % t.grad_accum_steps:
    raise ValueError(f'per-device batch {t.batch_size // n} is not divisible by '
                     f'training.grad_accum_steps={t.grad_accum_steps}')


# ------------------------------------------------------------------------------------------
# Logging: TensorBoard event files and a console progress line (process 0 only).
# ------------------------------------------------------------------------------------------


class _Writer:
  def __init__(self, workdir: str, enabled: bool):
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(logdir=os.path.join(workdir, 'tensorboard'))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if self._tb:
      for k, v in values.items():
        self._tb.add_scalar(k, v, step)

  def image(self, step: int, name: str, grid: np.ndarray) -> None:
    if self._tb:
      self._tb.add_image(name, grid, step, dataformats='HWC')

  def close(self) -> None:
    if self._tb:
      self._tb.close()


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  return f'{h}:{rem // 60:02d}:{rem % 60:02d}'


# ------------------------------------------------------------------------------------------
# The run.
# ------------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains for `config.training.num_train_steps`, resuming from `workdir` if it can.

  Returns the final state (replicated over the mesh).
  """
  config = ml_collections.ConfigDict(config.to_dict())  # never mutate the caller's config
  validate_config(config)
  workdir = os.path.abspath(workdir)
  is_chief = jax.process_index() == 0
  # [reliability] One trainer per workdir; an unusable workdir path is a one-line error.
  lock = workdir_lock.acquire(workdir) if is_chief else None
  try:
    return _train_locked(config, workdir, is_chief)
  finally:
    if lock:
      lock.release()


def _train_locked(config: ml_collections.ConfigDict, workdir: str, is_chief: bool) -> TrainState:
  """The run, with the workdir locked by process 0."""

  # ---- Mesh. ------------------------------------------------------------------------------
  mesh = make_mesh()
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(AXIS))

  # ---- Input. -----------------------------------------------------------------------------
  if config.data.dataset == digits_lib.NAME:
    # Prepared once, by process 0, before anyone reads it.
    if is_chief:
      digits_lib.prepare_digits(config.data.data_dir)
    multihost_utils.sync_global_devices('digits prepared')
  info = input_pipeline.dataset_info(config.data.dataset, config.data.data_dir)
  train_iter = input_pipeline.create_train_iterator(
      config.data.dataset, config.data.data_dir, global_batch_size=config.training.batch_size,
      seed=config.seed, random_flip=config.data.random_flip,
      process_index=jax.process_index(), process_count=jax.process_count())

  # ---- Model, diffusion and optimizer. -----------------------------------------------------
  unet_cfg = model_config(config, info)
  model = unet_cfg.make()
  diffusion = make_diffusion(config.diffusion)
  step_cfg = step_lib.step_config_from(config.diffusion, config.training, unet_cfg.num_classes)
  opt_cfg = optimizer_config(config)
  tx = opt_cfg.make()

  # ---- State and sharding. ----------------------------------------------------------------
  rng = jax.random.PRNGKey(config.seed)
  init_rng, state_rng, sample_rng = jax.random.split(rng, 3)

  init_state = init_state_fn(model, info.image_shape, tx, diffusion, step_cfg, init_rng,
                             state_rng)
  abstract_state = checkpointing.abstract_like(jax.eval_shape(init_state), replicated)
  manager = checkpointing.make_manager(workdir, keep=config.training.keep_checkpoints)
  # [reliability] The newest checkpoint that reads; damaged ones are moved aside, one warning each.
  latest, state = checkpointing.restore_latest_good(manager, abstract_state, train_iter,
                                                    move_aside=True)
  if latest is not None:
    logging.info('Resumed from checkpoint %d in %s', latest, manager.directory)
  else:
    state = jax.jit(init_state, out_shardings=replicated)()
  if is_chief:
    save_config(config, workdir)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    logging.info('U-Net: %s parameters; %d devices on %d processes; global batch %d',
                 f'{num_params:,}', jax.device_count(), jax.process_count(),
                 config.training.batch_size)

  # ---- Update step. -----------------------------------------------------------------------
  step_fn = functools.partial(step_lib.train_step, model=model, diffusion=diffusion, tx=tx,
                              learning_rate_fn=opt_cfg.learning_rate_schedule(), cfg=step_cfg)
  update = step_lib.data_parallel_step(step_fn, mesh)

  def global_batch(local):
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(batch_sharding, x), local)

  # ---- Samples during training. -----------------------------------------------------------
  sample_every = config.training.sample_every_steps
  if sample_every:
    n = -(-config.training.num_samples // jax.device_count()) * jax.device_count()
    sampler_cfg = sampling.SamplerConfig.create('ddim', steps=config.training.sample_steps)
    sample_run = sampling.data_parallel_sampler(
        sampling.sample_fn(model, diffusion, mean_type=step_cfg.mean_type,
                           var_type=step_cfg.var_type, sampler=sampler_cfg,
                           num_classes=unet_cfg.num_classes),
        mesh, info.image_shape)
    sample_labels = np.arange(n) % max(info.num_classes, 1)

  # ---- Evaluation during training (bits/dim, FID). ----------------------------------------
  eval_every = config.eval.every_steps
  if eval_every:
    # Imported here: evaluate imports this module.
    from diffusion_jax import evaluate  # pylint: disable=g-import-not-at-top
    periodic_eval = evaluate.make_periodic_eval(config, model=model, diffusion=diffusion,
                                                step_cfg=step_cfg, info=info, mesh=mesh)

  # ---- Loop. ------------------------------------------------------------------------------
  writer = _Writer(workdir, enabled=is_chief)
  total = config.training.num_train_steps
  log_every = config.training.log_every_steps
  ckpt_every = config.training.checkpoint_every_steps
  step = int(jax.device_get(state.step))
  pending: list[tuple[int, dict[str, jax.Array]]] = []  # metrics not yet checked on the host
  last_time, last_step, start_time, start_step = time.time(), step, time.time(), step

  def check_and_log():
    """Fetches pending metrics; raises on a non-finite loss; logs the latest ones."""
    nonlocal last_time, last_step
    if not pending:
      return
    fetched = jax.device_get(pending)
    pending.clear()
    for s, m in fetched:
      # [reliability] The metrics of step s are those of the state of step s - 1: that state
      # and every later one are bad; they are moved aside, so a rerun resumes from a safe one.
      bad = [k for k in ('loss', 'grad_norm') if not np.isfinite(m[k])]
      if bad:
        manager.wait_until_finished()
        for c in checkpointing.candidate_steps(workdir):
          if c >= s - 1:
            checkpointing.set_aside(workdir, c, f'non-finite {bad[0]} at step {s}')
        safe = checkpointing.candidate_steps(workdir)
        raise NonFiniteLossError(
            f'non-finite {" and ".join(bad)} ({float(m[bad[0]])}) at step {s}; stopping. The '
            f'last good checkpoint ({safe[0] if safe else "none"}) in {manager.directory} is '
            'safe to resume from (later ones were moved to '
            f'{os.path.join(workdir, checkpointing.SET_ASIDE)})')
    now = time.time()
    s, m = fetched[-1]
    steps_per_sec = (s - last_step) / max(now - last_time, 1e-9)
    last_time, last_step = now, s
    values = {k: float(np.mean([mm[k] for _, mm in fetched])) for k in m}
    values.update(steps_per_sec=steps_per_sec,
                  images_per_sec=steps_per_sec * config.training.batch_size)
    writer.scalars(s, values)
    if is_chief:
      rate = (s - start_step) / max(now - start_time, 1e-9)
      logging.info('step %d/%d (%.0f%%) loss %.5f grad_norm %.3f lr %.2e | %.2f steps/s '
                   '%.0f img/s | ETA %s', s, total, 100.0 * s / total, values['loss'],
                   values['grad_norm'], values['learning_rate'], steps_per_sec,
                   values['images_per_sec'], _format_eta((total - s) / max(rate, 1e-9)))

  restore_signals = preemption.install()  # [reliability] SIGTERM/SIGINT only set a flag
  try:
    while step < total:
      batch = global_batch(next(train_iter))
      state, metrics = update(state, batch)
      step += 1
      pending.append((step, metrics))
      if step % log_every == 0 or step == total:
        check_and_log()
      # [reliability] SIGTERM/SIGINT: save this step, wait, stop (all processes agree on it).
      if preemption.should_stop(step) and step < total:
        check_and_log()
        checkpointing.save_or_raise(manager, step, state, train_iter)
        checkpointing.wait_or_raise(manager)
        raise preemption.Preempted(step, str(manager.directory),
                                   preemption.signal_received() or 'preemption notice')
      if step % ckpt_every == 0 or step == total:
        check_and_log()  # never checkpoint a non-finite state
        checkpointing.save_or_raise(manager, step, state, train_iter)
      if sample_every and (step % sample_every == 0 or step == total):
        images = sampling.to_uint8(sample_run(state.ema_params,
                                              jax.random.fold_in(sample_rng, step),
                                              sample_labels))
        if is_chief:
          grid = sampling.make_grid(np.asarray(jax.device_get(images)))
          save_png(os.path.join(workdir, 'samples', f'step_{step:08d}.png'), grid)
          writer.image(step, 'samples', grid)
      if eval_every and step % eval_every == 0:
        eval_metrics = periodic_eval(state.ema_params, step)
        writer.scalars(step, eval_metrics)
        if is_chief:
          logging.info('step %d eval: %s', step,
                       ' '.join(f'{k[5:]} {v:.4g}' for k, v in eval_metrics.items()))
  finally:
    restore_signals()
    writer.close()
    checkpointing.wait_or_raise(manager)  # [reliability] a failed save: one line
  return state
