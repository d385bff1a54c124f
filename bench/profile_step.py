r"""Where the time of a compiled step goes: a per-op breakdown from a `jax.profiler` trace.

  python bench/profile_step.py train --batch 8          # the benchmark's train step
  python bench/profile_step.py forward --batch 8 --top 30

Traces `--steps` runs after warm-up, then sums the XLA CPU runtime's per-op events (its
thunks: convolutions, dots, fusions, copies) by kind and by op, and prints both tables with
each op's share of the traced wall time. Convolutions are split into the forward ones and the
two backward ones (gradient with respect to the input and to the kernel) by their shapes in the
optimised HLO. Threads: the sum over threads can exceed the wall time when ops overlap.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax_bench  # pylint: disable=g-import-not-at-top,wrong-import-position


def _dims(shape: str) -> list[int]:
  m = re.search(r'\[([0-9,]*)\]', shape)
  return [int(x) for x in m.group(1).split(',') if x] if m else []


def _prod(xs) -> int:
  out = 1
  for x in xs:
    out *= x
  return out


def _classify(root: str, params: dict[str, list[int]]) -> tuple[str, float]:
  """(kind, FLOPs) of a convolution or dot instruction line of the optimised HLO."""
  out = _dims(root.split('=', 1)[1])
  backward = 'transpose(jvp' in root
  operands = re.findall(r'%([\w.\-]+)', root.split('(', 1)[1])
  lhs = params.get(operands[0], []) if operands else []
  if ' convolution(' in root:
    window = [int(x) for x in re.search(r'size=([0-9x]+)', root).group(1).split('x')]
    in_features = lhs[-1] if lhs else 0
    flops = 2 * _prod(out) * _prod(window) * in_features
    if window != [3, 3] and window != [1, 1] and backward:
      return 'conv grad-kernel', flops
    return ('conv grad-input' if backward else 'conv forward'), flops
  contracting = re.search(r'lhs_contracting_dims=\{([0-9,]*)\}', root)
  k = _prod(lhs[int(i)] for i in contracting.group(1).split(',')) if contracting and lhs else 0
  return ('dot backward' if backward else 'dot forward'), 2 * _prod(out) * k


def _loop_role(body: str) -> str:
  """What an XLA loop fusion mostly does, from the ops and names inside it."""
  if 'threefry' in body or 'random_bits' in body or 'shift-right-logical' in body:
    return 'random bits (dropout, noise)'
  if 'adam' in body or 'sqrt' in body and 'divide' in body and 'rsqrt' not in body:
    return 'optimizer'
  if ' reduce(' in body:
    return 'reductions (norm statistics)'
  if ' transpose(' in body or ' reverse(' in body:
    return 'transposes and copies'
  return 'elementwise (norm, swish, adds)'


def op_kinds(hlo_text: str) -> dict[str, tuple[str, float]]:
  """Maps each instruction of the optimised HLO's entry to (kind, FLOPs) for the breakdown.

  Library-call fusions (XLA CPU hands convolutions and dots to YNNPACK/XNNPACK as
  `kCustom` fusions) are classified by the convolution or dot at their root.
  """
  roots, params, bodies = {}, {}, collections.defaultdict(list)
  current = None
  for line in hlo_text.splitlines():
    head = re.match(r'%?([\w.\-]+) \((.*)\) -> ', line)
    if head and not line.startswith(' '):
      current = head.group(1)
      params[current] = {n: _dims(sh) for n, sh in
                         re.findall(r'([\w.\-]+): ([a-z0-9]+\[[0-9,]*\])', head.group(2))}
    elif current and line.strip().startswith('ROOT'):
      roots[current] = line
    if current:
      bodies[current].append(line)
  kinds = {}
  for line in hlo_text.splitlines():
    m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = (\S+) (\w[\w\-]*)\(', line)
    if not m:
      continue
    name, _, opcode = m.groups()
    kind, flops = opcode, 0.0
    if opcode == 'fusion':
      called = re.search(r'calls=%?([\w.\-]+)', line).group(1)
      root = roots.get(called, '')
      if ' convolution(' in root or ' dot(' in root:
        kind, flops = _classify(root, params.get(called, {}))
      else:
        kind = 'loop fusion: ' + _loop_role('\n'.join(bodies.get(called, [])))
    elif opcode in ('convolution', 'dot'):
      kind, flops = _classify(line, {})
    op = re.search(r'op_name="([^"]*)"', line)
    shape = line.split(' = ', 1)[1].split(' ', 1)[0]
    kinds[name] = (kind, flops, shape + ' ' + (op.group(1).split('/', 1)[-1] if op else ''))
  return kinds


def summarise(trace_dir: str, kinds: dict, wall_s: float, top: int, only: str = '') -> None:
  files = glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True)
  if not files:
    raise FileNotFoundError(f'no .xplane.pb under {trace_dir}')
  data = jax.profiler.ProfileData.from_file(files[0])
  by_op = collections.Counter()
  count = collections.Counter()
  threads = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      for ev in line.events:
        base = ev.name.split(':')[0]
        if base not in kinds:
          continue
        by_op[base] += ev.duration_ns / 1e9
        count[base] += 1
        threads[line.name] += ev.duration_ns / 1e9
  by_kind, flops_kind = collections.Counter(), collections.Counter()
  for name, s in by_op.items():
    by_kind[kinds[name][0]] += s
    flops_kind[kinds[name][0]] += kinds[name][1] * count[name]
  if only:
    by_op = collections.Counter({n: s for n, s in by_op.items() if only in kinds[n][0]})
  total = sum(by_op.values())
  print(f'traced wall {wall_s:.2f} s; op time summed over threads {total:.2f} s '
        f'({total / wall_s:.2f} ops in flight on average)')
  print('\nby kind:                             time   share    GFLOP   GFLOP/s')
  for kind, s in by_kind.most_common():
    g = flops_kind[kind] / 1e9
    rate = f'{g / s:8.1f}' if g else ''
    print(f'  {kind:32s} {s:7.3f} s {100 * s / wall_s:5.1f}%  {g:7.1f} {rate}')
  print(f'\ntop {top} ops:')
  for name, s in by_op.most_common(top):
    kind, flops, desc = kinds[name]
    rate = f'{flops * count[name] / s / 1e9:6.1f} GFLOP/s' if flops else ''
    print(f'  {name:26s} {kind[:24]:24s} x{count[name]:<3d} {s:7.3f} s {100 * s / wall_s:5.1f}% '
          f'{rate} {desc[:110]}')
  print('\nby thread:')
  for name, s in threads.most_common(8):
    print(f'  {name:40s} {s:8.3f} s')


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('what', choices=('train', 'forward'))
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--top', type=int, default=25)
  parser.add_argument('--tiny', action='store_true')
  parser.add_argument('--hlo', help='also write the optimised HLO to this file')
  parser.add_argument("--micro", type=int, default=1)
  parser.add_argument("--accum", type=int, default=1)
  parser.add_argument('--only', default='', help='list only the top ops whose kind has this')
  args = parser.parse_args(argv)
  args.devices = 1
  jax_bench.host_memory.reuse_freed_host_memory()
  runner = dict(train=jax_bench.train_runner, forward=jax_bench.forward_runner)[args.what]
  compiled, run, _ = runner(args)
  hlo = compiled.as_text()
  if args.hlo:
    with open(args.hlo, 'w') as f:
      f.write(hlo)
  run()
  run()
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    with jax.profiler.trace(tmp):
      for _ in range(args.steps):
        run()
    wall = time.perf_counter() - start
    summarise(tmp, op_kinds(hlo), wall, args.top, args.only)


if __name__ == '__main__':
  main()
