r"""Evaluation of a trained DDPM: test bits/dim, and FID / Inception Score / precision-recall
of its samples. The library behind the root `evaluate.py`:

  python evaluate.py --workdir /tmp/digits
  python evaluate.py --workdir DIR --num_samples 50000 --features inception \
      --inception_weights inception_fid.npz --sampler ddpm --steps 1000

* bits/dim: `gaussian_diffusion.calc_bpd_loop` (every term of the variational bound) on the
  EMA parameters, data-parallel over the mesh (`shard_map`), averaged over exactly the
  examples of the split (the padding of the last batch is masked out).
* samples are drawn with `trained_model.generate`, featurised by a `features.FeatureExtractor`
  and compared with cached statistics of the real train split: FID (`fid.frechet_distance`),
  Inception Score (of the extractor's logits), precision and recall (k = 3).

Results are merged into WORKDIR/eval.json (entries of an older checkpoint are replaced).
During training, `make_periodic_eval` gives the hook that `train.py` calls every
`config.eval.every_steps` steps.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

from diffusion_jax.runtime import compilation
from diffusion_jax.process import continuous
from diffusion_jax.evaluation import features as features_lib
from diffusion_jax.evaluation import fid
from diffusion_jax.process import gaussian_diffusion as gd
from diffusion_jax.sampling import likelihood as ode_likelihood
from diffusion_jax.sampling import config as sampler_config
from diffusion_jax.sampling import sampler as sampler_lib
from diffusion_jax import trained_model
from diffusion_jax.storage import workdir as workdir_lib
from diffusion_jax.data import datasets
from diffusion_jax.data import input_pipeline
from diffusion_jax.spec import ExperimentSpec

AXIS = sampler_lib.AXIS
DEFAULT_BPD_BATCH = 64        # global; calc_bpd_loop runs 8× that through the U-Net per call
PR_NEIGHBOURS = 3
LIKELIHOODS = ('vlb', 'ode')
SAMPLE_METRICS = ('fid', 'inception_score', 'inception_score_std', 'precision', 'recall')


# ------------------------------------------------------------------------------------------
# Bits/dim.
# ------------------------------------------------------------------------------------------


def make_bpd_fn(model, diffusion: gd.GaussianDiffusion, *,
                parameterization: gd.Parameterization, num_classes: int | None,
                mesh: jax.sharding.Mesh, timesteps_per_call: int = 8):
  """Jitted `run(params, rng, images [B, H, W, C], labels [B]) -> (total_bpd [B], prior [B])`.

  Data-parallel: device i evaluates its share with `fold_in(rng, i)`; B must be a multiple
  of the mesh size. Images are in [-1, 1]; labels are used by class-conditional models.
  """
  def per_device(params, rng, images, labels):
    rng = jax.random.fold_in(rng, jax.lax.axis_index(AXIS))
    denoise = sampler_lib.make_denoise_fn(model, params, labels if num_classes else None)
    out = gd.calc_bpd_loop(diffusion, denoise, images, rng,
                           **parameterization.as_kwargs(), clip_denoised=True,
                           timesteps_per_call=timesteps_per_call)
    return out['total_bpd'], out['prior_bpd']

  return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(AXIS), P(AXIS)),
                               out_specs=(P(AXIS), P(AXIS))))


def _masked_outputs(run, params, rng: jax.Array, batches: Iterable[dict[str, np.ndarray]],
                    mesh: jax.sharding.Mesh, progress: bool, desc: str) -> list[np.ndarray]:
  """`run(params, rng_i, images, labels) -> (out_1 [B], ...)` over eval batches ({'image',
  'label', 'mask'}, this process's share of each global batch, as from
  `input_pipeline.create_eval_iterator`): each output over the real examples only, float64."""
  sharding = NamedSharding(mesh, P(AXIS))
  outputs, masks = [], []
  if progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    batches = tqdm(batches, desc=desc, unit='batch')
  for i, batch in enumerate(batches):
    glob = {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}
    out = run(params, jax.random.fold_in(rng, i), glob['image'], glob['label'])
    outputs.append([trained_model.to_host(o) for o in out])
    masks.append(trained_model.to_host(glob['mask']))
  mask = np.concatenate(masks).astype(bool)
  return [np.concatenate(column).astype(np.float64)[mask] for column in zip(*outputs)]


def mean_bpd(run, params, rng: jax.Array, batches: Iterable[dict[str, np.ndarray]],
             mesh: jax.sharding.Mesh, progress: bool = False) -> dict[str, float]:
  """Masked mean of the variational bound's bits/dim (`make_bpd_fn`) over eval batches."""
  total, prior = _masked_outputs(run, params, rng, batches, mesh, progress, 'bits/dim')
  return dict(bpd=float(total.mean()), bpd_prior=float(prior.mean()),
              bpd_num_examples=int(total.size))


def make_ode_bpd_fn(model, diffusion: gd.GaussianDiffusion, *,
                    parameterization: gd.Parameterization, num_classes: int | None,
                    mesh: jax.sharding.Mesh, rtol: float = 1e-5, num_probes: int = 1,
                    process: continuous.Process | None = None):
  """Jitted `run(params, rng, images [B, H, W, C], labels [B]) -> (bpd [B], nfe [B])`: bits/dim
  through the probability-flow ODE (`ode_likelihood.ode_bits_per_dim`: uniform
  dequantization, Hutchinson's trace with Rademacher probes), data-parallel. `process`: the
  model's (`DiffusionSpec.make_process`); None reads `diffusion` as a VP-SDE."""
  continuous.parse_continuous_mean_type(parameterization.mean_type)
  if process is None:
    process = continuous.VPProcess.from_diffusion(diffusion)

  def per_device(params, rng, images, labels):
    rng = jax.random.fold_in(rng, jax.lax.axis_index(AXIS))
    denoise = sampler_lib.make_denoise_fn(model, params, labels if num_classes else None)
    denoiser = continuous.make_denoiser(process, denoise, parameterization.mean_type)
    bpd, nfe = ode_likelihood.ode_bits_per_dim(process, denoiser, images, rng, rtol=rtol,
                                               atol=rtol, num_probes=num_probes)
    return bpd, jnp.full(bpd.shape, nfe, jnp.float32)

  # check_vma=False: diffrax's loop starts from unsharded constants (see data_parallel_sampler).
  return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(AXIS), P(AXIS)),
                               out_specs=(P(AXIS), P(AXIS)), check_vma=False))


def ode_bpd_on_split(trained: trained_model.TrainedModel, rng: jax.Array, *,
                     info: input_pipeline.ImageDatasetInfo, data_dir=None,
                     num_examples: int | None = None, split: str = 'test',
                     batch_size: int | None = None, progress: bool = False
                     ) -> dict[str, float]:
  """PF-ODE bits/dim of the EMA model on the first `num_examples` of `split`, with its
  standard error (over examples: dequantization and the trace estimator are both noise)."""
  n, batch_size = _bpd_examples_and_batch(trained, info, num_examples, split, batch_size)
  run = make_ode_bpd_fn(trained.model, trained.diffusion,
                        parameterization=trained.parameterization,
                        num_classes=trained.num_classes, mesh=trained.mesh,
                        process=trained.spec.diffusion.make_process())
  batches = _split_batches(info, data_dir, split, n, batch_size)
  bpd, nfe = _masked_outputs(run, trained.ema_params, rng, batches, trained.mesh, progress,
                             'ODE bits/dim')
  return dict(bpd_ode=float(bpd.mean()),
              bpd_ode_stderr=float(bpd.std(ddof=1) / np.sqrt(bpd.size)) if bpd.size > 1 else
              float('nan'),
              bpd_ode_mean_evaluations=float(nfe.mean()), bpd_ode_num_examples=int(bpd.size))


def _bpd_examples_and_batch(trained, info, num_examples, split, batch_size):
  size = info.num_examples.get(split)
  if size is None:
    raise ValueError(f'dataset {info.name!r} has no split {split!r}')
  n = size if num_examples is None else num_examples
  if not 1 <= n <= size:
    raise ValueError(f'--bpd_examples must be in [1, {size}] (the {split} split), got {n}')
  n_dev = trained.mesh.devices.size
  batch_size = batch_size or trained_model.default_batch_size(n, n_dev, DEFAULT_BPD_BATCH)
  if batch_size % n_dev:
    raise ValueError(f'bits/dim batch size {batch_size} must be a multiple of the {n_dev} '
                     'devices')
  return n, batch_size


def _split_batches(info, data_dir, split: str, n: int, batch_size: int):
  """This process's share of the first `n` examples of `split`, in global batches."""
  return input_pipeline.create_eval_iterator(
      info.name, data_dir, global_batch_size=batch_size,
      process_index=jax.process_index(), process_count=jax.process_count(),
      split=split if n == info.num_examples[split] else f'{split}[:{n}]')


def data_info(spec: ExperimentSpec, data_dir=None) -> input_pipeline.ImageDatasetInfo:
  """The facts of the workdir's dataset, read from `data_dir` (default: the spec's); a
  one-line FileNotFoundError saying what needs it when the dataset is not there."""
  data_dir = spec.data.data_dir if data_dir is None else str(data_dir)
  name = spec.data.dataset
  description = datasets.describe(name)
  try:
    if description.prepared_locally:
      description.prepare(data_dir)
    return input_pipeline.dataset_info(name, data_dir)
  except (FileNotFoundError, ValueError) as e:
    raise FileNotFoundError(
        f'bits/dim and the reference statistics need dataset {name!r}, which is not in '
        f'{data_dir or "the default TFDS data_dir"} ({" ".join(str(e).split())}); pass '
        '--data_dir, or --bpd_examples=0 with --reference_stats for sample metrics alone'
    ) from None


def bpd_on_split(trained: trained_model.TrainedModel, rng: jax.Array, *,
                 info: input_pipeline.ImageDatasetInfo, data_dir=None,
                 num_examples: int | None = None, split: str = 'test',
                 batch_size: int | None = None, progress: bool = False) -> dict[str, float]:
  """Bits/dim of the EMA model on the first `num_examples` (default: all) of `split`.

  A class-conditional model is scored given each example's label: −log₂ p(x | y) / dims.
  """
  n, batch_size = _bpd_examples_and_batch(trained, info, num_examples, split, batch_size)
  run = make_bpd_fn(trained.model, trained.diffusion,
                    parameterization=trained.parameterization,
                    num_classes=trained.num_classes, mesh=trained.mesh)
  batches = _split_batches(info, data_dir, split, n, batch_size)
  out = mean_bpd(run, trained.ema_params, rng, batches, trained.mesh, progress)
  out['bpd_split'] = split
  return out


# ------------------------------------------------------------------------------------------
# Sample quality.
# ------------------------------------------------------------------------------------------


def default_num_splits(n: int) -> int:
  """Inception Score splits: the customary 10 for N ≥ 1000, else 1 (too few per split)."""
  return 10 if n >= 1000 else 1


def sample_quality(images: np.ndarray, extractor: features_lib.FeatureExtractor,
                   reference: features_lib.ReferenceStats) -> dict[str, float]:
  """FID, Inception Score (mean, std) and precision/recall of uint8 `images [N, H, W, C]`.

  IS is left out when the extractor has no logits, precision/recall when the reference has
  no features (`features_lib.protocol` records why).
  """
  n = images.shape[0]
  if n < PR_NEIGHBOURS + 1:
    raise ValueError(f'need at least {PR_NEIGHBOURS + 1} samples for FID and '
                     f'precision/recall, got {n}')
  feats, logits = extractor.features_and_logits(images)
  mu, sigma = fid.gaussian_stats(feats)
  out = dict(fid=fid.frechet_distance(mu, sigma, reference.mu, reference.sigma))
  if logits is not None:
    out['inception_score'], out['inception_score_std'] = fid.inception_score(
        logits, default_num_splits(n))
  if reference.features is not None:
    out['precision'], out['recall'] = fid.precision_recall(reference.features, feats,
                                                           k=PR_NEIGHBOURS)
  return out


def default_features(dataset: str) -> datasets.FeatureKind:
  return datasets.describe(dataset).features


# ------------------------------------------------------------------------------------------
# The CLI's library call.
# ------------------------------------------------------------------------------------------


def _write_json(path: epath.Path, results: dict[str, Any]) -> dict[str, Any]:
  """Merges `results` into the JSON at `path`; entries of another checkpoint are dropped."""
  merged: dict[str, Any] = {}
  if path.exists():
    try:
      merged = workdir_lib.read_json(path)
    except (OSError, json.JSONDecodeError):
      merged = {}
    if merged.get('step') != results.get('step'):
      merged = {}
  merged.update(results)
  workdir_lib.write_json(path, merged)
  return merged


def evaluate(workdir, *, num_samples: int = 1000, bpd_examples: int | None = None,
             features: str | None = None, inception_weights: str | None = None,
             reference_stats: str | None = None,
             sampler: sampler_config.SamplerConfig | None = None,
             batch_size: int | None = None, seed: int = 0, data_dir=None,
             likelihood: str = 'vlb', progress: bool = True) -> dict[str, Any]:
  """Evaluates the latest checkpoint of `workdir`; merges the results into WORKDIR/eval.json.

  num_samples: samples for FID / IS / precision-recall (0: skip).
  bpd_examples: test examples for bits/dim (None: the whole split; 0: skip).
  features: 'digits' | 'inception' (default: the dataset's, `datasets.describe`; inception
    needs `inception_weights`).
  reference_stats: an .npz with `mu`, `sigma` (e.g. TTUR's CIFAR-10 train statistics) to
    compare against instead of statistics computed from the dataset's train split.
  sampler: how the samples are drawn (None: the workdir's recommended sampler, the eval
    sampler of its spec).
  likelihood: 'vlb' (the variational bound's bits/dim) or 'ode' (also the probability-flow
    ODE's, beside it: `bpd_ode`, its standard error and evaluations per example).
  data_dir: where the dataset is (default: the spec's); needed for bits/dim and for
    computing the reference statistics.
  Returns the merged results. Arguments are checked before any heavy work.
  """
  if not isinstance(num_samples, int) or num_samples < 0:
    raise ValueError(f'--num_samples must be >= 0, got {num_samples!r}')
  if num_samples and num_samples < PR_NEIGHBOURS + 1:
    raise ValueError(f'--num_samples must be 0 or at least {PR_NEIGHBOURS + 1}, got '
                     f'{num_samples}')
  if bpd_examples is not None and bpd_examples < 0:
    raise ValueError(f'--bpd_examples must be >= 0, got {bpd_examples}')
  if likelihood not in LIKELIHOODS:
    raise ValueError(f'unknown likelihood {likelihood!r}; allowed: {", ".join(LIKELIHOODS)}')
  wd = trained_model.read_workdir(workdir)
  sampler = wd.spec.eval.sampler if sampler is None else sampler
  wd.spec.check_sampler(sampler)
  if likelihood == 'vlb' and wd.spec.diffusion.process is not continuous.ProcessKind.VP:
    process = wd.spec.diffusion.process.value
    if bpd_examples:
      raise ValueError(f"--likelihood vlb (DDPM's discrete bound) needs the 'vp' process, not "
                       f'{process!r}: use --likelihood ode')
    print(f"No bits/dim: DDPM's discrete bound needs the 'vp' process, not {process!r} "
          '(--likelihood ode gives the PF-ODE\'s).', file=sys.stderr, flush=True)
    bpd_examples = 0
  if likelihood == 'ode':
    continuous.parse_continuous_mean_type(wd.spec.parameterization.mean_type)
  spec = wd.spec
  data_dir = spec.data.data_dir if data_dir is None else str(data_dir)
  info = data_info(spec, data_dir) if (num_samples or bpd_examples != 0) else None
  test_size = info.num_examples.get('test', 0) if info else 0
  if bpd_examples and bpd_examples > test_size:
    raise ValueError(f'--bpd_examples must be at most {test_size} (the test split), got '
                     f'{bpd_examples}')
  extractor = reference = None
  compiled: dict[str, Any] = {}   # what each program cost to compile, and the cache

  def record(report: compilation.CompileReport) -> None:
    compiled[f'compile_seconds_{report.name}'] = report.total_seconds
    compiled[f'compile_cache_{report.name}'] = report.cache

  t0 = time.time()
  if num_samples:
    kind = (default_features(spec.data.dataset) if features is None
            else datasets.FeatureKind.parse(features))
    with compilation.track('features') as report:
      extractor = features_lib.make_extractor(kind, dataset=spec.data.dataset,
                                              data_dir=data_dir,
                                              inception_weights=inception_weights)
      if reference_stats is not None:
        reference = features_lib.load_reference_stats(reference_stats,
                                                       extractor.num_features)
      else:
        reference = features_lib.reference_stats(extractor, spec.data.dataset, data_dir,
                                                 'train')
    record(report)
  t_ref = time.time() - t0

  trained = trained_model.load_ema_params(wd)
  rng = jax.random.PRNGKey(seed)
  bpd_rng, sample_rng = jax.random.split(rng)
  results: dict[str, Any] = dict(step=trained.step)
  if bpd_examples != 0 and test_size:
    if spec.diffusion.process is continuous.ProcessKind.VP:  # DDPM's bound: 'vp' only
      t = time.time()
      with compilation.track('bpd') as report:
        results.update(bpd_on_split(trained, bpd_rng, info=info, data_dir=data_dir,
                                    num_examples=bpd_examples, progress=progress))
      record(report)
      results['bpd_seconds'] = time.time() - t
    if likelihood == 'ode':
      t = time.time()
      with compilation.track('bpd_ode') as report:
        results.update(ode_bpd_on_split(trained, jax.random.fold_in(bpd_rng, 1), info=info,
                                        data_dir=data_dir, num_examples=bpd_examples,
                                        progress=progress))
      record(report)
      results['bpd_ode_seconds'] = time.time() - t
  if num_samples:
    t = time.time()
    with compilation.track('sampler') as report:
      images, _, nfe = trained_model.generate(trained, sampler, num_samples=num_samples,
                                              rng=sample_rng, batch_size=batch_size,
                                              progress=progress)
    record(report)
    t_sample = time.time() - t
    quality = sample_quality(images, extractor, reference)
    # Skipped metrics are written as null, so that no stale value of an earlier run with
    # other weights or statistics survives the merge into eval.json.
    results.update({k: None for k in SAMPLE_METRICS}, **quality)
    results.update(features_lib.protocol(extractor, reference, num_samples))
    results.update(
        fid_sampler=sampler.to_dict(), fid_model_evaluations=nfe, sample_seconds=t_sample,
        reference_seconds=t_ref)
  results.update(compiled)
  if jax.process_index() == 0:
    return _write_json(trained.workdir / 'eval.json', results)
  return results


# ------------------------------------------------------------------------------------------
# During training.
# ------------------------------------------------------------------------------------------


def make_periodic_eval(spec: ExperimentSpec, *, model, diffusion, mesh: jax.sharding.Mesh
                       ) -> Callable[[Any, int], dict[str, float]]:
  """The evaluation `train.py` runs every `spec.eval.every_steps` steps.

  Returns `fn(ema_params, step) -> {'eval/bpd': ..., 'eval/fid': ..., ...}`: bits/dim on
  the first `spec.eval.bpd_examples` test examples, and FID / IS / precision / recall of
  `spec.eval.num_samples` samples drawn with `spec.eval.sampler`, on the dataset's default
  features (`datasets.describe`); Inception features only when `spec.eval.inception_weights`
  is set (otherwise no sample metrics). The feature network and reference statistics are
  prepared here, once.
  """
  ev = spec.eval
  data_dir = spec.data.data_dir
  info = data_info(spec, data_dir)
  base = trained_model.TrainedModel(workdir=None, step=0, spec=spec, model=model,
                                    diffusion=diffusion, ema_params=None, mesh=mesh)
  n_dev = mesh.devices.size
  rng = jax.random.fold_in(jax.random.PRNGKey(spec.seed), 0x6576616C)  # 'eval'

  extractor = reference = sample_run = None
  num_samples = -(-int(ev.num_samples) // n_dev) * n_dev if ev.num_samples else 0
  kind = default_features(info.name)
  if num_samples and (kind is datasets.FeatureKind.DIGITS or ev.inception_weights):
    extractor = features_lib.make_extractor(kind, dataset=info.name, data_dir=data_dir,
                                            inception_weights=ev.inception_weights)
    reference = features_lib.reference_stats(extractor, info.name, data_dir, 'train')
    sample_run = trained_model.make_sampler(base, ev.sampler)

  test_size = info.num_examples.get('test', 0)
  bpd_n = min(int(ev.bpd_examples), test_size)
  if spec.diffusion.process is not continuous.ProcessKind.VP:
    bpd_n = 0   # DDPM's discrete bound: the 'vp' process only
  bpd_batch = trained_model.default_batch_size(bpd_n, n_dev, DEFAULT_BPD_BATCH) if bpd_n else 0
  bpd_run = (make_bpd_fn(model, diffusion, parameterization=spec.parameterization,
                         num_classes=spec.num_classes, mesh=mesh)
             if bpd_n else None)

  def periodic_eval(ema_params, step: int) -> dict[str, float]:
    key = jax.random.fold_in(rng, step)
    out: dict[str, float] = {}
    if bpd_run is not None:
      batches = input_pipeline.create_eval_iterator(
          info.name, data_dir, global_batch_size=bpd_batch,
          process_index=jax.process_index(), process_count=jax.process_count(),
          split=f'test[:{bpd_n}]', prefetch_batches=0)
      out['eval/bpd'] = mean_bpd(bpd_run, ema_params, jax.random.fold_in(key, 0), batches,
                                 mesh)['bpd']
    if sample_run is not None:
      trained = dataclasses.replace(base, ema_params=ema_params, step=step)
      images, _, _ = trained_model.generate(trained, ev.sampler, num_samples=num_samples,
                                            rng=jax.random.fold_in(key, 1), run=sample_run)
      out.update({f'eval/{k}': v for k, v in
                  sample_quality(images, extractor, reference).items()})
    return out

  return periodic_eval
