"""Training: `train_and_evaluate(config, workdir)` runs a DDPM end to end.

`_train_locked` is the outline of a run, one function per part: spec, mesh, input, model and
optimizer, state (restored or fresh), update step, samples and evaluation during training,
then the step loop with its periodic hooks (logging, checkpoint, sample grid, evaluation).
Data-parallel over every device of every process; re-running the same command resumes from
the latest checkpoint in `workdir/checkpoints`, bit-identically.
The config is parsed once into an `ExperimentSpec` (spec.py), written to the workdir at the
first start and compared with the stored one at every restart (workdir.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffusion_jax.storage import checkpointing
from diffusion_jax.runtime import compilation
from diffusion_jax.evaluation import evaluate
from diffusion_jax.runtime import faults
from diffusion_jax.runtime import parallel
from diffusion_jax.storage import paths
from diffusion_jax.runtime import preemption
from diffusion_jax.sampling import sampler as sampler_lib
from diffusion_jax.storage import images as images_lib
from diffusion_jax.training import reflow
from diffusion_jax.training import timestep_sampler
from diffusion_jax.training import step as step_lib
from diffusion_jax.storage import workdir as workdir_lib
from diffusion_jax.storage import workdir_lock
from diffusion_jax.data import datasets
from diffusion_jax.data import input_pipeline
from diffusion_jax.data.prefetch import DevicePrefetcher, Stacked
from diffusion_jax.storage.images import save_png
from diffusion_jax import trained_model
from diffusion_jax.spec import DistillMethod, ExperimentSpec
from diffusion_jax.training.state import TrainState

AXIS = parallel.AXIS
# Batches placed on the devices ahead of the step (data/prefetch.py).
PREFETCH_BATCHES = 2


class NonFiniteLossError(FloatingPointError):
  """The loss or gradient norm became NaN or infinite; the error names the safe checkpoint."""


def init_state_fn(spec: ExperimentSpec, tx, init_rng, state_rng):
  """`init_state() -> TrainState`: fresh parameters (EMA = params), optimizer state, rng.

  `jax.eval_shape(init_state)` is the shape of every checkpoint of this spec.
  """
  importance = step_lib.StepConfig.from_spec(spec).importance_sampling  # on the host

  def init_state():
    params = spec.init_params(init_rng)
    history = (timestep_sampler.LossHistory.create(spec.diffusion.num_timesteps)
               if importance else None)
    state = TrainState.create(params, tx, state_rng, history)
    if spec.distill is not None and spec.distill.method is not DistillMethod.REFLOW:
      # The shapes; `_from_teacher` fills in the weights. (reflow's teacher made its pairs.)
      copy = lambda: jax.tree.map(jnp.copy, params)
      state = state.replace(teacher_params=copy(), target_params=(
          copy() if spec.distill.method is DistillMethod.CD else None))
    return state
  return init_state


def _from_teacher(spec: ExperimentSpec, state: TrainState, mesh: Mesh, tx) -> TrainState:
  """A fresh distillation's state: params, EMA, teacher (and cd's target) all the teacher's
  EMA weights at `distill.teacher_step`, with the optimizer state of those params."""
  d = spec.distill
  teacher = trained_model.load_ema_params(d.teacher, step=d.teacher_step, mesh=mesh)
  logging.info('Distilling (%s) from %s, checkpoint %d', d.method.value, d.teacher,
               teacher.step)
  replicated = NamedSharding(mesh, P())
  copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=replicated)
  params = teacher.ema_params
  return state.replace(
      params=copy(params), ema_params=copy(params),
      teacher_params=copy(params) if state.teacher_params is not None else None,
      target_params=copy(params) if state.target_params is not None else None,
      opt_state=jax.jit(tx.init, out_shardings=replicated)(params))


def read_teacher(config: ml_collections.ConfigDict, workdir: epath.Path
                 ) -> tuple[ExperimentSpec, int] | None:
  """(spec, checkpoint step) of the teacher that `config.distill.teacher` names, None for
  no teacher. A resume of the same teacher reads both from the student's own spec.json (the
  teacher need not be there any more); a first start reads the teacher's workdir (one-line
  FileNotFoundError when it is not a trained workdir)."""
  d = config.get('distill')
  if d is None or d.get('teacher') is None:
    return None
  if (workdir / workdir_lib.SPEC).exists():
    stored = workdir_lib.read_spec(workdir)
    if stored.distill is not None and stored.distill.teacher == str(d.teacher):
      return stored.distill.parsed_teacher_spec(), stored.distill.teacher_step
  try:
    wd = trained_model.read_workdir(d.teacher)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'distill.teacher {str(d.teacher)!r} is not a trained workdir: '
                            f'{e}') from None
  return wd.spec, wd.step


def check_devices(spec: ExperimentSpec) -> None:
  """Raises a one-line ValueError when the batch does not divide over the devices."""
  b, n, a = spec.training.batch_size, jax.device_count(), spec.training.grad_accum_steps
  if b % n:
    raise ValueError(f'training.batch_size={b} is not divisible by the {n} devices; use a '
                     f'multiple of {n}')
  if (b // n) % a:
    raise ValueError(f'per-device batch {b // n} is not divisible by '
                     f'training.grad_accum_steps={a}')


def prepare_dataset(config: ml_collections.ConfigDict) -> input_pipeline.ImageDatasetInfo:
  """Prepares a dataset that is built locally (once, by process 0) and returns its facts."""
  description = datasets.describe(config.data.dataset)
  if description.prepared_locally:
    if jax.process_index() == 0:
      description.prepare(config.data.data_dir)
    multihost_utils.sync_global_devices('dataset prepared')
  return input_pipeline.dataset_info(config.data.dataset, config.data.data_dir)


# ------------------------------------------------------------------------------------------
# Logging: TensorBoard event files and a console progress line (process 0 only).
# ------------------------------------------------------------------------------------------


class _EpathEventFile:
  """A TensorBoard event file written through epath, for workdirs that are not local: the
  whole file is rewritten at each flush (objects in a bucket cannot be appended to)."""

  def __init__(self, path: str):
    self._path, self._buffer = epath.Path(path), io.BytesIO()

  def write(self, data: bytes) -> None:
    self._buffer.write(data)

  def flush(self) -> None:
    self._path.write_bytes(self._buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _EpathEventFiles:
  def open(self, path: str) -> _EpathEventFile:
    return _EpathEventFile(path)

  def directory_check(self, path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


class _Writer:
  def __init__(self, logdir: epath.Path, enabled: bool):
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      if paths.is_remote(logdir):
        from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
        record_writer.register_writer_factory(str(logdir).split(':')[0], _EpathEventFiles())
      self._tb = SummaryWriter(logdir=str(logdir))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if self._tb:
      for k, v in values.items():
        self._tb.add_scalar(k, v, step)

  def image(self, step: int, name: str, grid: np.ndarray) -> None:
    if self._tb:
      self._tb.add_image(name, grid, step, dataformats='HWC')

  def close(self) -> None:
    """Flushes the events; a failure (a full disk) is a warning: it must not hide the error
    that stopped training, and the checkpoints do not depend on it."""
    if self._tb:
      try:
        self._tb.close()
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('could not write the TensorBoard events: %s', ' '.join(str(e).split()))
        self._abandon()

  def _abandon(self) -> None:
    """After a failed close, tensorboardX would try again: its worker thread flushes on a timer,
    its atexit hook closes again, and each failure prints a traceback after the program's one
    error line. Its workers are stopped with a writer that writes nothing, and its event
    writers marked closed. (tensorboardX's internals, pinned by our dependency; best effort.)"""
    class _Discard:
      def write_event(self, event):
        del event

      def flush(self):
        pass

    for file_writer in list((getattr(self._tb, 'all_writers', None) or {}).values()):
      events = getattr(file_writer, 'event_writer', None)
      worker = getattr(events, '_worker', None)
      try:
        if worker is not None:
          worker._record_writer = _Discard()  # pylint: disable=protected-access
          worker.stop()
        events._closed = True  # pylint: disable=protected-access
      except Exception:  # pylint: disable=broad-except
        pass


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  return f'{h}:{rem // 60:02d}:{rem % 60:02d}'


class _Timeline:
  """Wall-clock marks from the program's start to the first step, logged once as one line
  and written to TensorBoard as `startup/*`."""

  def __init__(self, clock_start: float):
    self._start = self._last = clock_start
    self.phases: dict[str, float] = {}

  def mark(self, phase: str) -> None:
    """Ends `phase` now (its seconds are the time since the previous mark)."""
    now = time.time()
    self.phases[phase] = self.phases.get(phase, 0.0) + now - self._last
    self._last = now

  def since_start(self) -> float:
    return self._last - self._start

  def line(self, compile_report: compilation.CompileReport) -> str:
    parts = ', '.join(f'{k} {v:.1f} s' for k, v in self.phases.items())
    return (f'startup: {parts} (train step compile {compile_report.total_seconds:.1f} s, '
            f'cache {compile_report.cache}); first step done {self.since_start():.1f} s '
            'after the start')

  def scalars(self) -> dict[str, float]:
    out = {f'startup/{k.replace(" ", "_")}_seconds': v for k, v in self.phases.items()}
    out['startup/first_step_done_seconds'] = self.since_start()
    return out


# ------------------------------------------------------------------------------------------
# The run.
# ------------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir,
                       clock_start: float | None = None) -> TrainState:
  """Trains for `config.training.num_train_steps`, resuming from `workdir` if it can.

  With `config.training.time_budget_s` > 0 it stops earlier, once that many seconds have
  passed since `clock_start` (a `time.time()`; default: this call), dataset preparation and
  compilation included: the step that ends the budget is checkpointed and sampled like the
  last one.

  `workdir` is a local path or a URL that etils.epath reaches (gs://...). A restart whose
  config changes the model or the objective raises `workdir.SpecMismatchError` before
  anything is written. Returns the final state (replicated over the mesh).
  """
  faults.arm()  # DIFFUSION_JAX_FAULT (tests only): a malformed value fails here, before any work
  clock_start = time.time() if clock_start is None else clock_start
  timeline = _Timeline(clock_start)
  timeline.mark('imports')  # train.py's imports, JAX's start and the flags
  config = ml_collections.ConfigDict(config.to_dict())  # never mutate the caller's config
  workdir = paths.as_path(workdir)
  is_chief = jax.process_index() == 0
  # One trainer per workdir (process 0 holds the lock); an unusable path is a one-line error.
  lock = workdir_lock.acquire(workdir) if is_chief else None
  try:
    return _train_locked(config, workdir, is_chief, clock_start, timeline)
  finally:
    if lock:
      lock.release()


def _train_locked(config: ml_collections.ConfigDict, workdir: epath.Path,
                  is_chief: bool, clock_start: float, timeline: _Timeline) -> TrainState:
  """The run, with the workdir locked by process 0: the spec, the mesh, the input, the model,
  the state (restored or fresh), the programs, then the step loop."""
  spec, changes = _load_spec(config, workdir)
  mesh = parallel.make_mesh()
  train_iter = _make_train_iterator(spec, workdir, is_chief)
  timeline.mark('data')

  model, diffusion = spec.model.make(), spec.diffusion.make()
  step_cfg, tx = step_lib.StepConfig.from_spec(spec), spec.optimizer.make()
  init_rng, state_rng, sample_rng = jax.random.split(jax.random.PRNGKey(spec.seed), 3)
  init_state = init_state_fn(spec, tx, init_rng, state_rng)
  manager, state = _restore_or_init(spec, workdir, mesh, init_state, train_iter, is_chief,
                                    timeline)
  if spec.distill is not None and manager.latest_step() is None:
    state = _from_teacher(spec, state, mesh, tx)
  step = _resumable_step(spec, state)
  if is_chief:
    _record_start(spec, config, workdir, changes, state, step)

  update = _make_update(spec, mesh, model, diffusion, step_cfg, tx)
  sample = _make_sampler(spec, mesh, model, diffusion, sample_rng)
  periodic_eval, compile_scalars = _make_periodic_eval(spec, mesh, model, diffusion, is_chief)
  run = _Run(spec=spec, workdir=workdir, is_chief=is_chief, clock_start=clock_start,
             manager=manager, update=update, sample=sample, periodic_eval=periodic_eval,
             first_calls={'sampler', 'periodic_eval'},
             writer=_Writer(workdir / 'tensorboard', enabled=is_chief))
  return _step_loop(run, state, step, train_iter, timeline, compile_scalars)


# ------------------------------------------------------------------------------------------
# Before the loop: spec, input, state, programs.
# ------------------------------------------------------------------------------------------


def _load_spec(config: ml_collections.ConfigDict, workdir: epath.Path
               ) -> tuple[ExperimentSpec, list[tuple[str, Any, Any]] | None]:
  """The config parsed once into a spec (its dataset prepared), checked against the devices
  and the workdir's stored spec; returns it and the settings changed since the last start."""
  workdir_lib.check_dataset(workdir, config.data.dataset)
  info = prepare_dataset(config)
  spec = ExperimentSpec.from_config(config, info, teacher=read_teacher(config, workdir))
  check_devices(spec)
  changes = workdir_lib.check_resume(workdir, spec)  # every process; nothing written yet
  return spec, changes


def _make_train_iterator(spec: ExperimentSpec, workdir: epath.Path, is_chief: bool):
  """This process's iterator of training batches: held in memory or streamed, as the spec
  says; reflow's are its teacher's pairs, made into the workdir first if need be."""
  if spec.distill is not None and spec.distill.method is DistillMethod.REFLOW:
    x0, noise = reflow.ensure_pairs(spec, workdir, is_chief)
    return reflow.PairIterator(x0, noise, global_batch_size=spec.training.batch_size,
                               seed=spec.seed, process_index=jax.process_index(),
                               process_count=jax.process_count())
  make_iterator = (input_pipeline.create_memory_train_iterator
                   if spec.data.pipeline is input_pipeline.DataPipeline.MEMORY
                   else input_pipeline.create_train_iterator)
  return make_iterator(
      spec.data.dataset, spec.data.data_dir, global_batch_size=spec.training.batch_size,
      seed=spec.seed, random_flip=spec.data.random_flip,
      process_index=jax.process_index(), process_count=jax.process_count())


def _restore_or_init(spec: ExperimentSpec, workdir: epath.Path, mesh: Mesh, init_state,
                     train_iter, is_chief: bool, timeline: _Timeline):
  """Returns the checkpoint manager of `workdir` and the state, replicated over `mesh`: the
  newest checkpoint that reads (`train_iter` set to its data position), else `init_state()`."""
  replicated = NamedSharding(mesh, P())
  abstract_state = checkpointing.abstract_like(jax.eval_shape(init_state), replicated)
  manager = checkpointing.make_manager(workdir_lib.checkpoint_dir(workdir),
                                       keep=spec.run.keep_checkpoints)
  # The newest checkpoint that reads; damaged ones are moved aside, one warning line each.
  latest, state = checkpointing.restore_latest_good(manager, abstract_state, train_iter,
                                                    move_aside=True)
  if latest is not None:
    logging.info('Resumed from checkpoint %d in %s', latest, manager.directory)
    timeline.mark('restore')
  else:
    # The replicated initial state needs no partitionable random bits; the classic threefry
    # lowering compiles this program about 4x faster on a CPU (7.3 s -> 1.9 s for digits).
    with compilation.track('init_state', log=is_chief), jax.threefry_partitionable(False):
      state = jax.jit(init_state, out_shardings=replicated)()
    timeline.mark('model init')
  return manager, state


def _resumable_step(spec: ExperimentSpec, state: TrainState) -> int:
  """The state's step; a ValueError when `training.steps_per_call` does not divide it."""
  step = int(jax.device_get(state.step))
  steps_per_call = spec.run.steps_per_call
  if step % steps_per_call:
    raise ValueError(f'checkpoint {step} is not a multiple of training.steps_per_call='
                     f'{steps_per_call}: resume it with a steps_per_call that divides {step} '
                     '(1 always does)')
  return step


def _record_start(spec: ExperimentSpec, config: ml_collections.ConfigDict, workdir: epath.Path,
                  changes: list[tuple[str, Any, Any]] | None, state: TrainState,
                  step: int) -> None:
  """Process 0: records this start in the workdir and logs the changed settings and the size
  of the model and of the run."""
  workdir_lib.record_start(workdir, spec, config, changes, step)
  if changes:
    logging.info('Resumed with changed settings: %s',
                 ', '.join(f'{n} {o!r} -> {v!r}' for n, o, v in changes))
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info('U-Net: %s parameters; %d devices on %d processes; global batch %d',
               f'{num_params:,}', jax.device_count(), jax.process_count(),
               spec.training.batch_size)


def _make_update(spec: ExperimentSpec, mesh: Mesh, model, diffusion,
                 step_cfg: step_lib.StepConfig, tx) -> Callable:
  """`update(state, batch) -> (state, metrics)`: `training.steps_per_call` steps, data-parallel
  over `mesh`."""
  step_fn = functools.partial(step_lib.train_step, model=model, diffusion=diffusion, tx=tx,
                              learning_rate_fn=spec.optimizer.learning_rate_schedule(),
                              cfg=step_cfg)
  return step_lib.data_parallel_step(step_fn, mesh, spec.run.steps_per_call)


def _make_sampler(spec: ExperimentSpec, mesh: Mesh, model, diffusion,
                  sample_rng: jax.Array) -> Callable | None:
  """`sample(ema_params, step) -> uint8 images`: the images of a step's sample grid (the
  same labels and, for a step, the same key at every call); None when the run draws none."""
  run = spec.run
  if not run.sample_every_steps:
    return None
  n = -(-run.num_samples // jax.device_count()) * jax.device_count()
  sample_run = sampler_lib.data_parallel_sampler(
      sampler_lib.sample_fn(model, diffusion, parameterization=spec.parameterization,
                            sampler=run.sampler, num_classes=spec.num_classes,
                            process=spec.diffusion.make_process(),
                            consistency_sigma_data=spec.consistency_sigma_data),
      mesh, spec.data.image_shape)
  sample_labels = np.arange(n) % max(spec.data.num_classes, 1)

  def sample(ema_params, step: int):
    return images_lib.to_uint8(sample_run(ema_params, jax.random.fold_in(sample_rng, step),
                                          sample_labels)[0])
  return sample


def _make_periodic_eval(spec: ExperimentSpec, mesh: Mesh, model, diffusion, is_chief: bool
                        ) -> tuple[Callable | None, dict[str, float]]:
  """Evaluation during training (bits/dim, FID): `(periodic_eval, compile scalars)`, where
  `periodic_eval(ema_params, step) -> metrics`; `(None, {})` when the run evaluates nothing."""
  if not spec.eval.every_steps:
    return None, {}
  # Preparing it compiles the feature extractor (reference statistics of the train split).
  with compilation.track('eval_features', log=is_chief) as report:
    periodic_eval = evaluate.make_periodic_eval(spec, model=model, diffusion=diffusion,
                                                mesh=mesh)
  return periodic_eval, report.scalars()


@dataclasses.dataclass(frozen=True)
class _Run:
  """The pieces of a run that the step loop and its periodic hooks share."""
  spec: ExperimentSpec
  workdir: epath.Path
  is_chief: bool
  clock_start: float                # `time.time()` at the program's start (the time budget's)
  manager: Any                      # the checkpoint manager of workdir/checkpoints
  update: Callable                  # `update(state, batch) -> (state, metrics)`
  sample: Callable | None           # `sample(ema_params, step) -> images`; None: no grids
  periodic_eval: Callable | None    # `periodic_eval(ema_params, step) -> metrics`; None: none
  first_calls: set[str]             # programs compiled at their first call, not called yet
  writer: _Writer


def _tracked(run: _Run, name: str):
  """`compilation.track(name)` at the first call of a program, else nothing."""
  if name not in run.first_calls:
    return contextlib.nullcontext(None)
  run.first_calls.discard(name)
  return compilation.track(name, log=run.is_chief)


# ------------------------------------------------------------------------------------------
# The loop: the metrics and the clock.
# ------------------------------------------------------------------------------------------


class _Progress:
  """The metrics not yet checked on the host, and the clock: the time budget, the check for
  non-finite values and the progress line."""

  def __init__(self, run: _Run, step: int):
    self._run = run
    self.pending: list[tuple[int, dict[str, jax.Array]]] = []  # metrics not yet checked
    self._last_time, self._last_step = time.time(), step
    self._start_time, self._start_step = time.time(), step

  def out_of_time(self, step: int) -> bool:
    """The time budget is spent (checked after every call of the step). Several processes
    follow process 0's clock, read at the log steps (one tiny broadcast), so that all stop
    after the same step."""
    budget, clock_start = self._run.spec.run.time_budget_s, self._run.clock_start
    if not budget:
      return False
    if jax.process_count() > 1 and step % self._run.spec.run.log_every_steps:
      return False
    # The clock counts finished work: wait for the step before this one (one stays in
    # flight). Otherwise the loop, running ahead of the computation, would see the budget
    # spent while tens of dispatched steps are still to run.
    if len(self.pending) >= 2:
      jax.block_until_ready(self.pending[-2][1])
    if jax.process_count() == 1:
      return time.time() - clock_start >= budget
    return bool(multihost_utils.broadcast_one_to_all(
        np.bool_(time.time() - clock_start >= budget)))

  def check_and_log(self) -> None:
    """Fetches pending metrics; raises on a non-finite loss; logs the latest ones."""
    if not self.pending:
      return
    fetched = jax.device_get(self.pending)
    self.pending.clear()
    k = self._run.spec.run.steps_per_call
    if k > 1:  # a call's metrics are per step, [k]: step s - k + 1 + i is entry i
      fetched = [(s - k + 1 + i, {n: v[i] for n, v in m.items()})
                 for s, m in fetched for i in range(k)]
    _raise_if_non_finite(self._run, fetched)
    self._log(fetched)

  def _log(self, fetched: list[tuple[int, dict[str, np.ndarray]]]) -> None:
    """Writes the means of the fetched metrics and the speed to TensorBoard; process 0 logs
    the progress line of the latest step."""
    run, spec = self._run, self._run.spec
    total, budget = spec.run.num_train_steps, spec.run.time_budget_s
    now = time.time()
    s, m = fetched[-1]
    steps_per_sec = (s - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_time, self._last_step = now, s
    values = {k: float(np.mean([mm[k] for _, mm in fetched])) for k in m}
    values.update(steps_per_sec=steps_per_sec,
                  images_per_sec=steps_per_sec * spec.training.batch_size)
    run.writer.scalars(s, values)
    if run.is_chief:
      rate = (s - self._start_step) / max(now - self._start_time, 1e-9)
      eta = (total - s) / max(rate, 1e-9)
      if budget:
        eta = min(eta, budget - (now - run.clock_start))
      logging.info('step %d/%d (%.0f%%) loss %.5f grad_norm %.3f lr %.2e | %.2f steps/s '
                   '%.0f img/s | ETA %s', s, total, 100.0 * s / total, values['loss'],
                   values['grad_norm'], values['learning_rate'], steps_per_sec,
                   values['images_per_sec'], _format_eta(eta))


def _raise_if_non_finite(run: _Run, fetched: list[tuple[int, dict[str, np.ndarray]]]) -> None:
  """Raises NonFiniteLossError at the first step whose loss or gradient norm is not finite,
  after moving aside the checkpoints it makes bad."""
  workdir, manager = run.workdir, run.manager
  for s, m in fetched:
    # The metrics of step s are those of the state of step s − 1: that state and every
    # later one are bad; they are moved aside, so that a rerun resumes from a safe one.
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
          f'{workdir / checkpointing.SET_ASIDE})')


# ------------------------------------------------------------------------------------------
# The loop: steps and periodic hooks.
# ------------------------------------------------------------------------------------------


def _step_loop(run: _Run, state: TrainState, step: int, train_iter, timeline: _Timeline,
               compile_scalars: dict[str, float]) -> TrainState:
  """Calls `update` until the last step, the end of the time budget or a preemption notice,
  with the periodic hooks after each call; then waits for the last save and closes the
  writer, also on an error. Returns the final state."""
  total, k = run.spec.run.num_train_steps, run.spec.run.steps_per_call
  progress = _Progress(run, step)
  # The next batches are read and placed on the devices while a step runs (no wait on the
  # host between steps); checkpoints record the position of the batches the steps consumed.
  batches = DevicePrefetcher(train_iter if k == 1 else Stacked(train_iter, k),
                             run.update.batch_sharding, ahead=PREFETCH_BATCHES)
  first_step = step
  restore_signals = preemption.install()  # SIGTERM/SIGINT now only set a flag
  try:
    while step < total:
      if step == first_step:
        state, metrics = _first_call(run, state, step, batches, timeline, compile_scalars)
      else:
        state, metrics = run.update(state, next(batches))
      step += k
      progress.pending.append((step, metrics))
      budget_spent = progress.out_of_time(step)
      if budget_spent and run.is_chief:
        logging.info('Time budget of %g s spent after step %d (%.0f s since the start); '
                     'stopping with a checkpoint', run.spec.run.time_budget_s, step,
                     time.time() - run.clock_start)
      _after_call(run, progress, state, step, batches, last=step == total or budget_spent)
      if budget_spent:
        break
  finally:
    restore_signals()
    try:
      checkpointing.wait_or_raise(run.manager)  # a failed save: one line
    finally:
      run.writer.close()
  return state


def _first_call(run: _Run, state: TrainState, step: int, batches: DevicePrefetcher,
                timeline: _Timeline, compile_scalars: dict[str, float]):
  """The first call of `update`, which compiles: measured, and waited for once, for the
  startup line (logged) and the startup scalars (written). Returns `(state, metrics)`."""
  with compilation.track('train_step', log=run.is_chief) as report:
    batch = next(batches)
    if jax.process_count() > 1:
      # Compiled before any process runs it, so all reach its collectives together.
      run.update.compile(state, batch)
      parallel.host_barrier('train step compiled')
    state, metrics = run.update(state, batch)
    del batch
    jax.block_until_ready(metrics)
  timeline.mark('first step')
  compile_scalars.update(report.scalars())
  if run.is_chief:
    logging.info('%s', timeline.line(report))
  run.writer.scalars(step + run.spec.run.steps_per_call,
                     {**timeline.scalars(), **compile_scalars})
  return state, metrics


def _after_call(run: _Run, progress: _Progress, state: TrainState, step: int,
                batches: DevicePrefetcher, last: bool) -> None:
  """The periodic hooks after the call of `update` that ended at `step`, in order: the
  metrics check and log, preemption, the checkpoint, the sample grid, the evaluation."""
  cadence = run.spec.run
  if step % cadence.log_every_steps == 0 or last:
    progress.check_and_log()
    faults.at(faults.Point.AFTER_STEP, step)  # tests only: DIFFUSION_JAX_FAULT
  # SIGTERM/SIGINT: save this step, wait, stop (every process agrees on the step).
  # (With several processes it agrees on a call's index: k steps per call.)
  if preemption.should_stop(step // cadence.steps_per_call) and not last:
    _save_and_stop(run, progress, state, step, batches)
  if step % cadence.checkpoint_every_steps == 0 or last:
    progress.check_and_log()  # never checkpoint a non-finite state
    checkpointing.save_or_raise(run.manager, step, state, batches.snapshot())
  sample_every, eval_every = cadence.sample_every_steps, run.spec.eval.every_steps
  if sample_every and (step % sample_every == 0 or last):
    _sample_grid(run, state, step)
  if eval_every and step % eval_every == 0:
    _evaluate(run, state, step)


def _save_and_stop(run: _Run, progress: _Progress, state: TrainState, step: int,
                   batches: DevicePrefetcher) -> None:
  """Preemption: checks the pending metrics, saves `step`, waits for the save and raises
  `preemption.Preempted`."""
  progress.check_and_log()
  checkpointing.save_or_raise(run.manager, step, state, batches.snapshot())
  checkpointing.wait_or_raise(run.manager)
  raise preemption.Preempted(step, str(run.manager.directory),
                             preemption.signal_received() or 'preemption notice')


def _sample_grid(run: _Run, state: TrainState, step: int) -> None:
  """Samples the EMA parameters; process 0 saves the grid (samples/step_*.png) and writes it
  to TensorBoard."""
  with _tracked(run, 'sampler') as report:
    images = run.sample(state.ema_params, step)
  if report is not None:
    run.writer.scalars(step, report.scalars())
  if run.is_chief:
    grid = images_lib.make_grid(np.asarray(jax.device_get(images)))
    save_png(run.workdir / 'samples' / f'step_{step:08d}.png', grid)
    run.writer.image(step, 'samples', grid)


def _evaluate(run: _Run, state: TrainState, step: int) -> None:
  """Evaluates the EMA parameters (bits/dim, FID): written to TensorBoard, and logged on
  one line by process 0."""
  with _tracked(run, 'periodic_eval') as report:
    eval_metrics = run.periodic_eval(state.ema_params, step)
  if report is not None:
    run.writer.scalars(step, report.scalars())
  run.writer.scalars(step, eval_metrics)
  if run.is_chief:
    logging.info('step %d eval: %s', step,
                 ' '.join(f'{k[5:]} {v:.4g}' for k, v in eval_metrics.items()))
