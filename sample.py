r"""Samples from a trained DDPM: a thin entry point around
`diffusion_jax.trained_model.sample_to_dir`.

  python sample.py --workdir /tmp/digits --num_samples 100
  python sample.py --workdir /tmp/digits --num_samples 64 --sampler ddim --steps 50 --seed 1
  python sample.py --workdir /tmp/digits --num_samples 1797 --sampler dpmpp_2m --steps 20
  python sample.py --workdir DIR --num_samples 100 --label 3 --guidance_scale 2

Loads the EMA parameters of the latest checkpoint in DIR/checkpoints, samples data-parallel
over every device, and writes OUT/samples.npz (uint8 `images` [N, H, W, C], and `labels`
for a class-conditional model) and OUT/grid.png; --progressive adds OUT/progressive.png (the
ancestral chain), --interpolate OUT/interpolation.png (DDIM-latent interpolation).
OUT defaults to DIR/samples_<sampler>_<steps>. Bad arguments: one `error: ...` line, exit 1.
"""

from absl import app
from absl import flags

from diffusion_jax import cli

flags.DEFINE_string('workdir', None, 'A training workdir (config.json and checkpoints/).')
flags.DEFINE_integer('num_samples', 64, 'Number of images.')
flags.DEFINE_string('sampler', 'ddpm', 'ddpm (ancestral), ddim, or a solver of the continuous-'
                    'time process: euler, heun, dpmpp_2m, dpmpp_3m (PF-ODE), sde (reverse SDE, '
                    'Euler-Maruyama), pc (predictor-corrector), ode (adaptive PF-ODE).')
flags.DEFINE_integer('steps', None, 'Sampling steps (not for ode); default: all T.')
flags.DEFINE_float('eta', 0.0, 'DDIM η (0: deterministic).')
flags.DEFINE_string('step_schedule', None, 'Solvers: time_uniform, logsnr or karras (rho 7); '
                    'default: karras for euler/heun, logsnr for the others.')
flags.DEFINE_float('churn', 0.0, 'Heun: S_churn (0: deterministic).')
flags.DEFINE_float('snr', 0.16, 'pc: the Langevin corrector\'s target signal-to-noise ratio.')
flags.DEFINE_float('rtol', 1e-3, 'ode: relative (and absolute) tolerance.')
flags.DEFINE_integer('batch_size', None,
                     'Images per call, a multiple of the device count; default: up to 256.')
flags.DEFINE_integer('seed', 0, 'Random seed.')
flags.DEFINE_string('output', None, 'Output folder; default WORKDIR/samples_<sampler>_<steps>.')
flags.DEFINE_float('guidance_scale', 0.0, 'Classifier-free guidance w (class-conditional).')
flags.DEFINE_integer('label', None, 'Class of every sample (class-conditional); default: '
                     'every class in turn.')
flags.DEFINE_bool('progressive', False, 'Also write progressive.png (needs --sampler ddpm).')
flags.DEFINE_bool('interpolate', False, 'Also write interpolation.png (samples 0 → 1).')
flags.DEFINE_bool('overwrite', False, 'Replace the files of an earlier run in OUT.')
flags.mark_flags_as_required(['workdir'])
FLAGS = flags.FLAGS


def main(argv):
  cli.start(argv)
  from diffusion_jax import trained_model  # pylint: disable=g-import-not-at-top
  from diffusion_jax import sampling  # pylint: disable=g-import-not-at-top
  try:
    sampler = sampling.SamplerConfig(
        FLAGS.sampler, steps=FLAGS.steps, eta=FLAGS.eta, guidance_scale=FLAGS.guidance_scale,
        step_schedule=FLAGS.step_schedule, churn=FLAGS.churn, snr=FLAGS.snr, rtol=FLAGS.rtol)
    result = trained_model.sample_to_dir(
        FLAGS.workdir, num_samples=FLAGS.num_samples, sampler=sampler,
        batch_size=FLAGS.batch_size, seed=FLAGS.seed, output=FLAGS.output, label=FLAGS.label,
        progressive_chain=FLAGS.progressive, interpolation=FLAGS.interpolate,
        overwrite=FLAGS.overwrite)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    cli.exit_with_error(e)
  print(f'checkpoint {result["step"]}: {result["num_samples"]} samples, {result["sampler"]}, '
        f'{result["model_evaluations"]} model evaluations each, in '
        f'{result["sample_seconds"]:.1f} s (compiling {result["compile_seconds"]:.1f} s, '
        f'cache {result["compile_cache"]}) → {result["output"]}')


if __name__ == '__main__':
  app.run(main)
