r"""Samples from a trained DDPM: a thin entry point around
`diffusion_jax.trained_model.sample_to_dir`.

  python sample.py --workdir /tmp/digits --num_samples 100    # the recommended sampler
  python sample.py --workdir /tmp/digits --num_samples 64 --sampler ddim --steps 50 --seed 1
  python sample.py --workdir /tmp/digits --num_samples 1797 --sampler dpmpp_2m --steps 20
  python sample.py --workdir DIR --num_samples 100 --label 3 --guidance_scale 2
  python sample.py --workdir /tmp/digits --classifier /tmp/digits_classifier --label 3 \
      --classifier_scale 2 --num_samples 64          # classifier guidance
  python sample.py --workdir /tmp/digits --sampler ddpm --steps 250 --inpaint \
      --images digits.npz --mask bottom --jump_length 10 --jump_n_sample 10   # RePaint
  python sample.py --workdir /tmp/digits --init digits.npz --strength 0.5   # SDEdit

Loads the EMA parameters of the latest checkpoint in DIR/checkpoints, samples data-parallel
over every device, and writes OUT/samples.npz (uint8 `images` [N, H, W, C], and `labels`
for a class-conditional model) and OUT/grid.png; --progressive adds OUT/progressive.png (x_t and
x̂₀ at the sampler's levels), --interpolate OUT/interpolation.png (latent interpolation).
OUT defaults to DIR/samples_<sampler>_<steps>. Bad arguments: one `error: ...` line, exit 1.

The sampler flags are `diffusion_jax/sampling/flags.py`'s, shared with evaluate.py; without
them the workdir's recommended sampler is used (its spec's eval sampler, the recipe's choice)
and the first line of output names it.
"""

from absl import app
from absl import flags

from diffusion_jax.runtime import cli
from diffusion_jax.sampling import config as sampler_config
from diffusion_jax.sampling import flags as sampler_flags

flags.DEFINE_string('workdir', None, 'A training workdir (config.json and checkpoints/).')
flags.DEFINE_integer('num_samples', 64, 'Number of images.')
sampler_flags.define_flags()  # --sampler, --steps, --eta, --step_schedule, --churn, ...
flags.DEFINE_integer('batch_size', None,
                     'Images per call, a multiple of the device count; default: up to 256.')
flags.DEFINE_integer('seed', 0, 'Random seed.')
flags.DEFINE_string('output', None, 'Output folder; default WORKDIR/samples_<sampler>_<steps>.')
flags.DEFINE_integer('label', None, 'Class of every sample (class-conditional); default: '
                     'every class in turn.')
flags.DEFINE_bool('progressive', False, 'Also write progressive.png (x_t and x̂₀ at 10 '
                  'levels; any fixed-step sampler).')
flags.DEFINE_bool('interpolate', False, 'Also write interpolation.png (samples 0 → 1 through '
                  'their latents; ddpm, ddim or a deterministic solver).')
flags.DEFINE_bool('overwrite', False, 'Replace the files of an earlier run in OUT.')
# Controllable generation (docs/controllable.md).
flags.DEFINE_string('classifier', None, 'A noise-conditional classifier workdir (trained with '
                    "diffusion.objective 'classifier', e.g. configs/digits_classifier.py): "
                    'classifier guidance toward --label (default: every class in turn).')
flags.DEFINE_float('classifier_scale', None, 'The guidance scale s of --classifier (default 1).')
flags.DEFINE_bool('inpaint', False, 'Inpaint --images under --mask instead of sampling.')
flags.DEFINE_string('images', None, '--inpaint: the known images, an .npz (uint8 `images` '
                    '[N, H, W, C]) or a PNG grid as sample.py writes.')
flags.DEFINE_string('mask', None, '--inpaint: the unknown region (top, bottom, left, right, '
                    'center) or a mask file (.npz `mask`, or a PNG: white known, black unknown).')
flags.DEFINE_integer('jump_length', None, '--inpaint: RePaint\'s jump length (default 1).')
flags.DEFINE_integer('jump_n_sample', None, '--inpaint: RePaint\'s resamplings (default 1: '
                     'plain replacement).')
flags.DEFINE_string('init', None, 'Image-to-image (SDEdit): the input images (.npz or PNG grid).')
flags.DEFINE_float('strength', None, 'Image-to-image: in (0, 1], the share of the sampler\'s '
                   'steps run from the noised input (1: from pure noise).')
flags.mark_flags_as_required(['workdir'])
FLAGS = flags.FLAGS


def main(argv):
  cli.start(argv)
  from diffusion_jax import trained_model  # pylint: disable=g-import-not-at-top
  try:
    spec = trained_model.read_workdir(FLAGS.workdir).spec
    sampler, source = sampler_flags.from_flags(spec.eval.sampler)
    if FLAGS.inpaint and source != 'from the flags' and not sampler.info.stepper:
      # The recommended sampler is multistep (dpmpp_2m): inpaint with Ho's chain instead.
      sampler = sampler_config.SamplerConfig('ddpm', steps=min(100, spec.diffusion.num_timesteps))
      source = f'for --inpaint; the recommended {spec.eval.sampler.describe()} cannot inpaint'
    spec.check_sampler(sampler)   # e.g. ald on a vp model: one line, before loading
    print(f'sampler: {sampler.describe()} ({source})', flush=True)
    result = trained_model.sample_to_dir(
        FLAGS.workdir, num_samples=FLAGS.num_samples, sampler=sampler,
        batch_size=FLAGS.batch_size, seed=FLAGS.seed, output=FLAGS.output, label=FLAGS.label,
        progressive_chain=FLAGS.progressive, interpolation=FLAGS.interpolate,
        overwrite=FLAGS.overwrite, classifier=FLAGS.classifier,
        classifier_scale=FLAGS.classifier_scale, inpaint=FLAGS.inpaint, images=FLAGS.images,
        mask=FLAGS.mask, init=FLAGS.init, strength=FLAGS.strength,
        jump_length=FLAGS.jump_length, jump_n_sample=FLAGS.jump_n_sample)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    cli.exit_with_error(e)
  print(f'checkpoint {result["step"]}: {result["num_samples"]} samples, {result["sampler"]}, '
        f'{result["model_evaluations"]} model evaluations each, in '
        f'{result["sample_seconds"]:.1f} s (compiling {result["compile_seconds"]:.1f} s, '
        f'cache {result["compile_cache"]}) → {result["output"]}')


if __name__ == '__main__':
  app.run(main)
