"""Issue 33's measurements: inpainting held-out digits, and class-guided samples.

  .venv/bin/python bench/controllable.py --model /tmp/digits \
      --classifier /tmp/digits_classifier --conditional /tmp/digits_cond   # ≈ 25 min, 2 cores

Inpainting: the bottom half of the digits test split (297 digits, held out of training; each
completed `--num_inpaint` / 297 times with other noise, 1,000 completions by default) is
filled by replacement and by RePaint through the library's own path (`trained_model.edit`, as
sample.py --inpaint does), and by a nearest-neighbour baseline: the bottom half of the
training digit whose top half is nearest in L2. The project's digits classifier (the FD
feature network, `features.digits_extractor`) reads each completion's label; the table gives
its agreement with the true label, and the RMSE of the filled half (pixels in [0, 1]).

Guidance: `--num_samples` samples (every class in turn) of the model guided by the
noise-conditional classifier at each `--scales`, and of the label-trained model
(`--conditional`, classifier-free guidance) at each `--cfg_scales`; the digits FD, precision
and recall against the training split, and the digits classifier's accuracy on the intended
labels. Writes JSON (`--out`), the markdown tables, and the pictures (`--pictures`).
Run it alone: timings on 2 cores move with any other load.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from diffusion_jax import trained_model as tm
from diffusion_jax.data import input_pipeline
from diffusion_jax.evaluation import evaluate, features
from diffusion_jax.sampling import config as sampler_config
from diffusion_jax.sampling import controllable
from diffusion_jax.storage import images as images_lib


def _labels_of(extractor, images: np.ndarray) -> np.ndarray:
  return np.argmax(extractor.features_and_logits(images)[1], axis=-1)


def nearest_neighbour_fill(known: np.ndarray, mask: np.ndarray, train: np.ndarray
                           ) -> np.ndarray:
  """Each image's unknown pixels from the training image nearest on the known ones (L2)."""
  m = mask.astype(bool)
  a = known.reshape(len(known), -1).astype(np.float64)
  b = train.reshape(len(train), -1).astype(np.float64)
  w = m.reshape(-1).astype(np.float64)
  d = (a ** 2) @ w[:, None] - 2 * (a * w) @ b.T + ((b ** 2) @ w)[None, :]   # [N, M]
  nearest = train[np.argmin(d, axis=1)]
  return np.where(m, known, nearest)


def inpainting(args, trained, extractor, rows):
  data_dir = trained.spec.data.data_dir
  test_x, test_y = input_pipeline.load_split('digits', data_dir, 'test')
  train_x, _ = input_pipeline.load_split('digits', data_dir, 'train')
  idx = np.arange(args.num_inpaint) % len(test_x)
  truth, labels = test_x[idx], test_y[idx]
  mask = controllable.region_mask('bottom', trained.image_shape)
  unknown = ~mask.astype(bool)

  def score(name, filled, nfe, seconds):
    agree = float(np.mean(_labels_of(extractor, filled) == labels))
    rmse = float(np.sqrt(np.mean(((filled.astype(np.float64) - truth) / 255.0)[:, unknown] ** 2)))
    rows.append(dict(part='inpaint', method=name, nfe=nfe, seconds=seconds,
                     agreement=agree, rmse=rmse, n=len(filled), distinct=len(test_x)))
    print(json.dumps(rows[-1]), flush=True)
    return filled

  pictures = {}
  pictures['truth'] = truth
  pictures['known'] = np.where(mask.astype(bool), truth, 128).astype(np.uint8)
  score('the true digits', truth, 0, 0.0)
  score('top half only (bottom black)', np.where(mask.astype(bool), truth, 0).astype(np.uint8),
        0, 0.0)
  t0 = time.perf_counter()
  pictures['nearest neighbour'] = score('nearest neighbour (top half, L2)',
                                        nearest_neighbour_fill(truth, mask, train_x), 0,
                                        time.perf_counter() - t0)
  rng = jax.random.key(args.seed)
  for name, kind, steps, jl, jn in args.inpainters:
    cfg = sampler_config.SamplerConfig(kind, steps=steps)
    control = controllable.Control('inpaint', jump_length=jl, jump_n_sample=jn)
    run = tm.make_sampler(trained, cfg, control=control)
    batch = args.batch_size
    tm.edit(trained, cfg, control, truth[:batch], mask, rng=rng, run=run, batch_size=batch)
    t0 = time.perf_counter()
    filled, nfe = tm.edit(trained, cfg, control, truth, mask, rng=rng, run=run,
                          batch_size=batch)
    pictures[name] = score(f'{name}: {cfg.describe()}, jumps ({jl}, {jn})', filled, nfe,
                           time.perf_counter() - t0)
  if args.pictures:
    k = 12
    order = list(pictures)
    tiles = np.stack([pictures[n][:k] for n in order], axis=1).reshape((-1, 8, 8, 1))
    path = os.path.join(args.pictures, 'controllable_inpaint.png')
    images_lib.save_png(path, images_lib.make_grid(tiles, ncol=len(order)), 4)
    print('columns of', path, ':', ', '.join(order))


def guidance(args, trained, extractor, reference, rows, *, classifier=None,
             scales=(), conditional=False):
  cfg0 = sampler_config.SamplerConfig(args.sampler, steps=args.steps)
  n = args.num_samples
  rng = jax.random.key(args.seed + 1)
  grid = []
  for s in scales:
    cfg = cfg0.with_options(None, guidance_scale=s) if conditional else cfg0
    guide = classifier if s else None   # scale 0: the plain sampler, no gradient to pay
    run = tm.make_sampler(trained, cfg, classifier=guide, classifier_scale=s)
    kw = dict(run=run, batch_size=args.batch_size, classifier=guide, classifier_scale=s)
    tm.generate(trained, cfg, num_samples=args.batch_size, rng=rng,
                labels=tm.default_labels(args.batch_size, 10), **kw)
    t0 = time.perf_counter()
    imgs, labels, nfe = tm.generate(trained, cfg, num_samples=n, rng=rng,
                                    labels=tm.default_labels(n, 10), **kw)
    seconds = time.perf_counter() - t0
    q = evaluate.sample_quality(imgs, extractor, reference)
    acc = float(np.mean(_labels_of(extractor, imgs) == labels))
    rows.append(dict(part='cfg' if conditional else 'classifier', scale=s,
                     sampler=cfg.describe(), nfe=nfe, seconds=seconds, accuracy=acc,
                     fd=q['fid'], precision=q['precision'], recall=q['recall']))
    print(json.dumps(rows[-1]), flush=True)
    grid.append(np.stack([imgs[labels == c][:8] for c in range(10)]))   # [10, 8, ...]
  if args.pictures and grid:
    tiles = np.concatenate([g.reshape((-1, 8, 8, 1)) for g in grid])
    name = 'controllable_cfg.png' if conditional else 'controllable_guided.png'
    images_lib.save_png(os.path.join(args.pictures, name),
                        images_lib.make_grid(tiles, ncol=8), 4)


def _inpainter(item: str):
  name, kind, steps, jl, jn = item.split(':')
  return name, kind, int(steps), int(jl), int(jn)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model', default='/tmp/digits')
  p.add_argument('--classifier', default='/tmp/digits_classifier')
  p.add_argument('--conditional', default='/tmp/digits_cond',
                 help='a label-trained workdir for the classifier-free rows ("" to skip)')
  p.add_argument('--num_inpaint', type=int, default=1000)
  p.add_argument('--inpainters', type=lambda s: [_inpainter(i) for i in s.split(',')],
                 default=[_inpainter(i) for i in (
                     'replacement:ddpm:100:1:1', 'RePaint:ddpm:100:10:5',
                     'replacement (RePaint\'s evaluations):ddpm:460:1:1')])
  p.add_argument('--num_samples', type=int, default=1797)
  p.add_argument('--sampler', default='dpmpp_2m')
  p.add_argument('--steps', type=int, default=20)
  p.add_argument('--scales', default='0,1,2,4,8')
  p.add_argument('--cfg_scales', default='0,1,2,4')
  p.add_argument('--batch_size', type=int, default=504)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--parts', default='inpaint,classifier,cfg')
  p.add_argument('--out', default='docs/controllable.json')
  p.add_argument('--pictures', default='docs')
  args = p.parse_args(argv)
  parts = args.parts.split(',')
  trained = tm.load_ema_params(args.model)
  data_dir = trained.spec.data.data_dir
  extractor, test_accuracy = features.digits_extractor(data_dir)
  reference = features.reference_stats(extractor, trained.spec.data.dataset, data_dir)
  rows = [dict(part='meta', digits_classifier_test_accuracy=test_accuracy,
               load=os.getloadavg()[0], devices=jax.device_count())]
  if 'inpaint' in parts:
    inpainting(args, trained, extractor, rows)
  if 'classifier' in parts:
    classifier = tm.load_classifier(args.classifier, trained.spec, mesh=trained.mesh)
    guidance(args, trained, extractor, reference, rows, classifier=classifier,
             scales=[float(s) for s in args.scales.split(',')])
  if 'cfg' in parts and args.conditional:
    cond = tm.load_ema_params(args.conditional, mesh=trained.mesh)
    guidance(args, cond, extractor, reference, rows,
             scales=[float(s) for s in args.cfg_scales.split(',')], conditional=True)
  rows[0]['load_end'] = os.getloadavg()[0]
  with open(args.out, 'w') as f:
    json.dump(rows, f, indent=1)
  for r in rows[1:]:
    if r['part'] == 'inpaint':
      print(f"| {r['method']} | {r['nfe']} | {r['agreement']:.3f} | {r['rmse']:.3f} | "
            f"{r['seconds']:.0f} |")
    else:
      print(f"| {r['part']} | {r['scale']:g} | {r['nfe']} | {r['accuracy']:.3f} | "
            f"{r['fd']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['seconds']:.0f} |")


if __name__ == '__main__':
  main()
