"""NCSN's continuous limit on the embedded digits: a variance-exploding (VE) score model
trained by denoising score matching, offline on a CPU (docs/score_based.md).

  python train.py --config configs/digits_ncsn.py --workdir /tmp/digits_ncsn
  python sample.py --workdir /tmp/digits_ncsn              # pc, its recommended sampler
  python sample.py --workdir /tmp/digits_ncsn --sampler ald --steps 9 --langevin_steps 100

The digits recipe (configs/digits.py) with the process and objective swapped: σ(t) from σ_min
to σ_max geometrically, the weighting λ(σ) = σ², the U-Net conditioned on log σ through random
Fourier features (NCSN++'s), its input scaled by 1/√(1 + σ²). Same network size, batch, steps
and optimizer, so it trains in about the default's time.
"""

from configs import digits


def get_config():
  config = digits.get_config()
  d = config.diffusion
  d.process = 've'
  d.objective = 'dsm'
  d.mean_type = 'eps'   # the network predicts z; its score is −ε̂/σ
  d.sigma_min = 0.01
  # The largest distance between two digits in [-1, 1]^64 is 9.6 (Song & Ermon
  # 2020, technique 1: σ_max comparable to the data's diameter); the prior is N(0, σ_max² I).
  d.sigma_max = 10.0
  config.model.time_embedding = 'fourier'   # of log σ, frequencies N(0, 16²)
  # The grid and the recommended sampler: see docs/score_based.md for the measured table.
  config.training.sampler = 'pc'
  config.training.sample_steps = 100
  config.eval.sampler = 'pc'
  config.eval.sample_steps = 100
  return config
