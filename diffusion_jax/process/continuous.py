"""The continuous-time (VP-SDE) view of a discrete `GaussianDiffusion`.

A discrete process with T steps and ᾱ_n (n = 0..T−1) is read as a VP-SDE on t ∈ [1/T, 1]
by DPM-Solver's interpolation for discrete-time models (Lu et al. 2022, app. D):

  * node n sits at t_n = (n + 1)/T, with log α(t_n) = ½ log ᾱ_n;
  * log α(t) is piecewise linear in t between the nodes (so α has a kink at every node);
  * σ(t) = √(1 − α(t)²), λ(t) = log α(t) − log σ(t) (half the log-SNR), decreasing in t;
  * the model is called at its timestep T·t − 1, which maps t_n to n (between nodes it is
    fractional: the U-Net's sinusoidal embedding takes real timesteps).

The forward SDE dx = f(t) x dt + g(t) dw has f = d log α/dt and g² = dσ²/dt − 2 f σ², which
for α² + σ² = 1 is g² = −2f (the β(t) of Song et al. 2021); both are piecewise constant here.
Given a score s(x, t) = ∇ log p_t(x) = −ε/σ:
  reverse SDE   dx = [f x − g² s] dt + g dw̄     (t running from 1 down)
  PF-ODE        dx/dt = f x − ½ g² s.

`make_denoiser` wraps a model's `denoise_fn(x_t, timestep) -> output` (ε, x₀ or v) once into
`denoiser(x, t) -> (x0_hat, eps_hat)` at continuous times, which every solver in
`diffusion_jax.sampling.solvers` uses. Classifier-free guidance lives inside `denoise_fn` (the guided
mean output is a fixed linear combination, so it converts like any other output).

Pure and jit/vmap-safe; no IO. Times `t` are float `[B]` (or scalars) in [1/T, 1]; values
outside are clamped to that interval.

Beside it, two processes of continuous time t ∈ [t_min, 1] with the same interface
(Song et al. 2021, §3.4 and app. B):

  * `VEProcess` (NCSN's limit): α = 1, σ(t) = σ_min (σ_max/σ_min)^t, f = 0, g² = dσ²/dt;
    prior N(0, σ_max² I). λ = −log σ.
  * `SubVPProcess`: α(t) = exp(−½ B(t)), B(t) = ∫₀ᵗ β = β_min t + ½(β_max − β_min) t², and
    σ(t) = 1 − α², f = −½β, g² = β(1 − e^{−2B}); prior N(0, I).

For all three, g² = dσ²/dt − 2fσ² (the marginals α x₀ + σ ε are the SDE's), so one PF-ODE and
one reverse SDE serve them; what differs is how α and σ follow from λ (`log_alpha_of_lambda`,
`log_sigma_of_lambda`) and the network's noise coordinate (`model_timestep`).
"""

from __future__ import annotations

from typing import Callable

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.process.gaussian_diffusion import Array, DenoiseFn, GaussianDiffusion, MeanType
from diffusion_jax.options import Option

# ᾱ below this is clamped (a zero-terminal-SNR schedule has ᾱ_{T-1} = 0, where λ = −∞).
MIN_ALPHA_BAR = 1e-10

# (x, t [B]) -> (x0_hat, eps_hat), each like x.
Denoiser = Callable[[Array, Array], tuple[Array, Array]]

# What the continuous-time objectives (dsm, ssm) train; `make_denoiser` also takes xprev (VP).
CONTINUOUS_MEAN_TYPES = (MeanType.EPS, MeanType.XSTART, MeanType.V, MeanType.SCORE)


class ProcessKind(Option):
  VP = 'vp'        # variance preserving: DDPM's process
  VE = 've'        # variance exploding: NCSN's
  SUBVP = 'subvp'  # sub-VP (Song et al. 2021)
  EDM = 'edm'      # Karras et al. 2022: σ-space (α = 1) with their preconditioning
  FLOW = 'flow'    # the linear interpolant α = 1 − t, σ = t (flow matching, rectified flow)

  @classmethod
  def _what(cls):
    return 'diffusion.process'


def _sum_flat(v: Array) -> Array:
  return jnp.sum(v, axis=tuple(range(1, v.ndim)))


class _Marginals:
  """What every process derives from its log α(t) and log σ(t) (mixed into each)."""

  def alpha(self, t: Array) -> Array:
    return jnp.exp(self.log_alpha_t(t))

  def sigma(self, t: Array) -> Array:
    return jnp.exp(self.log_sigma_t(t))

  def lam(self, t: Array) -> Array:
    """λ(t) = log α − log σ (half the log-SNR), decreasing in t."""
    return self.log_alpha_t(t) - self.log_sigma_t(t)

  def lambda_min(self) -> Array:
    return self.lam(jnp.asarray(self.t_max))

  def lambda_max(self) -> Array:
    return self.lam(jnp.asarray(self.t_min))

  def q_sample(self, x0: Array, t: Array, noise: Array) -> Array:
    """x_t = α(t) x₀ + σ(t) ε: a draw of q(x_t | x₀) given ε ~ N(0, I); t `[B]`."""
    return _bcast(self.alpha(t), x0) * x0 + _bcast(self.sigma(t), x0) * noise

  def prior_std(self) -> float:
    return 1.0

  def prior_sample(self, rng: Array, shape, dtype=jnp.float32) -> Array:
    """x at t = 1 from the prior N(0, prior_std² I)."""
    return self.prior_std() * jax.random.normal(rng, shape, dtype)

  def prior_logp(self, x: Array) -> Array:
    """log N(x; 0, prior_std² I) summed over all axes but the first: `[B, ...] -> [B]`."""
    s = self.prior_std()
    dim = np.prod(x.shape[1:])
    return (-0.5 * _sum_flat(jnp.square(x)) / s ** 2
            - dim * (np.log(s) + 0.5 * np.log(2.0 * np.pi)))

  def input_scale(self, t: Array) -> Array:
    """The factor on x before the network (1 but for VE, see `VEProcess.input_scale`)."""
    return jnp.ones_like(jnp.asarray(t, jnp.float32))


@flax.struct.dataclass
class VPProcess(_Marginals):
  """log α at the T nodes t_n = (n+1)/T of a discrete process; a pytree.

  Build with `VPProcess.from_diffusion(d)`. The arrays take JAX's default float dtype
  (float64 under `jax.enable_x64`), computed from the betas in float64.
  """
  t_nodes: Array      # [T] (n + 1)/T, increasing
  log_alpha: Array    # [T] ½ log ᾱ_n, decreasing

  @property
  def num_timesteps(self) -> int:
    return self.t_nodes.shape[0]

  kind = ProcessKind.VP

  @property
  def t_min(self) -> float:
    return 1.0 / self.num_timesteps

  @property
  def t_max(self) -> float:
    return 1.0

  @property
  def time_scale(self) -> float:
    """What the U-Net divides `model_timestep` by for its Fourier embedding."""
    return float(self.num_timesteps)

  @classmethod
  def from_diffusion(cls, d: GaussianDiffusion) -> 'VPProcess':
    """The continuous view of the full process `d` (host-side: `d` must be concrete)."""
    t = d.num_timesteps
    if t < 2:
      raise ValueError(f'the continuous-time view needs at least 2 timesteps, got {t}')
    tmap = np.asarray(d.timestep_map)
    if not np.array_equal(tmap, np.arange(t)):
      raise ValueError('continuous-time solvers take the full process, not a respaced one '
                       f'(timestep_map is not arange({t})); pass the un-respaced diffusion')
    betas = np.asarray(d.betas, np.float64)
    with np.errstate(divide='ignore'):  # β = 1 (zero terminal SNR): log 0, clamped below
      log_ab = np.cumsum(np.log1p(-np.minimum(betas, 1.0)))
    log_ab = np.maximum(log_ab, np.log(MIN_ALPHA_BAR))
    nodes = np.arange(1, t + 1, dtype=np.float64) / t
    with jax.ensure_compile_time_eval():  # concrete even when built inside a jit
      return cls(t_nodes=jnp.asarray(nodes), log_alpha=jnp.asarray(0.5 * log_ab))

  # ----- the marginal coefficients -----------------------------------------------------

  def _clamp(self, t: Array) -> Array:
    return jnp.clip(t, self.t_nodes[0], self.t_nodes[-1])

  def log_alpha_t(self, t: Array) -> Array:
    """log α(t), piecewise linear in t."""
    return jnp.interp(self._clamp(t), self.t_nodes, self.log_alpha)

  def log_sigma_t(self, t: Array) -> Array:
    return log_sigma_from_log_alpha(self.log_alpha_t(t))

  def t_of_lambda(self, lam: Array) -> Array:
    """The inverse of `lam` on [1/T, 1] (exact for the piecewise-linear log α)."""
    la = log_alpha_from_lambda(lam)
    # log α decreases along the nodes; interp needs increasing abscissae.
    return jnp.interp(la, self.log_alpha[::-1], self.t_nodes[::-1])

  def log_alpha_of_lambda(self, lam: Array) -> Array:
    return log_alpha_from_lambda(lam)

  def log_sigma_of_lambda(self, lam: Array) -> Array:
    return log_sigma_from_lambda(lam)

  def dlog_sigma_dlambda(self, lam: Array) -> Array:
    """d log σ/dλ = −α² (from σ² = sigmoid(−2λ))."""
    return -jnp.exp(2.0 * log_alpha_from_lambda(lam))

  # ----- the SDE coefficients ----------------------------------------------------------

  def _segment(self, t: Array) -> Array:
    idx = jnp.searchsorted(self.t_nodes, self._clamp(t), side='right') - 1
    return jnp.clip(idx, 0, self.num_timesteps - 2)

  def f(self, t: Array) -> Array:
    """f(t) = d log α/dt, constant on each [t_n, t_{n+1}) (the right segment at a node)."""
    i = self._segment(t)
    return ((self.log_alpha[i + 1] - self.log_alpha[i])
            / (self.t_nodes[i + 1] - self.t_nodes[i]))

  def g2(self, t: Array) -> Array:
    """g²(t) = dσ²/dt − 2 f σ² = −2 f(t) (since α² + σ² = 1); β(t) of Song et al."""
    return -2.0 * self.f(t)

  def model_timestep(self, t: Array) -> Array:
    """The model's (real-valued) timestep T·t − 1: t_n ↦ n.

    At a node (t equal to `t_nodes[n]`, as the discrete chains place their steps) it is the
    integer n itself, not T·t_n − 1 rounded in float32: the model sees DDPM's own levels."""
    t = self._clamp(t)
    n = jnp.clip(jnp.searchsorted(self.t_nodes, t), 0, self.num_timesteps - 1)
    continuous_t = self.num_timesteps * t - 1.0
    return jnp.where(self.t_nodes[n] == t, n.astype(continuous_t.dtype), continuous_t)


def log_sigma_from_log_alpha(log_alpha: Array) -> Array:
  """log √(1 − α²) = ½ log(−expm1(2 log α)): accurate for α near 1 and near 0."""
  return 0.5 * jnp.log(-jnp.expm1(2.0 * log_alpha))


def log_alpha_from_lambda(lam: Array) -> Array:
  """α² = sigmoid(2λ), so log α = −½ softplus(−2λ)."""
  return -0.5 * jax.nn.softplus(-2.0 * lam)


def log_sigma_from_lambda(lam: Array) -> Array:
  """σ² = sigmoid(−2λ), so log σ = −½ softplus(2λ)."""
  return -0.5 * jax.nn.softplus(2.0 * lam)


def _check_range(lo, hi, lo_name, hi_name):
  if not (np.isfinite(lo) and np.isfinite(hi) and 0 < lo < hi):
    raise ValueError(f'{lo_name} must be > 0 and below {hi_name}, got {lo_name}={lo!r}, '
                     f'{hi_name}={hi!r}')


@flax.struct.dataclass
class VEProcess(_Marginals):
  """The variance-exploding process on t ∈ [0, 1]: x_t = x₀ + σ(t) ε with the geometric
  σ(t) = σ_min (σ_max/σ_min)^t (NCSN's levels in the limit; Song et al. 2021 eq. 30).

  As in Song et al., x₀ ~ p_data and the marginal at t has variance σ(t)² about it, so the
  model's density at t = 0 is that of the data smoothed by N(0, σ_min²).
  """
  sigma_min: float = flax.struct.field(pytree_node=False, default=0.01)
  sigma_max: float = flax.struct.field(pytree_node=False, default=50.0)

  kind = ProcessKind.VE
  num_timesteps = None  # continuous: any number of solver steps
  t_min = 0.0
  t_max = 1.0
  time_scale = 1.0      # the network's coordinate is log σ itself

  def __post_init__(self):
    _check_range(self.sigma_min, self.sigma_max, 'sigma_min', 'sigma_max')

  @property
  def _log_ratio(self) -> float:
    return float(np.log(self.sigma_max / self.sigma_min))

  def _clamp(self, t: Array) -> Array:
    return jnp.clip(t, self.t_min, self.t_max)

  def log_alpha_t(self, t: Array) -> Array:
    return jnp.zeros_like(jnp.asarray(t, jnp.result_type(float)))

  def log_sigma_t(self, t: Array) -> Array:
    return np.log(self.sigma_min) + self._clamp(t) * self._log_ratio

  def t_of_lambda(self, lam: Array) -> Array:
    return jnp.clip((-lam - np.log(self.sigma_min)) / self._log_ratio, self.t_min, self.t_max)

  def log_alpha_of_lambda(self, lam: Array) -> Array:
    return jnp.zeros_like(lam)

  def log_sigma_of_lambda(self, lam: Array) -> Array:
    return -lam

  def dlog_sigma_dlambda(self, lam: Array) -> Array:
    return -jnp.ones_like(lam)

  def f(self, t: Array) -> Array:
    return jnp.zeros_like(jnp.asarray(t, jnp.result_type(float)))

  def g2(self, t: Array) -> Array:
    """dσ²/dt = 2 σ² log(σ_max/σ_min)."""
    return 2.0 * self._log_ratio * jnp.square(self.sigma(t))

  def model_timestep(self, t: Array) -> Array:
    """The network's noise coordinate: log σ(t) (NCSN++'s Fourier features take it)."""
    return self.log_sigma_t(t)

  def prior_std(self) -> float:
    return float(self.sigma_max)

  def input_scale(self, t: Array) -> Array:
    """1/√(1 + σ²): the network sees x at unit scale at every level (Karras et al.'s c_in
    with unit data scale). Applied where `make_denoiser` calls the network, so training and
    sampling share it; the parameterisations act on the unscaled x."""
    return jax.lax.rsqrt(1.0 + jnp.square(self.sigma(t)))


@flax.struct.dataclass
class SubVPProcess(_Marginals):
  """The sub-VP process on t ∈ [t_min, 1] (Song et al. 2021 eq. 11): β(t) linear from β_min
  to β_max, α = exp(−½B), σ = 1 − α² (< √(1 − α²), hence 'sub'), B(t) = ∫₀ᵗ β."""
  beta_min: float = flax.struct.field(pytree_node=False, default=0.1)
  beta_max: float = flax.struct.field(pytree_node=False, default=20.0)
  t_min: float = flax.struct.field(pytree_node=False, default=1e-3)

  kind = ProcessKind.SUBVP
  num_timesteps = None
  t_max = 1.0
  time_scale = 1000.0   # the coordinate is 999·t, as in Song et al.'s continuous VP models

  def __post_init__(self):
    _check_range(self.beta_min, self.beta_max, 'beta_min', 'beta_max')
    if not 0 < self.t_min < 1:
      raise ValueError(f'subvp t_min must be in (0, 1), got {self.t_min!r}')

  def _clamp(self, t: Array) -> Array:
    return jnp.clip(t, self.t_min, self.t_max)

  def _big_b(self, t: Array) -> Array:
    t = self._clamp(t)
    return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * jnp.square(t)

  def beta(self, t: Array) -> Array:
    return self.beta_min + self._clamp(t) * (self.beta_max - self.beta_min)

  def log_alpha_t(self, t: Array) -> Array:
    return -0.5 * self._big_b(t)

  def log_sigma_t(self, t: Array) -> Array:
    return jnp.log(-jnp.expm1(-self._big_b(t)))

  def log_alpha_of_lambda(self, lam: Array) -> Array:
    """α/(1 − α²) = e^λ, so α = 2e^λ/(1 + √(1 + 4e^{2λ})) = 2/(u + √(u² + 4)), u = e^{−λ}.

    For λ ≥ 0 (α near 1) as −log1p((u + u²/(√(u² + 4) + 2))/2), free of cancellation."""
    u = jnp.exp(-jnp.maximum(lam, 0.0))
    near_one = -jnp.log1p(0.5 * (u + jnp.square(u) / (jnp.sqrt(jnp.square(u) + 4.0) + 2.0)))
    neg = jnp.minimum(lam, 0.0)
    half_log = 0.5 * jnp.logaddexp(0.0, np.log(4.0) + 2.0 * neg)  # log √(1 + 4e^{2λ})
    small = np.log(2.0) + neg - jnp.logaddexp(0.0, half_log)
    return jnp.where(lam >= 0.0, near_one, small)

  def log_sigma_of_lambda(self, lam: Array) -> Array:
    return self.log_alpha_of_lambda(lam) - lam

  def dlog_sigma_dlambda(self, lam: Array) -> Array:
    """−2α²/(1 + α²)."""
    a2 = jnp.exp(2.0 * self.log_alpha_of_lambda(lam))
    return -2.0 * a2 / (1.0 + a2)

  def t_of_lambda(self, lam: Array) -> Array:
    b = -2.0 * self.log_alpha_of_lambda(lam)
    d = self.beta_max - self.beta_min
    t = 2.0 * b / (self.beta_min + jnp.sqrt(self.beta_min ** 2 + 2.0 * d * b))
    return self._clamp(t)

  def f(self, t: Array) -> Array:
    return -0.5 * self.beta(t)

  def g2(self, t: Array) -> Array:
    return self.beta(t) * -jnp.expm1(-2.0 * self._big_b(t))

  def model_timestep(self, t: Array) -> Array:
    return 999.0 * self._clamp(t)


@flax.struct.dataclass
class EDMProcess(VEProcess):
  """Karras et al. 2022's process: x = y + σ n (α = 1) for σ in [σ_min, σ_max], the levels
  geometric in t as for VE, with EDM's preconditioning of the network F:

    D(x; σ) = c_skip x + c_out F(c_in x; c_noise),   c_skip = σ_d²/(σ² + σ_d²),
    c_out = σ σ_d/√(σ² + σ_d²),   c_in = 1/√(σ² + σ_d²),   c_noise = ¼ ln σ.

  c_in and c_noise are this process's `input_scale` and `model_timestep`; c_skip and c_out are
  the conversion of mean_type 'edm' in `make_denoiser` (`edm_skip_out`). Prior N(0, σ_max² I).
  """
  sigma_min: float = flax.struct.field(pytree_node=False, default=0.002)
  sigma_max: float = flax.struct.field(pytree_node=False, default=80.0)
  sigma_data: float = flax.struct.field(pytree_node=False, default=0.5)

  kind = ProcessKind.EDM

  def __post_init__(self):
    super().__post_init__()
    if not (np.isfinite(self.sigma_data) and self.sigma_data > 0):
      raise ValueError(f'sigma_data must be a finite number > 0, got {self.sigma_data!r}')

  def model_timestep(self, t: Array) -> Array:
    """c_noise = ¼ ln σ."""
    return 0.25 * self.log_sigma_t(t)

  def input_scale(self, t: Array) -> Array:
    """c_in = 1/√(σ² + σ_d²)."""
    return jax.lax.rsqrt(jnp.square(self.sigma(t)) + self.sigma_data ** 2)


def edm_skip_out(sigma: Array, sigma_data: float) -> tuple[Array, Array]:
  """(c_skip, c_out) of EDM's preconditioning at σ (Karras et al. 2022, Table 1)."""
  s2, d2 = jnp.square(sigma), sigma_data ** 2
  return d2 / (s2 + d2), sigma * sigma_data * jax.lax.rsqrt(s2 + d2)


@flax.struct.dataclass
class FlowProcess(_Marginals):
  """The linear interpolant x_t = (1 − t) x₀ + t ε on t ∈ [t_min, t_max] (flow matching with
  the optimal-transport path, Lipman et al. 2023; rectified flow, Liu et al. 2023).

  α = 1 − t, σ = t, so λ = log((1 − t)/t) and t = sigmoid(−λ); α(λ) = sigmoid(λ),
  σ(λ) = sigmoid(−λ). The SDE: f = d log α/dt = −1/(1 − t), g² = dσ²/dt − 2fσ² = 2t/(1 − t).
  Its velocity dx_t/dt = ε − x₀ is what mean_type 'flow' predicts (x̂₀ = x − σu, ε̂ = x + αu).
  t_max stays below 1, where λ = −∞ (the log-SNR solvers need it finite); the prior N(0, I)
  stands for the marginal N(α x₀, σ²) there, α = 1 − t_max. The network's coordinate is 1000·t
  (Stable Diffusion 3's).
  """
  t_min: float = flax.struct.field(pytree_node=False, default=1e-3)
  t_max: float = flax.struct.field(pytree_node=False, default=1.0 - 1e-3)

  kind = ProcessKind.FLOW
  num_timesteps = None
  time_scale = 1000.0

  def __post_init__(self):
    if not (np.isfinite(self.t_min) and np.isfinite(self.t_max)
            and 0 < self.t_min < self.t_max < 1):
      raise ValueError(f'the flow process needs 0 < t_min < t_max < 1, got t_min={self.t_min!r}, '
                       f't_max={self.t_max!r}')

  def _clamp(self, t: Array) -> Array:
    return jnp.clip(t, self.t_min, self.t_max)

  def log_alpha_t(self, t: Array) -> Array:
    return jnp.log1p(-self._clamp(t))

  def log_sigma_t(self, t: Array) -> Array:
    return jnp.log(self._clamp(t))

  def t_of_lambda(self, lam: Array) -> Array:
    return self._clamp(jax.nn.sigmoid(-lam))

  def log_alpha_of_lambda(self, lam: Array) -> Array:
    return -jax.nn.softplus(-lam)

  def log_sigma_of_lambda(self, lam: Array) -> Array:
    return -jax.nn.softplus(lam)

  def dlog_sigma_dlambda(self, lam: Array) -> Array:
    """−α = −sigmoid(λ)."""
    return -jax.nn.sigmoid(lam)

  def f(self, t: Array) -> Array:
    return -1.0 / (1.0 - self._clamp(t))

  def g2(self, t: Array) -> Array:
    t = self._clamp(t)
    return 2.0 * t / (1.0 - t)

  def model_timestep(self, t: Array) -> Array:
    return 1000.0 * self._clamp(t)


Process = VPProcess | VEProcess | SubVPProcess | EDMProcess | FlowProcess


def make_process(kind, **params) -> Process:
  """A continuous-time process of kind 've', 'subvp', 'edm' or 'flow' from its parameters (VP
  comes from a discrete `GaussianDiffusion`: `VPProcess.from_diffusion`)."""
  kind = ProcessKind.parse(kind)
  if kind is ProcessKind.VE:
    return VEProcess(**params)
  if kind is ProcessKind.SUBVP:
    return SubVPProcess(**params)
  if kind is ProcessKind.EDM:
    return EDMProcess(**params)
  if kind is ProcessKind.FLOW:
    return FlowProcess(**params)
  raise ValueError("the 'vp' process is built from its discrete diffusion: "
                   'VPProcess.from_diffusion(diffusion)')


# ------------------------------------------------------------------------------------------
# Parametrisations: x = α x₀ + σ ε, v = α ε − σ x₀, score = −ε/σ. α, σ broadcast against x.
# x0_from_v and eps_from_v assume α² + σ² = 1 (VP); elsewhere both are divided by α² + σ².
# ------------------------------------------------------------------------------------------


def x0_from_eps(x, eps, alpha, sigma):
  return (x - sigma * eps) / alpha


def eps_from_x0(x, x0, alpha, sigma):
  return (x - alpha * x0) / sigma


def x0_from_v(x, v, alpha, sigma):
  return alpha * x - sigma * v


def eps_from_v(x, v, alpha, sigma):
  return sigma * x + alpha * v


def v_from_x0_eps(x0, eps, alpha, sigma):
  return alpha * eps - sigma * x0


def x0_from_flow(x, u, sigma):
  """x̂₀ = x − σu for the flow process's velocity u = ε − x₀ (α + σ = 1)."""
  return x - sigma * u


def eps_from_flow(x, u, alpha):
  """ε̂ = x + αu for the flow process's velocity u = ε − x₀."""
  return x + alpha * u


def score_from_eps(eps, sigma):
  return -eps / sigma


def eps_from_score(score, sigma):
  return -sigma * score


# ------------------------------------------------------------------------------------------
# Drifts of the VP-SDE.
# ------------------------------------------------------------------------------------------


def _bcast(c: Array, x: Array) -> Array:
  """A scalar or `[B]` coefficient shaped to broadcast against `x` `[B, ...]`."""
  c = jnp.asarray(c)
  return c.reshape(c.shape + (1,) * (x.ndim - c.ndim))


def reverse_sde_drift(process: VPProcess, x: Array, t: Array, score: Array) -> Array:
  """f(t) x − g²(t) s: the drift of the reverse-time SDE (dt < 0)."""
  return _bcast(process.f(t), x) * x - _bcast(process.g2(t), x) * score


def reverse_sde_diffusion(process: VPProcess, t: Array) -> Array:
  """g(t), the diffusion coefficient of both the forward and the reverse SDE."""
  return jnp.sqrt(process.g2(t))


def pf_ode_drift(process: VPProcess, x: Array, t: Array, score: Array) -> Array:
  """f(t) x − ½ g²(t) s: the probability-flow ODE dx/dt."""
  return _bcast(process.f(t), x) * x - 0.5 * _bcast(process.g2(t), x) * score


# ------------------------------------------------------------------------------------------
# The model wrapper.
# ------------------------------------------------------------------------------------------


def check_mean_type(kind: ProcessKind, mean_type: MeanType) -> None:
  """A one-line ValueError where `mean_type` and the process do not go together: 'edm' (EDM's
  preconditioned F) and the 'edm' process only with each other; 'flow' (the velocity ε − x₀)
  on the 'flow' process only (which also takes eps, xstart, v and the score)."""
  if (mean_type is MeanType.EDM) != (kind is ProcessKind.EDM):
    raise ValueError("mean_type 'edm' (EDM's preconditioned F) and the 'edm' process go "
                     f'together, not mean_type {mean_type.value!r} with process {kind.value!r}')
  if mean_type is MeanType.FLOW and kind is not ProcessKind.FLOW:
    raise ValueError("mean_type 'flow' (the velocity ε − x₀ of x_t = (1 − t) x₀ + t ε) needs "
                     f"the 'flow' process, not {kind.value!r}")


def parse_continuous_mean_type(mean_type) -> MeanType:
  """A `MeanType` for the solvers: every one has a denoiser (xprev on the VP process only, which
  `make_denoiser` checks against the process)."""
  return MeanType.parse(mean_type)


def _x0_from_xprev(process: VPProcess, x: Array, mean: Array, t: Array) -> Array:
  """x̂₀ from a predicted posterior mean μ̃ of one DDPM step, from t to s = t − 1/T (the data,
  α = 1, below the first node): μ̃ = c₀ x̂₀ + c_x x with Ho's c₀ = β√ᾱ_s/(1 − ᾱ_t),
  c_x = (1 − ᾱ_s)√(ᾱ_t/ᾱ_s)/(1 − ᾱ_t), β = 1 − ᾱ_t/ᾱ_s."""
  if process.kind is not ProcessKind.VP:
    raise ValueError(f"mean_type 'xprev' predicts a DDPM step's mean: it needs the 'vp' process, "
                     f'not {process.kind.value!r}')
  la_t = process.log_alpha_t(t)
  first = t < process.t_nodes[0] + 0.5 / process.num_timesteps
  la_s = jnp.where(first, 0.0, process.log_alpha_t(t - 1.0 / process.num_timesteps))
  one_minus_ab_t, one_minus_ab_s = -jnp.expm1(2.0 * la_t), -jnp.expm1(2.0 * la_s)  # no cancellation
  beta = -jnp.expm1(2.0 * (la_t - la_s))
  c0 = beta * jnp.exp(la_s) / one_minus_ab_t
  cx = one_minus_ab_s * jnp.exp(la_t - la_s) / one_minus_ab_t
  return (mean - _bcast(cx, x) * x) / _bcast(c0, x)


def make_denoiser(process: VPProcess, denoise_fn: DenoiseFn, mean_type, *,
                  with_variance: bool = False) -> Denoiser:
  """`denoiser(x [B, ..., C], t [B]) -> (x0_hat, eps_hat)` at continuous times t.

  Calls `denoise_fn(c_in·x, process.model_timestep(t))` once (c_in = `input_scale`: 1 but for
  VE; the timestep is T·t − 1 for VP, log σ for VE, 999·t for sub-VP), keeps the first C output
  channels and converts ε / x₀ / v / the score / a DDPM step's mean (xprev, VP) to both x₀ and
  ε. `with_variance`: a model with learned variances (2C channels) also returns its last C
  channels, `(x0_hat, eps_hat, variance_output)`, for the ancestral `ddpm` solver.
  """
  mt = parse_continuous_mean_type(mean_type)
  check_mean_type(process.kind, mt)

  def denoiser(x: Array, t: Array):
    chex.assert_rank(t, 1)
    chex.assert_equal(t.shape[0], x.shape[0])
    c = x.shape[-1]
    full = denoise_fn(x * _bcast(process.input_scale(t), x).astype(x.dtype),
                      process.model_timestep(t))
    chex.assert_equal(full.shape[:-1], x.shape[:-1])
    if full.shape[-1] not in (c, 2 * c) or (with_variance and full.shape[-1] != 2 * c):
      expected = f'{2 * c} (learned variances)' if with_variance else f'{c} or {2 * c}'
      raise ValueError(f'model output has {full.shape[-1]} channels; expected {expected}')
    out = full[..., :c].astype(x.dtype)
    extra = (full[..., c:].astype(x.dtype),) if with_variance else ()
    alpha = _bcast(process.alpha(t), x)
    sigma = _bcast(process.sigma(t), x)
    if mt is MeanType.EPS:
      return (x0_from_eps(x, out, alpha, sigma), out) + extra
    if mt is MeanType.XSTART:
      return (out, eps_from_x0(x, out, alpha, sigma)) + extra
    if mt is MeanType.SCORE:
      eps = eps_from_score(out, sigma)
      return (x0_from_eps(x, eps, alpha, sigma), eps) + extra
    if mt is MeanType.XPREV:
      x0 = _x0_from_xprev(process, x, out, t)
      return (x0, eps_from_x0(x, x0, alpha, sigma)) + extra
    if mt is MeanType.EDM:
      c_skip, c_out = edm_skip_out(sigma, process.sigma_data)
      x0 = c_skip * x + c_out * out
      return (x0, eps_from_x0(x, x0, alpha, sigma)) + extra
    if mt is MeanType.FLOW:
      return (x0_from_flow(x, out, sigma), eps_from_flow(x, out, alpha)) + extra
    if process.kind is ProcessKind.VP:   # α² + σ² = 1
      return (x0_from_v(x, out, alpha, sigma), eps_from_v(x, out, alpha, sigma)) + extra
    r = jnp.square(alpha) + jnp.square(sigma)   # the 2×2 inverse of (x, v) in (x₀, ε)
    return (x0_from_v(x, out, alpha, sigma) / r, eps_from_v(x, out, alpha, sigma) / r) + extra

  return denoiser


def clip_x0(process: VPProcess, denoiser: Denoiser) -> Denoiser:
  """`denoiser` with x̂₀ clipped to [-1, 1] and ε̂ re-derived from it (as DDIM's
  `clip_denoised`; DPM-Solver++'s static thresholding). Further outputs pass through."""

  def clipped(x: Array, t: Array):
    x0, _, *rest = denoiser(x, t)
    x0 = jnp.clip(x0, -1.0, 1.0)
    eps = eps_from_x0(x, x0, _bcast(process.alpha(t), x), _bcast(process.sigma(t), x))
    return (x0, eps, *rest)

  return clipped
