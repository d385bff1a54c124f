"""The sampler's command-line flags, defined once for sample.py and evaluate.py, and the
sampler they choose.

Every flag defaults to "not given": the sampler is then the workdir's recommended one (the
`eval` sampler of its spec.json, recorded at training from the recipe). Flags given replace
its options; `--sampler` naming another kind starts from that kind's defaults.
"""

from __future__ import annotations

from absl import flags

from diffusion_jax.sampling import config as sampler_config


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines --sampler and one flag per `sampler_config.OPTIONS`, all defaulting to None."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string(
      'sampler', None, 'ddpm (ancestral), ddim, or a solver of the continuous-time process: '
      'euler, heun, dpmpp_2m, dpmpp_3m (PF-ODE), sde (reverse SDE, Euler-Maruyama), pc '
      '(predictor-corrector), ode (adaptive PF-ODE), ald (annealed Langevin dynamics, ve models). Default: the workdir\'s recommended '
      'sampler (eval.sampler in its spec.json).', **fv)
  flags.DEFINE_integer('steps', None, 'Sampling steps (not for ode; at most T). Default: the '
                       'recommended sampler\'s, or all T for another --sampler.', **fv)
  flags.DEFINE_float('eta', None, 'ddim: η (0: deterministic).', **fv)
  flags.DEFINE_string('step_schedule', None, 'Solvers: time_uniform, logsnr or karras (rho 7); '
                      'default: karras for euler/heun, logsnr for the others.', **fv)
  flags.DEFINE_float('churn', None, 'heun: S_churn (0: deterministic).', **fv)
  flags.DEFINE_float('snr', None, 'pc: the Langevin corrector\'s target signal-to-noise '
                     'ratio.', **fv)
  flags.DEFINE_float('rtol', None, 'ode: relative (and absolute) tolerance.', **fv)
  flags.DEFINE_integer('langevin_steps', None, 'ald: Langevin steps per noise level.', **fv)
  flags.DEFINE_float('langevin_step_size', None, 'ald: the step ε (ε·σ_i²/σ_L² at level i).',
                     **fv)
  flags.DEFINE_float('guidance_scale', None, 'Classifier-free guidance w (class-conditional '
                     'models).', **fv)


def from_flags(recommended: sampler_config.SamplerConfig, flag_values: flags.FlagValues = flags.FLAGS
               ) -> tuple[sampler_config.SamplerConfig, str]:
  """(the sampler, where it came from): `recommended` with the given flags applied."""
  values = {name: flag_values[name].value for name in sampler_config.OPTIONS}
  kind = flag_values['sampler'].value
  if kind is None and all(v is None for v in values.values()):
    return recommended, "the workdir's recommended sampler"
  return recommended.with_options(kind, **values), 'from the flags'
