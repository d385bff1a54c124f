"""The PyTorch reference: diffusers' UNet2DModel and DDPMScheduler, one measurement per process.

Runs in the benchmark's own virtual environment (`bench/.venv-torch`, made by
`bench/run.py`), never in the project's:

  bench/.venv-torch/bin/python bench/torch_bench.py train --batch 8
  bench/.venv-torch/bin/python bench/torch_bench.py sample --batch 8 --steps 4

The U-Net is diffusers' build of the DDPM CIFAR-10 model (the configuration of
google/ddpm-cifar10-32), 35,746,307 parameters, checked on construction. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

T = 1000
IMAGE = (3, 32, 32)  # PyTorch is NCHW
CIFAR10_PARAMS = 35_746_307


def peak_rss_mib() -> float:
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def timed(fn, warmup: int, repeats: int) -> dict:
  for _ in range(warmup):
    fn()
  times = []
  cpu0, wall0 = cpu_seconds(), time.perf_counter()
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  cpu = cpu_seconds() - cpu0
  busy = cpu / max(time.perf_counter() - wall0, 1e-9)
  return dict(seconds=statistics.median(times), all_seconds=times, cores_busy=busy,
              cpu_seconds_per_run=cpu / repeats)


def make_unet() -> UNet2DModel:
  """DDPM's CIFAR-10 U-Net as diffusers builds it (google/ddpm-cifar10-32's config)."""
  model = UNet2DModel(
      sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
      block_out_channels=(128, 256, 256, 256),
      down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D', 'DownBlock2D'),
      up_block_types=('UpBlock2D', 'UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'),
      attention_head_dim=None, norm_num_groups=32, norm_eps=1e-6, dropout=0.1,
      flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, act_fn='silu')
  n = sum(p.numel() for p in model.parameters())
  if n != CIFAR10_PARAMS:
    raise AssertionError(f'reference U-Net has {n:,} parameters, expected {CIFAR10_PARAMS:,}')
  return model


def bench_train(args) -> dict:
  """forward, ε-MSE, backward and an Adam update; `--accum` micro-batches, gradients summed."""
  model = make_unet().train()
  sched = DDPMScheduler(num_train_timesteps=T, beta_schedule='linear')
  opt = torch.optim.Adam(model.parameters(), lr=2e-4)
  gen = torch.Generator().manual_seed(0)
  b = args.batch
  x0 = torch.rand((b,) + IMAGE, generator=gen) * 2 - 1

  a = args.accum

  def run():
    t = torch.randint(0, T, (b,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    x_t = sched.add_noise(x0, noise, t)
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for x_m, t_m, n_m in zip(x_t.chunk(a), t.chunk(a), noise.chunk(a)):  # micro-batches
      loss = F.mse_loss(model(x_m, t_m).sample, n_m) / a
      loss.backward()
      total += loss.item()
    opt.step()
    return total

  out = timed(run, args.warmup, args.repeats)
  out.update(images_per_s=b / out['seconds'])
  return out


def bench_forward(args) -> dict:
  model = make_unet().eval()
  b = args.batch
  x = torch.randn((b,) + IMAGE, generator=torch.Generator().manual_seed(0))
  t = torch.full((b,), 500, dtype=torch.long)

  def run():
    with torch.no_grad():
      model(x, t)

  out = timed(run, args.warmup, args.repeats)
  out.update(images_per_s=b / out['seconds'])
  return out


def bench_sample(args) -> dict:
  """K steps of the ancestral loop: `DDPMScheduler.step` under `torch.no_grad()`."""
  model = make_unet().eval()
  sched = DDPMScheduler(num_train_timesteps=T, beta_schedule='linear')
  sched.set_timesteps(T)
  steps = sched.timesteps[:args.steps]
  gen = torch.Generator().manual_seed(0)
  shape = (args.batch,) + IMAGE

  def run():
    with torch.no_grad():
      x = torch.randn(shape, generator=gen)
      for t in steps:
        eps = model(x, t).sample
        x = sched.step(eps, t, x, generator=gen).prev_sample
      assert torch.isfinite(x).all()

  out = timed(run, args.warmup, args.repeats)
  per_step = out['seconds'] / args.steps
  out.update(seconds_per_step=per_step, projected_1000_s=1000 * per_step)
  return out


def bench_matmul(args) -> dict:
  n = args.size
  a, b = torch.randn(n, n), torch.randn(n, n)
  out = timed(lambda: torch.mm(a, b), args.warmup, args.repeats)
  out.update(n=n, gflops_per_s=2 * n**3 / out['seconds'] / 1e9)
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('what', choices=('train', 'forward', 'sample', 'matmul'))
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--steps', type=int, default=4)
  parser.add_argument('--size', type=int, default=4096)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--accum', type=int, default=1, help='train: micro-batches per step')
  parser.add_argument('--threads', type=int, default=len(os.sched_getaffinity(0)))
  args = parser.parse_args(argv)
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  run = dict(train=bench_train, forward=bench_forward, sample=bench_sample,
             matmul=bench_matmul)[args.what]
  out = run(args)
  out.update(what=args.what, batch=args.batch, peak_rss_mib=peak_rss_mib(),
             threads=torch.get_num_threads(), torch=torch.__version__)
  print(json.dumps(out), flush=True)


if __name__ == '__main__':
  main()
