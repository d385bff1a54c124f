"""The sampler's command-line flags, defined once for sample.py and evaluate.py, and the
sampler they choose.

Every flag defaults to "not given": the sampler is then the workdir's recommended one (the
`eval` sampler of its spec.json, recorded at training from the recipe). Flags given replace
its options; `--sampler` naming another kind starts from that kind's defaults.
"""

from __future__ import annotations

from absl import flags

from diffusion_jax.sampling import config as sampler_config
from diffusion_jax.sampling import solvers


# Each option's help; which samplers take it comes from the registry (`solvers.SOLVERS`).
_HELP = {
    'steps': "Sampling steps (ddpm, ddim: the levels the model sees; at most T; not for ode). "
             "Default: the recommended sampler's, or all T for another --sampler.",
    'step_schedule': 'time_uniform, logsnr, karras (rho 7) or respaced (DDPM\'s timesteps, vp); '
                     "default: the sampler's own.",
    'guidance_scale': 'Classifier-free guidance w (class-conditional models).',
    'eta': 'η (0: deterministic).',
    'churn': 'S_churn (0: deterministic).',
    'snr': "the Langevin corrector's target signal-to-noise ratio.",
    'rtol': 'relative (and absolute) tolerance.',
    'langevin_steps': 'Langevin steps per noise level.',
    'langevin_step_size': 'the step ε (ε·σ_i²/σ_L² at level i).',
}
_TYPES = {'steps': flags.DEFINE_integer, 'langevin_steps': flags.DEFINE_integer,
          'step_schedule': flags.DEFINE_string}


def _owners(option: str) -> str:
  names = [n for n, info in solvers.SOLVERS.items() if option in info.options]
  return f'{"/".join(names)}: ' if names else ''


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines --sampler and one flag per `sampler_config.OPTIONS`, all defaulting to None."""
  fv = dict(flag_values=flag_values)
  kinds = '; '.join(f'{name} ({info.summary})' for name, info in solvers.SOLVERS.items())
  flags.DEFINE_string('sampler', None, f'{kinds}. Default: the workdir\'s recommended sampler '
                      '(eval.sampler in its spec.json).', **fv)
  for name in sampler_config.OPTIONS:
    define = _TYPES.get(name, flags.DEFINE_float)
    define(name, None, _owners(name) + _HELP[name], **fv)


def from_flags(recommended: sampler_config.SamplerConfig, flag_values: flags.FlagValues = flags.FLAGS
               ) -> tuple[sampler_config.SamplerConfig, str]:
  """(the sampler, where it came from): `recommended` with the given flags applied."""
  values = {name: flag_values[name].value for name in sampler_config.OPTIONS}
  kind = flag_values['sampler'].value
  if kind is None and all(v is None for v in values.values()):
    return recommended, "the workdir's recommended sampler"
  return recommended.with_options(kind, **values), 'from the flags'
