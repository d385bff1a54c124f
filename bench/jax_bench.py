"""The JAX side of the benchmark: one measurement per process, printed as one JSON line.

  python bench/jax_bench.py train --batch 8
  python bench/jax_bench.py sample --batch 8 --steps 4
  python bench/jax_bench.py forward --batch 8
  python bench/jax_bench.py matmul

`bench/run.py` starts one process per measurement, so each one's peak resident memory
(VmHWM) is its own. Every timing is the median over `--repeats` runs after `--warmup` runs,
each ended with `block_until_ready`. `--tiny` swaps in a small U-Net (for the smoke test).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import optax  # pylint: disable=g-import-not-at-top,wrong-import-position

import diffusion_jax as dj  # pylint: disable=g-import-not-at-top,wrong-import-position
from diffusion_jax.runtime import host_memory  # pylint: disable=wrong-import-position
from diffusion_jax.training import step as step_lib  # pylint: disable=wrong-import-position
from diffusion_jax.models import UNetConfig  # pylint: disable=wrong-import-position
from diffusion_jax.spec import OptimizerConfig  # pylint: disable=wrong-import-position
from diffusion_jax.training.state import TrainState  # pylint: disable=wrong-import-position

T = 1000
IMAGE = (32, 32, 3)
TINY_IMAGE = (8, 8, 3)
TINY = dict(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=())
# With --tiny (the smoke test) XLA skips its expensive passes: compile time only.
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


# ------------------------------------------------------------------------------------------
# Helpers.
# ------------------------------------------------------------------------------------------


def peak_rss_mib() -> float:
  """Peak resident memory of this process (VmHWM), MiB; ru_maxrss where /proc is missing."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, warmup: int, repeats: int) -> dict:
  """Median wall seconds of `fn()` (which must block), and the cores it kept busy."""
  for _ in range(warmup):
    fn()
  times = []
  r0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - wall0
  cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
  busy = cpu / max(wall, 1e-9)
  return dict(seconds=statistics.median(times), all_seconds=times, cores_busy=busy,
              cpu_seconds_per_run=cpu / repeats,
              system_seconds_per_run=(r1.ru_stime - r0.ru_stime) / repeats,
              page_faults_per_run=(r1.ru_minflt - r0.ru_minflt) / repeats)


def cost_of(compiled) -> dict:
  """XLA's cost analysis of a compiled executable (a dict, or a list of them)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return cost


def flops_of(compiled) -> float:
  """FLOPs from XLA's cost analysis."""
  return float(cost_of(compiled).get('flops', float('nan')))


def bytes_of(compiled) -> float:
  """Bytes read and written by the ops of the compiled program, from XLA's cost analysis."""
  return float(cost_of(compiled).get('bytes accessed', float('nan')))


def image_shape(args) -> tuple[int, int, int]:
  return TINY_IMAGE if args.tiny else IMAGE  # [H, W, C]


def options(args) -> dict | None:
  """XLA compiler options: `args.compiler_options` if set (bench/ab.py), else the cheap
  compile for --tiny, else XLA's defaults."""
  explicit = getattr(args, 'compiler_options', None)
  if explicit is not None:
    return explicit
  return FAST_COMPILE if args.tiny else None


def model_and_params(args):
  cfg = UNetConfig(**TINY) if args.tiny else UNetConfig()
  model = cfg.make()
  x = jnp.zeros((1,) + image_shape(args), jnp.float32)
  params = jax.jit(lambda k: model.init({'params': k}, x, jnp.zeros((1,), jnp.int32)))(
      jax.random.key(0))['params']
  return model, params


def diffusion():
  return dj.GaussianDiffusion.from_betas(dj.get_beta_schedule('linear', T))


# ------------------------------------------------------------------------------------------
# Measurements.
# ------------------------------------------------------------------------------------------


def train_runner(args):
  """The compiled step (forward, ε-MSE, backward, Adam) and a `run()` that does one step."""
  model, params = model_and_params(args)
  d = diffusion()
  tx = optax.adam(2e-4)
  opt_state = tx.init(params)
  b = args.batch

  def loss_fn(p, x0, t, noise, rng):
    def denoise(x_t, tt):
      return model.apply({'params': p}, x_t, tt, train=True, rngs={'dropout': rng})
    return jnp.mean(dj.training_losses(d, denoise, x0, t, noise, loss_type='mse',
                                       mean_type='eps', var_type='fixedlarge'))

  def grads_of(p, x0, rng):
    """Loss and gradient over `x0`: in `args.micro` independent pieces (not a loop: XLA
    may run them side by side), or `args.accum` pieces one after another (an unrolled `lax.scan`)."""
    n = x0.shape[0]
    t_rng, n_rng, d_rng = jax.random.split(rng, 3)
    t = jax.random.randint(t_rng, (n,), 0, T)  # [B]
    noise = jax.random.normal(n_rng, x0.shape, jnp.float32)  # [B, H, W, C]
    if args.accum > 1:
      a = args.accum
      micro = jax.tree.map(lambda v: v.reshape((a, n // a) + v.shape[1:]), (x0, t, noise))

      def body(acc, m):
        (x, tt, nn_), i = m
        loss, g = jax.value_and_grad(loss_fn)(p, x, tt, nn_, jax.random.fold_in(d_rng, i))
        return jax.tree.map(jnp.add, acc, (loss, g)), None

      zeros = jax.tree.map(jnp.zeros_like, (jnp.zeros(()), p))
      # Fully unrolled: inside a while loop XLA:CPU runs kernel gradients on its generic
      # convolution, ~30x slower (see docs/benchmarks.md).
      (loss, grads), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(a)), unroll=True)
      return loss / a, jax.tree.map(lambda g: g / a, grads)
    m = args.micro
    pieces = [jax.value_and_grad(loss_fn)(p, x0[i::m], t[i::m], noise[i::m],
                                          jax.random.fold_in(d_rng, i)) for i in range(m)]
    loss = sum(l for l, _ in pieces) / m
    grads = jax.tree.map(lambda *g: sum(g) / m, *[g for _, g in pieces])
    return loss, grads

  if args.devices == 1:
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(p, o, x0, rng):
      loss, grads = grads_of(p, x0, rng)
      updates, o = tx.update(grads, o, p)
      return optax.apply_updates(p, updates), o, loss
  else:
    from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
    mesh = jax.make_mesh((args.devices,), ('data',),
                         axis_types=(jax.sharding.AxisType.Explicit,))

    def local_step(p, o, x0, rng):
      rng = jax.random.fold_in(rng, jax.lax.axis_index('data'))
      loss, grads = grads_of(jax.lax.pcast(p, 'data', to='varying'), x0, rng)
      grads, loss = jax.lax.pmean((grads, loss), 'data')
      updates, o = tx.update(grads, o, p)
      return optax.apply_updates(p, updates), o, loss

    step = jax.jit(jax.shard_map(local_step, mesh=mesh, in_specs=(P(), P(), P('data'), P()),
                                 out_specs=(P(), P(), P())), donate_argnums=(0, 1))

  x0 = jax.random.uniform(jax.random.key(1), (b,) + image_shape(args), minval=-1.0, maxval=1.0)
  if args.devices > 1:
    from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
    params, opt_state = jax.device_put((params, opt_state), NamedSharding(mesh, P()))
    x0 = jax.device_put(x0, NamedSharding(mesh, P('data')))
  start = time.perf_counter()
  compiled = step.lower(params, opt_state, x0, jax.random.key(2)).compile(options(args))
  compile_s = time.perf_counter() - start
  state = dict(p=params, o=opt_state, i=0)

  def run():
    state['i'] += 1
    state['p'], state['o'], loss = compiled(state['p'], state['o'], x0,
                                            jax.random.fold_in(jax.random.key(3), state['i']))
    jax.block_until_ready((state['p'], loss))

  return compiled, run, compile_s


def bench_train(args) -> dict:
  """forward, ε-MSE, backward and an Adam update: the step the PyTorch side runs."""
  compiled, run, compile_s = train_runner(args)
  out = timed(run, args.warmup, args.repeats)
  flops = flops_of(compiled) * args.devices  # the cost analysis is of one device's program
  b = args.batch
  out.update(images_per_s=b / out['seconds'], flops=flops, flops_per_image=flops / b,
             gflops_per_s=flops / out['seconds'] / 1e9, compile_s=compile_s,
             bytes_accessed=bytes_of(compiled) * args.devices)
  return out


def forward_runner(args):
  """The compiled forward pass (evaluation mode) and a `run()` that does one."""
  model, params = model_and_params(args)
  b = args.batch
  x = jax.random.normal(jax.random.key(1), (b,) + image_shape(args))
  t = jnp.full((b,), 500, jnp.int32)
  fwd = jax.jit(lambda p, x, t: model.apply({'params': p}, x, t))
  start = time.perf_counter()
  compiled = fwd.lower(params, x, t).compile(options(args))
  compile_s = time.perf_counter() - start
  return compiled, lambda: compiled(params, x, t).block_until_ready(), compile_s


def bench_library_step(args) -> dict:
  """The library's own `train_step` under `data_parallel_step` on a one-device mesh:
  the same as `train` plus gradient clipping, the warm-up schedule and the EMA
  (`--accum`: its `grad_accum_steps`)."""
  model, params = model_and_params(args)
  d = diffusion()
  opt_cfg = OptimizerConfig()
  tx = opt_cfg.make()
  step_cfg = step_lib.StepConfig(grad_accum_steps=args.accum)
  mesh = jax.make_mesh((1,), (step_lib.AXIS,), axis_types=(jax.sharding.AxisType.Explicit,),
                       devices=jax.devices()[:1])
  step_fn = functools.partial(step_lib.train_step, model=model, diffusion=d, tx=tx,
                              learning_rate_fn=opt_cfg.learning_rate_schedule(), cfg=step_cfg)
  update = step_lib.data_parallel_step(step_fn, mesh)
  state = TrainState.create(params, tx, jax.random.key_data(jax.random.key(0)))
  b = args.batch
  batch = dict(image=jax.random.uniform(jax.random.key(1), (b,) + image_shape(args), minval=-1.0,
                                        maxval=1.0),
               label=jnp.zeros((b,), jnp.int32))
  box = dict(state=state)

  def run():
    box['state'], metrics = update(box['state'], batch)
    jax.block_until_ready((box['state'].params, metrics))

  start = time.perf_counter()
  run()
  compile_s = time.perf_counter() - start
  out = timed(run, max(args.warmup - 1, 0), args.repeats)
  out.update(images_per_s=b / out['seconds'], compile_s=compile_s)
  return out


def bench_forward(args) -> dict:
  """The U-Net's forward pass in evaluation mode (no dropout)."""
  compiled, run, compile_s = forward_runner(args)
  out = timed(run, args.warmup, args.repeats)
  flops = flops_of(compiled)
  b = args.batch
  out.update(images_per_s=b / out['seconds'], flops=flops, flops_per_image=flops / b,
             gflops_per_s=flops / out['seconds'] / 1e9, compile_s=compile_s)
  return out


def bench_sample(args) -> dict:
  """Ancestral sampling (the `ddpm` sampler) at K levels, respaced: one compiled scan of K
  model evaluations, seconds per step."""
  model, params = model_and_params(args)
  process = dj.VPProcess.from_diffusion(diffusion())
  sampler = dj.SamplerConfig('ddpm', steps=args.steps)
  parameterization = dj.Parameterization('eps', 'fixedlarge')
  shape = (args.batch,) + image_shape(args)

  @jax.jit
  def sample(p, rng):
    denoise = lambda x, t: model.apply({'params': p}, x, t)
    return dj.sample(denoise, process, shape, rng, sampler=sampler,
                     parameterization=parameterization)[0]

  start = time.perf_counter()
  compiled = sample.lower(params, jax.random.key(0)).compile(options(args))
  compile_s = time.perf_counter() - start
  box = dict(i=0)

  def run():
    box['i'] += 1
    x0 = compiled(params, jax.random.key(box['i']))
    x0.block_until_ready()
    assert bool(jnp.all(jnp.isfinite(x0)))

  out = timed(run, args.warmup, args.repeats)
  per_step = out['seconds'] / args.steps
  out.update(seconds_per_step=per_step, projected_1000_s=1000 * per_step, compile_s=compile_s)
  return out


def bench_matmul(args) -> dict:
  """float32 [n, n] @ [n, n] through XLA: the practical ceiling of this machine."""
  n = args.size
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot).lower(a, b).compile(options(args))
  out = timed(lambda: dot(a, b).block_until_ready(), args.warmup, args.repeats)
  out.update(n=n, gflops_per_s=2 * n**3 / out['seconds'] / 1e9)
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('what', help='train, library_step, forward, sample or matmul; several '
                      'comma-separated run one after another in this process')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--steps', type=int, default=4, help='sampling steps per timed run')
  parser.add_argument('--size', type=int, default=4096, help='matmul size')
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--tiny', action='store_true', help='a small U-Net (smoke test)')
  parser.add_argument('--devices', type=int, default=1,
                      help='train: split the batch over this many CPU devices (shard_map)')
  parser.add_argument('--micro', type=int, default=1,
                      help='train: independent micro-batches per device, gradients summed')
  parser.add_argument('--accum', type=int, default=1,
                      help='train: micro-batches one after another (lax.scan), gradients summed')
  parser.add_argument('--default-malloc', action='store_true',
                      help="leave glibc's malloc as it is (the library's entry points call "
                      'host_memory.reuse_freed_host_memory(); so does this script by default)')
  args = parser.parse_args(argv)
  reused = not args.default_malloc and host_memory.reuse_freed_host_memory()
  if args.devices > 1:
    jax.config.update('jax_num_cpu_devices', args.devices)
  runs = dict(train=bench_train, library_step=bench_library_step, forward=bench_forward,
              sample=bench_sample, matmul=bench_matmul)
  for what in args.what.split(','):
    if what not in runs:
      parser.error(f'unknown measurement {what!r}; allowed: {", ".join(runs)}')
    out = runs[what](args)
    out.update(what=what, batch=args.batch, peak_rss_mib=peak_rss_mib(), reuse_freed_memory=reused,
               threads=len(os.sched_getaffinity(0)))
    print(json.dumps(out), flush=True)


if __name__ == '__main__':
  main()
