"""The PyTorch peer recipe of `bench/quality.py`: diffusers' UNet2DModel + DDPMScheduler on the
digits, trained for a wall-clock budget, then sampled with diffusers' own schedulers.

Runs in `bench/.venv-torch` (made by `bench/run.py`), never in the project's environment:

  bench/.venv-torch/bin/python bench/torch_quality.py train --data train.npz --out DIR \
      --budget_s 600 --snapshots 120,300
  bench/.venv-torch/bin/python bench/torch_quality.py sample --weights DIR/ema_600.pt \
      --sampler dpm --steps 20 --num 1797 --out samples.npz

The recipe, as a diffusers user writes it for 8×8 digits: block channels (64, 128), two
layers per block, (DownBlock2D, AttnDownBlock2D) and their mirror, 32 norm groups; linear β
over T = 1000, ε prediction, `fixed_small` variance, clipping; AdamW at a constant 1e-3
(weight decay 0), batch 128, gradient-norm clipping at 1.0; `EMAModel` at 0.999 with its
(1 + n) / (10 + n) warm-up. The clock starts when the process starts, imports and model
construction included. Prints one JSON line per command.
"""

from __future__ import annotations

import time

PROCESS_START = time.time()

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       UNet2DModel)
from diffusers.training_utils import EMAModel

T = 1000


def make_unet(image_size: int = 8, channels: int = 1) -> UNet2DModel:
  return UNet2DModel(
      sample_size=image_size, in_channels=channels, out_channels=channels,
      block_out_channels=(64, 128), layers_per_block=2, norm_num_groups=32,
      down_block_types=('DownBlock2D', 'AttnDownBlock2D'),
      up_block_types=('AttnUpBlock2D', 'UpBlock2D'))


def make_scheduler() -> DDPMScheduler:
  return DDPMScheduler(num_train_timesteps=T, beta_schedule='linear', beta_start=1e-4,
                       beta_end=0.02, prediction_type='epsilon', variance_type='fixed_small',
                       clip_sample=True)


def to_model_range(images_uint8: np.ndarray) -> torch.Tensor:
  """uint8 [N, H, W, C] → float32 [N, C, H, W] in [-1, 1]."""
  x = torch.from_numpy(images_uint8.astype(np.float32) / 127.5 - 1.0)
  return x.permute(0, 3, 1, 2).contiguous()


def train(args) -> dict:
  torch.manual_seed(args.seed)
  data = to_model_range(np.load(args.data)['images'])
  n = data.shape[0]
  model = make_unet(data.shape[-1], data.shape[1])
  scheduler = make_scheduler()
  ema = EMAModel(model.parameters(), decay=0.999)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
  snapshots = sorted({float(s) for s in args.snapshots.split(',') if s} | {args.budget_s})
  os.makedirs(args.out, exist_ok=True)
  written, losses, step = [], [], 0
  perm, cursor = torch.randperm(n), 0
  model.train()
  while snapshots:
    if cursor + args.batch > n:  # epochs of the training digits, reshuffled each time
      perm, cursor = torch.randperm(n), 0
    x0 = data[perm[cursor:cursor + args.batch]]
    cursor += args.batch
    noise = torch.randn_like(x0)
    t = torch.randint(0, T, (x0.shape[0],))
    xt = scheduler.add_noise(x0, noise, t)
    loss = F.mse_loss(model(xt, t).sample, noise)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    ema.step(model.parameters())
    step += 1
    losses.append(loss.item())
    elapsed = time.time() - PROCESS_START
    if step % 100 == 0:
      print(f'step {step} loss {np.mean(losses[-100:]):.5f} {elapsed:.0f} s', flush=True)
    while snapshots and elapsed >= snapshots[0]:
      budget = snapshots.pop(0)
      shadow = make_unet(data.shape[-1], data.shape[1])
      ema.copy_to(shadow.parameters())
      path = os.path.join(args.out, f'ema_{budget:g}.pt')
      torch.save(shadow.state_dict(), path)
      written.append(dict(budget_s=budget, path=path, step=step, seconds=elapsed))
  num_params = sum(p.numel() for p in model.parameters())
  return dict(snapshots=written, num_params=num_params, steps=step,
              final_loss=float(np.mean(losses[-100:])), threads=torch.get_num_threads())


def make_sampling_scheduler(kind: str, steps: int):
  base = make_scheduler()
  if kind == 'ddpm':
    return base
  if kind == 'ddim':  # η = 0
    return DDIMScheduler.from_config(base.config)
  if kind == 'dpm':   # DPM-Solver++ 2M, diffusers' defaults
    return DPMSolverMultistepScheduler.from_config(base.config, algorithm_type='dpmsolver++',
                                                   solver_order=2)
  raise ValueError(f'--sampler {kind!r}: expected ddpm, ddim or dpm')


@torch.no_grad()
def sample(args) -> dict:
  """`--num` images with diffusers' scheduler loop, in batches; `--weights random`: a freshly
  initialised U-Net (for timing only)."""
  torch.manual_seed(args.seed)
  if args.weights == 'random':
    model = make_unet(args.image_size, args.channels)
  else:
    weights = torch.load(args.weights, map_location='cpu')
    model = make_unet(args.image_size, weights['conv_in.weight'].shape[1])  # [out, in, 3, 3]
    model.load_state_dict(weights)
  model.eval()
  scheduler = make_sampling_scheduler(args.sampler, args.steps)
  generator = torch.Generator().manual_seed(args.seed)
  shape = (model.config.in_channels, args.image_size, args.image_size)
  out, seconds = [], []
  for start in range(0, args.num, args.batch):
    b = min(args.batch, args.num - start)
    t0 = time.perf_counter()
    scheduler.set_timesteps(args.steps)
    x = torch.randn((b,) + shape, generator=generator)
    for t in scheduler.timesteps:
      eps = model(x, t).sample
      x = scheduler.step(eps, t, x, generator=generator).prev_sample
    seconds.append(time.perf_counter() - t0)
    imgs = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    out.append(imgs.permute(0, 2, 3, 1).numpy())
  np.savez(args.out, images=np.concatenate(out))
  sizes = [len(o) for o in out]
  later = slice(1, None) if len(out) > 1 else slice(None)  # the first batch warms up
  return dict(sampler=args.sampler, steps=args.steps, evaluations=len(scheduler.timesteps),
              num=args.num, seconds=sum(seconds), images_per_s=args.num / sum(seconds),
              images_per_s_steady=sum(sizes[later]) / sum(seconds[later]),
              num_params=sum(p.numel() for p in model.parameters()),
              threads=torch.get_num_threads())


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  sub = parser.add_subparsers(dest='command', required=True)
  p = sub.add_parser('train')
  p.add_argument('--data', required=True, help='.npz with uint8 images [N, H, W, C]')
  p.add_argument('--out', required=True)
  p.add_argument('--budget_s', type=float, default=600.0)
  p.add_argument('--snapshots', default='', help='comma-separated seconds: EMA weights also '
                 'saved when the clock passes each')
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--seed', type=int, default=0)
  p = sub.add_parser('sample')
  p.add_argument('--weights', required=True)
  p.add_argument('--sampler', default='dpm')
  p.add_argument('--steps', type=int, default=20)
  p.add_argument('--num', type=int, default=1797)
  p.add_argument('--batch', type=int, default=256)
  p.add_argument('--image_size', type=int, default=8)
  p.add_argument('--channels', type=int, default=1, help='with --weights random')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--out', required=True)
  args = parser.parse_args()
  result = train(args) if args.command == 'train' else sample(args)
  print(json.dumps(dict(command=args.command, **result)), flush=True)


if __name__ == '__main__':
  main()
