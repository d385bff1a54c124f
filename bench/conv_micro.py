r"""The U-Net's 3x3 convolutions alone: XLA's convolution against other formulations.

  python bench/conv_micro.py                 # batch 8, the CIFAR-10 U-Net's shapes
  python bench/conv_micro.py --batch 32

For each (size, C_in, C_out) of the CIFAR-10 U-Net it times, forward and forward+backward
(gradients for input and kernel):
  conv    `lax.conv_general_dilated`, NHWC (what flax's nn.Conv runs)
  im2col  the 9 shifted copies concatenated to [B*H*W, 9*C_in], one matmul with the kernel
          reshaped to [9*C_in, C_out]; autodiff turns the backward into two matmuls
Prints GFLOP/s (2*B*H*W*9*C_in*C_out per pass; three times that forward+backward).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

# (H = W, C_in, C_out, how many) of the CIFAR-10 U-Net's stride-1 3x3 convs (conv_in and
# conv_out left out): 10.7 GFLOP per image of its forward pass.
SHAPES = ((32, 128, 128, 7), (32, 256, 128, 2), (32, 384, 128, 1), (32, 256, 256, 1),
          (16, 128, 256, 1), (16, 256, 256, 7), (16, 512, 256, 2), (16, 384, 256, 1),
          (8, 256, 256, 8), (8, 512, 256, 3), (4, 256, 256, 11), (4, 512, 256, 3))


def conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def im2col(x, w):
  b, h, wd, c = x.shape  # [B, H, W, C]
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  cols = jnp.concatenate([xp[:, i:i + h, j:j + wd, :] for i in range(3) for j in range(3)],
                         axis=-1)  # [B, H, W, 9C]
  y = cols.reshape(b * h * wd, 9 * c) @ w.reshape(9 * c, -1)
  return y.reshape(b, h, wd, -1)


def timeit(f, *args, repeats=5):
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args(argv)
  impls = dict(conv=conv, im2col=im2col)
  totals = {k: [0.0, 0.0] for k in impls}
  print(f'{"shape":>22s} ' + ' '.join(f'{k + " fwd":>11s} {k + " f+b":>11s}' for k in impls)
        + '   (GFLOP/s)')
  for size, cin, cout, n in SHAPES:
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (args.batch, size, size, cin))
    w = jax.random.normal(kw, (3, 3, cin, cout)) * 0.05
    flops = 2 * args.batch * size * size * 9 * cin * cout
    row = []
    for name, f in impls.items():
      fwd = jax.jit(f)
      grad = jax.jit(jax.grad(lambda x, w, f=f: jnp.sum(f(x, w) ** 2), argnums=(0, 1)))
      tf, tb = timeit(fwd, x, w, repeats=args.repeats), timeit(grad, x, w, repeats=args.repeats)
      totals[name][0] += n * tf
      totals[name][1] += n * tb
      row.append(f'{flops / tf / 1e9:11.1f} {3 * flops / tb / 1e9:11.1f}')
    print(f'{f"{size}x{size} {cin}->{cout} (x{n})":>22s} ' + ' '.join(row))
  print('weighted seconds: ' + ', '.join(f'{k} fwd {v[0]:.3f} f+b {v[1]:.3f}'
                                         for k, v in totals.items()))


if __name__ == '__main__':
  main()
