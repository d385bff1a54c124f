r"""The accelerator benchmark: diffusion_jax against PyTorch (diffusers) on one device.

  python bench/gpu.py                       # on a GPU machine; writes bench/gpu_report.md
  python bench/gpu.py --device cpu --model tiny --batch 4 --steps 2 --out /tmp/gpu.md

The first line is what issue 23 asks for, on a machine with one CUDA GPU, jax[cuda] and (for the
PyTorch rows) torch with CUDA and diffusers already installed: nothing is installed and nothing
is downloaded at run time. The second is the smoke test (tests/test_bench.py): the same code
paths on the CPU with a tiny U-Net, so that this script cannot rot unseen.

Rows, each measured in a process of its own (so each row's peak memory is its own, and a row
that runs out of memory is a note in the table, not the end of the run):
  * ceilings: a large bfloat16 matmul (the rate MFU is measured against) and a device-to-device
    copy (read + write bandwidth);
  * JAX: the library's `train_step` (ε-MSE, Adam, clip 1.0, EMA; under `shard_map` on a one-
    device mesh, state donated) with the U-Net in float32 (XLA's default precision: TF32 on
    NVIDIA GPUs) and in bfloat16 (`UNetConfig.dtype`; float32 parameters), at each `--batch`;
    the forward pass (evaluation mode) in both; sampling 256 images with DDPM-1000 and
    DPM-Solver++ 2M-20 (`sampler_lib.sample_fn`);
  * PyTorch: diffusers' `UNet2DModel` with the same step (plus the same EMA): eager float32 with
    TF32 allowed, eager bfloat16 autocast, `torch.compile` bfloat16 autocast, and the forward
    pass. Skipped with a note when torch or diffusers is missing, or `--device gpu` finds no CUDA.

Every time is the median of `--steps` timed iterations after `--warmup`, each ended by a device
sync (`block_until_ready`, `torch.cuda.synchronize`). MFU is a row's FLOP rate over the measured
bfloat16 matmul rate, its FLOPs from XLA's cost analysis of the compiled JAX program (the PyTorch
rows use the JAX step's count for the same model and batch). The table goes to `--out` (raw
numbers to the same name with .json) and is printed last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GIB = 2.0 ** 30
# The targets of issue 23, side by side on one card at batch 128.
TARGET_VS_TORCH_BEST = 1.5
TARGET_MFU = 0.30
TARGET_FP32_VS_TORCH_FP32 = 1.0
SAMPLE_IMAGES = 256


# ------------------------------------------------------------------------------------------
# Shared by the workers.
# ------------------------------------------------------------------------------------------


def _median_seconds(fn, warmup: int, steps: int) -> tuple[float, list[float]]:
  """Median seconds of `fn()`, which must end with a device sync."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), times


def _peak_rss_gib() -> float:
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) / 2**20
  except OSError:
    pass
  return float('nan')


# ------------------------------------------------------------------------------------------
# JAX workers: one measurement each, in its own process.
# ------------------------------------------------------------------------------------------


def _jax_setup(args):
  """Imports JAX for a worker (the opt-in GPU flags first, before JAX starts)."""
  sys.path.insert(0, ROOT)
  if args.xla_gpu_flags:
    from diffusion_jax.runtime import xla_flags  # pylint: disable=g-import-not-at-top
    xla_flags.set_gpu_flags()
  import jax  # pylint: disable=g-import-not-at-top
  if args.device == 'cpu':
    jax.config.update('jax_platforms', 'cpu')
  return jax


def _jax_peak_gib(jax) -> tuple[float, str]:
  """Peak device memory of this process, or the host's peak RSS where the device keeps none."""
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return stats['peak_bytes_in_use'] / GIB, 'device'
  return _peak_rss_gib(), 'host RSS'


def _unet_config(args, dtype):
  from diffusion_jax.models import UNetConfig  # pylint: disable=g-import-not-at-top
  if args.model == 'tiny':
    return UNetConfig(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dtype=dtype)
  return UNetConfig(dtype=dtype)  # DDPM's CIFAR-10 U-Net, 35,746,307 parameters


def _image_shape(args):
  return (8, 8, 3) if args.model == 'tiny' else (32, 32, 3)


def _compile_options(args):
  # The tiny smoke test skips XLA's expensive passes: it checks the path, not the speed.
  if args.model == 'tiny' and args.device == 'cpu':
    return {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}
  return None


def _init_params(jax, model, shape):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x = jnp.zeros((1,) + shape, jnp.float32)
  return jax.jit(lambda k: model.init({'params': k}, x, jnp.zeros((1,), jnp.int32)))(
      jax.random.key(0))['params']


def jax_train(args) -> dict:
  """The library's `train_step` as the trainer runs it: shard_map over a one-device mesh,
  jitted with the state donated, the step key folded from the state (no host work inside)."""
  jax = _jax_setup(args)
  import functools  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from diffusion_jax.process import gaussian_diffusion as gd  # pylint: disable=g-import-not-at-top
  from diffusion_jax.process import schedules  # pylint: disable=g-import-not-at-top
  from diffusion_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top
  from diffusion_jax.spec import OptimizerConfig  # pylint: disable=g-import-not-at-top
  from diffusion_jax.training.state import TrainState  # pylint: disable=g-import-not-at-top

  model = _unet_config(args, args.dtype).make()
  shape = _image_shape(args)
  params = _init_params(jax, model, shape)
  d = gd.GaussianDiffusion.from_betas(schedules.get_beta_schedule('linear', 1000))
  opt = OptimizerConfig()
  tx = opt.make()
  cfg = step_lib.StepConfig()
  step_fn = functools.partial(step_lib.train_step, model=model, diffusion=d, tx=tx,
                              learning_rate_fn=opt.learning_rate_schedule(), cfg=cfg)
  mesh = jax.make_mesh((1,), (step_lib.AXIS,), axis_types=(jax.sharding.AxisType.Explicit,),
                       devices=jax.devices()[:1])
  sharded = jax.shard_map(step_fn, mesh=mesh, in_specs=(P(), P(step_lib.AXIS), P()),
                          out_specs=(P(), P()))
  # The same program as `train_step.data_parallel_step` (which the trainer uses), jitted here
  # so that its compiled form, and XLA's cost analysis of it, are at hand.
  step = jax.jit(lambda s, b: sharded(s, b, jax.random.fold_in(s.rng, s.step)),
                 donate_argnums=(0,))
  state = TrainState.create(params, tx, jax.random.key_data(jax.random.key(0)))
  b = args.batch
  batch = dict(image=jax.random.uniform(jax.random.key(1), (b,) + shape, minval=-1.0,
                                        maxval=1.0),
               label=jnp.zeros((b,), jnp.int32))
  # Placed as the trainer places them: the state replicated, the batch split over 'data'.
  state = jax.device_put(state, NamedSharding(mesh, P()))
  batch = jax.device_put(batch, NamedSharding(mesh, P(step_lib.AXIS)))
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile(_compile_options(args))
  compile_s = time.perf_counter() - start
  box = dict(state=state)

  def run():
    box['state'], metrics = compiled(box['state'], batch)
    jax.block_until_ready((box['state'].params, metrics))

  seconds, times = _median_seconds(run, args.warmup, args.steps)
  loss = float(compiled(box['state'], batch)[1]['loss'])
  if not loss == loss:  # NaN
    raise FloatingPointError('the training loss is NaN')
  peak, where = _jax_peak_gib(jax)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return dict(seconds=seconds, times=times, compile_s=compile_s, peak_gib=peak, peak_of=where,
              flops=float(cost.get('flops', float('nan'))), images=b)


def jax_forward(args) -> dict:
  jax = _jax_setup(args)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  model = _unet_config(args, args.dtype).make()
  shape = _image_shape(args)
  params = _init_params(jax, model, shape)
  b = args.batch
  x = jax.random.normal(jax.random.key(1), (b,) + shape)
  t = jnp.full((b,), 500, jnp.int32)
  start = time.perf_counter()
  compiled = jax.jit(lambda p, x, t: model.apply({'params': p}, x, t)).lower(
      params, x, t).compile(_compile_options(args))
  compile_s = time.perf_counter() - start
  seconds, times = _median_seconds(lambda: compiled(params, x, t).block_until_ready(),
                                   args.warmup, args.steps)
  peak, where = _jax_peak_gib(jax)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return dict(seconds=seconds, times=times, compile_s=compile_s, peak_gib=peak, peak_of=where,
              flops=float(cost.get('flops', float('nan'))), images=b)


def jax_sample(args) -> dict:
  """`sampler_lib.sample_fn` (what sample.py runs) for `--batch` images: one compiled program."""
  jax = _jax_setup(args)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from diffusion_jax.process import gaussian_diffusion as gd  # pylint: disable=g-import-not-at-top
  from diffusion_jax.sampling import config as sampler_config
  from diffusion_jax.sampling import sampler as sampler_lib
  from diffusion_jax.process import schedules  # pylint: disable=g-import-not-at-top
  model = _unet_config(args, args.dtype).make()
  shape = _image_shape(args)
  params = _init_params(jax, model, shape)
  d = gd.GaussianDiffusion.from_betas(schedules.get_beta_schedule('linear', 1000))
  sampler = sampler_config.SamplerConfig(args.sampler, steps=args.sample_steps)
  fn = sampler_lib.sample_fn(model, d, parameterization=gd.Parameterization('eps', 'fixedlarge'),
                          sampler=sampler)
  x_shape = (args.batch,) + shape
  labels = jnp.zeros((args.batch,), jnp.int32)
  start = time.perf_counter()
  compiled = jax.jit(lambda p, k: fn(p, k, labels, x_shape)).lower(
      params, jax.random.key(0)).compile(_compile_options(args))
  compile_s = time.perf_counter() - start
  box = dict(i=0)

  def run():
    box['i'] += 1
    x0, _ = compiled(params, jax.random.key(box['i']))
    x0.block_until_ready()

  seconds, times = _median_seconds(run, min(args.warmup, 1), max(1, min(args.steps, 3)))
  x0, nfe = compiled(params, jax.random.key(0))
  if not bool(jnp.all(jnp.isfinite(x0))):
    raise FloatingPointError('the samples are not finite')
  peak, where = _jax_peak_gib(jax)
  return dict(seconds=seconds, times=times, compile_s=compile_s, peak_gib=peak, peak_of=where,
              images=args.batch, nfe=int(nfe))


def jax_matmul(args) -> dict:
  """bfloat16 [n, n] @ [n, n] with a float32 result: the device's practical matrix rate."""
  jax = _jax_setup(args)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  n = args.size
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
  dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  compiled = dot.lower(a, b).compile()
  seconds, times = _median_seconds(lambda: compiled(a, b).block_until_ready(), args.warmup,
                                   args.steps)
  return dict(seconds=seconds, times=times, flops=2.0 * n ** 3, n=n)


def jax_copy(args) -> dict:
  """x + 1 over a float32 array of `--size`² elements: one read and one write per element."""
  jax = _jax_setup(args)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  n = args.size
  x = jnp.ones((n, n), jnp.float32)
  compiled = jax.jit(lambda v: v + 1.0).lower(x).compile()
  seconds, times = _median_seconds(lambda: compiled(x).block_until_ready(), args.warmup,
                                   args.steps)
  return dict(seconds=seconds, times=times, bytes=2.0 * 4 * n * n, n=n)


# ------------------------------------------------------------------------------------------
# PyTorch workers (diffusers' UNet2DModel), run by a Python that has torch and diffusers.
# ------------------------------------------------------------------------------------------


def _torch_model(args):
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import UNet2DModel  # pylint: disable=g-import-not-at-top
  if args.model == 'tiny':
    model = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                        block_out_channels=(32,), down_block_types=('DownBlock2D',),
                        up_block_types=('UpBlock2D',), norm_num_groups=32)
  else:
    sys.path.insert(0, HERE)
    import torch_bench  # pylint: disable=g-import-not-at-top
    model = torch_bench.make_unet()   # checks the 35,746,307 parameters
  device = torch.device('cuda' if args.device == 'gpu' else 'cpu')
  return model.to(device), device


def _torch_sync(torch, device):
  if device.type == 'cuda':
    torch.cuda.synchronize()


def _torch_peak_gib(torch, device) -> tuple[float, str]:
  if device.type == 'cuda':
    return torch.cuda.max_memory_allocated() / GIB, 'device'
  return _peak_rss_gib(), 'host RSS'


def torch_train(args) -> dict:
  """forward, ε-MSE, backward, clip 1.0, Adam and an EMA: the library step's work."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  from diffusers import DDPMScheduler  # pylint: disable=g-import-not-at-top
  torch.backends.cuda.matmul.allow_tf32 = True   # as XLA's default precision on the JAX side
  torch.backends.cudnn.allow_tf32 = True
  model, device = _torch_model(args)
  model.train()
  ema = [p.detach().clone() for p in model.parameters()]
  params = list(model.parameters())
  sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule='linear')
  opt = torch.optim.Adam(params, lr=2e-4, fused=device.type == 'cuda')
  b = args.batch
  shape = (b, 3) + _image_shape(args)[:2]
  gen = torch.Generator(device=device).manual_seed(0)
  x0 = torch.rand(shape, generator=gen, device=device) * 2 - 1
  autocast = args.dtype == 'bfloat16'

  def step(x_t, t, noise):
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
      loss = F.mse_loss(model(x_t, t).sample.float(), noise)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
      torch._foreach_lerp_(ema, params, 1.0 - 0.9999)  # pylint: disable=protected-access
    return loss.detach()

  if args.compile:
    step = torch.compile(step)

  def run():
    t = torch.randint(0, 1000, (b,), generator=gen, device=device)
    noise = torch.randn(shape, generator=gen, device=device)
    step(sched.add_noise(x0, noise, t), t, noise)
    _torch_sync(torch, device)

  start = time.perf_counter()
  run()   # the first step compiles (torch.compile) and warms the allocator
  compile_s = time.perf_counter() - start
  seconds, times = _median_seconds(run, max(args.warmup - 1, 0), args.steps)
  peak, where = _torch_peak_gib(torch, device)
  return dict(seconds=seconds, times=times, compile_s=compile_s, peak_gib=peak, peak_of=where,
              images=b, torch=torch.__version__)


def torch_forward(args) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  torch.backends.cuda.matmul.allow_tf32 = True
  torch.backends.cudnn.allow_tf32 = True
  model, device = _torch_model(args)
  model.eval()
  b = args.batch
  x = torch.randn((b, 3) + _image_shape(args)[:2], device=device)
  t = torch.full((b,), 500, dtype=torch.long, device=device)

  def run():
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16,
                                         enabled=args.dtype == 'bfloat16'):
      model(x, t)
    _torch_sync(torch, device)

  start = time.perf_counter()
  run()
  compile_s = time.perf_counter() - start
  seconds, times = _median_seconds(run, max(args.warmup - 1, 0), args.steps)
  peak, where = _torch_peak_gib(torch, device)
  return dict(seconds=seconds, times=times, compile_s=compile_s, peak_gib=peak, peak_of=where,
              images=b, torch=torch.__version__)


WORKERS = dict(jax_train=jax_train, jax_forward=jax_forward, jax_sample=jax_sample,
               jax_matmul=jax_matmul, jax_copy=jax_copy, torch_train=torch_train,
               torch_forward=torch_forward)


# ------------------------------------------------------------------------------------------
# The driver.
# ------------------------------------------------------------------------------------------


def _worker_argv(args, worker: str, **kw) -> list[str]:
  argv = [os.path.abspath(__file__), '--worker', worker, '--device', args.device,
          '--model', args.model, '--warmup', str(args.warmup), '--steps', str(args.steps)]
  if args.xla_gpu_flags:
    argv.append('--xla-gpu-flags')
  for k, v in kw.items():
    if isinstance(v, bool):
      if v:
        argv.append('--' + k.replace('_', '-'))
    else:
      argv += ['--' + k.replace('_', '-'), str(v)]
  return argv


def _run_worker(python: str, argv: list[str], timeout: float) -> dict:
  """One measurement in a child process: its JSON line, or {'error': why}."""
  env = dict(os.environ)
  env.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')  # peak memory is then the row's own
  try:
    proc = subprocess.run([python] + argv, capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)
  except subprocess.TimeoutExpired:
    return dict(error=f'timed out after {timeout:.0f} s')
  lines = [l for l in proc.stdout.splitlines() if l.startswith('{')]
  if proc.returncode != 0 or not lines:
    lines = proc.stderr.strip().splitlines() or ['no output']
    errors = [l for l in lines if re.match(r'^[\w.]*(Error|Exception|Exit)\b', l)]
    tail = (errors or lines)[-1]
    if 'RESOURCE_EXHAUSTED' in proc.stderr or 'out of memory' in proc.stderr.lower():
      tail = 'out of memory'
    return dict(error=tail[:200])
  return json.loads(lines[-1])


def _torch_status(python: str, device: str) -> tuple[str | None, dict]:
  """(None, versions) when `python` has torch and diffusers (and CUDA for `--device gpu`),
  else (why not, {}). The versions (torch, diffusers, CUDA) go into the machine's record: one
  process imports torch for both."""
  code = ('import json, torch, diffusers; print(json.dumps(dict(torch=torch.__version__, '
          'diffusers=diffusers.__version__, cuda=torch.version.cuda, '
          'cuda_available=torch.cuda.is_available())))')
  try:
    proc = subprocess.run([python, '-c', code], capture_output=True, text=True, timeout=300)
  except (OSError, subprocess.TimeoutExpired) as e:
    return f'PyTorch rows skipped: {python} could not be run ({e})', {}
  if proc.returncode != 0:
    return f'PyTorch rows skipped: torch or diffusers is not installed for {python}', {}
  info = json.loads(proc.stdout.strip().splitlines()[-1])
  if not info.pop('cuda_available') and device == 'gpu':
    return f'PyTorch rows skipped: torch {info["torch"]} sees no CUDA device', {}
  return None, info


def _machine(args, torch_versions: dict) -> dict:
  sys.path.insert(0, ROOT)
  code = ('import json, jax, jaxlib, flax, optax; d = jax.devices()[0]; '
          'print(json.dumps(dict(jax=jax.__version__, jaxlib=jaxlib.__version__, '
          'flax=flax.__version__, optax=optax.__version__, backend=jax.default_backend(), '
          'device=getattr(d, "device_kind", str(d)))))')
  env = dict(os.environ)
  if args.device == 'cpu':
    env['JAX_PLATFORMS'] = 'cpu'
  out = json.loads(subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                                  check=True, env=env).stdout.strip().splitlines()[-1])
  out.update(python=platform.python_version(), host=platform.node(),
             date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
             xla_flags=os.environ.get('XLA_FLAGS', ''))
  out.update(torch_versions)
  return out


def plan(args, torch_ok: bool) -> list[tuple[str, str, dict, str]]:
  """(key, python, worker kwargs, row label) for every row, in the order they run."""
  rows = [('ceiling_matmul', 'jax', dict(worker='jax_matmul', size=args.matmul_size),
           'ceiling: bf16 matmul'),
          ('ceiling_copy', 'jax', dict(worker='jax_copy', size=args.matmul_size),
           'ceiling: device copy')]
  for b in args.batch:
    for dt, label in (('float32', 'float32 (TF32 on GPU)'), ('bfloat16', 'bfloat16 compute')):
      rows.append((f'jax_train_{dt}_{b}', 'jax', dict(worker='jax_train', dtype=dt, batch=b),
                   f'JAX library train_step, {label}'))
    if torch_ok:
      for key, dt, comp, label in (('eager_fp32', 'float32', False, 'eager float32/TF32'),
                                   ('eager_bf16', 'bfloat16', False, 'eager bf16 autocast'),
                                   ('compile_bf16', 'bfloat16', True,
                                    'torch.compile bf16 autocast')):
        if comp and args.device == 'cpu':
          continue   # needs a C++ toolchain and minutes on a CPU; the GPU run has it
        rows.append((f'torch_{key}_{b}', 'torch',
                     dict(worker='torch_train', dtype=dt, batch=b, compile=comp),
                     f'PyTorch {label}'))
  fb = args.forward_batch
  for dt in ('float32', 'bfloat16'):
    rows.append((f'jax_forward_{dt}', 'jax', dict(worker='jax_forward', dtype=dt, batch=fb),
                 f'JAX forward (eval), {dt}'))
    if torch_ok:
      rows.append((f'torch_forward_{dt}', 'torch',
                   dict(worker='torch_forward', dtype=dt, batch=fb),
                   f'PyTorch forward (eval), {dt}'))
  for sampler, steps in (('ddpm', args.ddpm_steps), ('dpmpp_2m', args.solver_steps)):
    rows.append((f'jax_sample_{sampler}', 'jax',
                 dict(worker='jax_sample', dtype='float32', batch=args.sample_batch,
                      sampler=sampler, sample_steps=steps),
                 f'JAX sampling {"DDPM" if sampler == "ddpm" else "DPM-Solver++ 2M"}-{steps}'))
  return rows


def _fmt(x, spec):
  return '–' if x is None or x != x else format(x, spec)


def report(results: dict, labels: dict, machine: dict, args, notes: list[str]) -> str:
  """The markdown table, with the targets and the machine."""
  mm = results.get('ceiling_matmul', {})
  peak_rate = mm.get('flops', float('nan')) / mm['seconds'] if 'seconds' in mm else None
  on_gpu = machine.get('backend') == 'gpu'
  lines = [f'Machine: {machine.get("device")} ({machine.get("backend")}), host '
           f'{machine.get("host")}, {machine.get("date")}. jax {machine.get("jax")}, flax '
           f'{machine.get("flax")}, optax {machine.get("optax")}'
           + (f'; torch {machine["torch"]} (CUDA {machine.get("cuda")}), diffusers '
              f'{machine["diffusers"]}' if 'torch' in machine else '')
           + f'. Model: {"tiny U-Net (smoke test)" if args.model == "tiny" else "DDPM CIFAR-10 U-Net"}; '
           f'median of {args.steps} steps after {args.warmup}. XLA_FLAGS='
           f'`{machine.get("xla_flags") or "(none)"}`.', '',
           '| row | batch | steps/s | images/s | compile s | peak GiB | TFLOP/s | MFU | note |',
           '|---|---|---|---|---|---|---|---|---|']
  flops_per_image = {}
  for key, r in results.items():
    if key.startswith('jax_train_float32_') and 'flops' in r:
      flops_per_image[r['images']] = r['flops'] / r['images']
  for key, r in results.items():
    label = labels[key]
    if 'error' in r:
      lines.append(f'| {label} | | | | | | | | not measured: {r["error"]} |')
      continue
    s = r['seconds']
    note = []
    if key == 'ceiling_matmul':
      lines.append(f'| {label} [{r["n"]}²] | | | | | | {_fmt(r["flops"] / s / 1e12, ".1f")} '
                   f'| 100% | the MFU reference |')
      continue
    if key == 'ceiling_copy':
      lines.append(f'| {label} [{r["n"]}² f32] | | | | | | | | '
                   f'{_fmt(r["bytes"] / s / 1e9, ".0f")} GB/s read+write |')
      continue
    per_s = _fmt(1 / s, '.2f')
    if key.startswith('jax_sample'):
      note.append(f'{r["nfe"]} model evaluations, {s:.3g} s per run')
      per_s = '–'   # a run is the whole sampling loop, not a step
    flops = r.get('flops')
    if flops is None and key.startswith('torch_train'):
      fpi = flops_per_image.get(r['images'])
      flops = fpi * r['images'] if fpi else None
      note.append("FLOPs: the JAX step's")
    if flops is None and key.startswith('torch_forward'):
      twin = results.get('jax_forward_float32', {})
      flops = twin.get('flops')
      note.append("FLOPs: the JAX forward's")
    rate = flops / s if flops else None
    mfu = rate / peak_rate if rate and peak_rate else None
    if r.get('peak_of') == 'host RSS':
      note.append('memory: host peak RSS')
    lines.append(f'| {label} | {r["images"]} | {per_s} | '
                 f'{_fmt(r["images"] / s, ",.0f")} | {_fmt(r.get("compile_s"), ".1f")} | '
                 f'{_fmt(r.get("peak_gib"), ".2f")} | {_fmt(rate / 1e12 if rate else None, ".2f")} | '
                 f'{_fmt(100 * mfu if mfu else None, ".1f")}{"%" if mfu else ""} | '
                 f'{"; ".join(note)} |')
  lines += ['', f'Targets at batch {args.target_batch} '
            f'({"measured on this GPU" if on_gpu else "not judged: this run is not on a GPU"}):']

  def ips(key):
    r = results.get(key, {})
    return r['images'] / r['seconds'] if 'seconds' in r else None

  b = args.target_batch
  ours = [v for v in (ips(f'jax_train_float32_{b}'), ips(f'jax_train_bfloat16_{b}')) if v]
  theirs = [v for v in (ips(f'torch_eager_fp32_{b}'), ips(f'torch_eager_bf16_{b}'),
                        ips(f'torch_compile_bf16_{b}')) if v]
  best_ours = max(ours) if ours else None
  best_theirs = max(theirs) if theirs else None
  checks = []
  if best_ours and best_theirs:
    checks.append((f'our best / PyTorch\'s best ≥ {TARGET_VS_TORCH_BEST}',
                   best_ours / best_theirs, TARGET_VS_TORCH_BEST))
  fp32_ours, fp32_theirs = ips(f'jax_train_float32_{b}'), ips(f'torch_eager_fp32_{b}')
  if fp32_ours and fp32_theirs:
    checks.append((f'our float32 / PyTorch float32-TF32 ≥ {TARGET_FP32_VS_TORCH_FP32}',
                   fp32_ours / fp32_theirs, TARGET_FP32_VS_TORCH_FP32))
  best_mfu = None
  for dt in ('float32', 'bfloat16'):
    r = results.get(f'jax_train_{dt}_{b}', {})
    if 'seconds' in r and peak_rate:
      m = r['flops'] / r['seconds'] / peak_rate
      best_mfu = m if best_mfu is None else max(best_mfu, m)
  if best_mfu is not None:
    checks.append((f'our best MFU ≥ {TARGET_MFU:.0%}', best_mfu, TARGET_MFU))
  for what, value, target in checks:
    verdict = ('met' if value >= target else 'not met') if on_gpu else 'not judged'
    lines.append(f'- {what}: {value:.3g} ({verdict})')
  if not checks:
    lines.append('- no target could be computed from the rows above')
  lines += [f'- {n}' for n in notes]
  return '\n'.join(lines) + '\n'


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--device', choices=('gpu', 'cpu'), default='gpu')
  parser.add_argument('--model', choices=('cifar10', 'tiny'), default='cifar10')
  parser.add_argument('--batch', type=int, nargs='+', default=[128, 256, 512],
                      help='training batch sizes (a row that runs out of memory is a note)')
  parser.add_argument('--target-batch', type=int, default=None,
                      help='the batch the targets are judged at (default: the first --batch)')
  parser.add_argument('--forward-batch', type=int, default=256)
  parser.add_argument('--sample-batch', type=int, default=SAMPLE_IMAGES)
  parser.add_argument('--ddpm-steps', type=int, default=1000)
  parser.add_argument('--solver-steps', type=int, default=20)
  parser.add_argument('--steps', type=int, default=30, help='timed iterations per row')
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--matmul-size', type=int, default=8192)
  parser.add_argument('--torch-python', default=sys.executable,
                      help='the Python that has torch and diffusers (default: this one)')
  parser.add_argument('--skip-torch', action='store_true')
  parser.add_argument('--xla-gpu-flags', action='store_true',
                      help='set diffusion_jax.runtime.xla_flags.GPU_FLAGS in every JAX worker')
  parser.add_argument('--timeout', type=float, default=900, help='seconds per row')
  parser.add_argument('--out', default=os.path.join(HERE, 'gpu_report.md'))
  # One measurement (the driver starts these).
  parser.add_argument('--worker', choices=sorted(WORKERS), help=argparse.SUPPRESS)
  parser.add_argument('--dtype', default='float32', help=argparse.SUPPRESS)
  parser.add_argument('--compile', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--size', type=int, default=8192, help=argparse.SUPPRESS)
  parser.add_argument('--sampler', default='ddpm', help=argparse.SUPPRESS)
  parser.add_argument('--sample-steps', type=int, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  if args.worker:
    if isinstance(args.batch, list):
      args.batch = args.batch[0]
    out = WORKERS[args.worker](args)
    print(json.dumps(out), flush=True)
    return

  for name in ('steps', 'matmul_size', 'forward_batch', 'sample_batch', 'ddpm_steps',
               'solver_steps'):
    if getattr(args, name) < 1:
      parser.error(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}')
  if any(b < 1 for b in args.batch):
    parser.error(f'--batch sizes must be >= 1, got {args.batch}')
  args.target_batch = args.target_batch or args.batch[0]

  notes = []
  if args.device == 'gpu':
    probe = subprocess.run([sys.executable, '-c', 'import jax; print(jax.default_backend())'],
                           capture_output=True, text=True)
    if probe.returncode != 0 or probe.stdout.strip() != 'gpu':
      sys.exit(f'--device gpu: JAX sees no GPU here (backend {probe.stdout.strip() or "?"}); '
               'run with --device cpu for the smoke test')
  torch_python, torch_versions = None, {}
  if args.skip_torch:
    notes.append('PyTorch rows skipped: --skip-torch')
  else:
    why, torch_versions = _torch_status(args.torch_python, args.device)
    if why:
      notes.append(why)
    else:
      torch_python = args.torch_python
  machine = _machine(args, torch_versions)
  results, labels = {}, {}
  for key, side, kw, label in plan(args, torch_python is not None):
    python = torch_python if side == 'torch' else sys.executable
    worker = kw.pop('worker')
    start = time.perf_counter()
    results[key] = _run_worker(python, _worker_argv(args, worker, **kw), args.timeout)
    labels[key] = label
    print(f'{key}: {time.perf_counter() - start:.0f} s '
          f'{results[key].get("error") or format(results[key]["seconds"], ".4g") + " s/iter"}',
          flush=True)
  table = report(results, labels, machine, args, notes)
  with open(args.out, 'w') as f:
    f.write(table)
  with open(os.path.splitext(args.out)[0] + '.json', 'w') as f:
    json.dump(dict(machine=machine, results=results), f, indent=1)
  print(table, flush=True)


if __name__ == '__main__':
  main()
