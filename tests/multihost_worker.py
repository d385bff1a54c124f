"""Runs the tiny config in one process of a (possibly multi-process) job; used by test_train.

  python tests/multihost_worker.py OUT.npz WORKDIR DATA_DIR NUM_PROCESSES PROCESS_ID PORT

Writes this process's copy of the final params (every leaf, flattened by path) to OUT.npz.
"""

import os
import sys

import jax


def main(out, workdir, data_dir, num_processes, process_id, port):
  num_processes, process_id = int(num_processes), int(process_id)
  if num_processes > 1:
    jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}',
                               num_processes=num_processes, process_id=process_id)
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from diffusion_jax.training import loop as train  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.data.data_dir = data_dir
  config.model.dropout = 0.0   # dropout masks depend on the device layout
  # Adam steps g/(|g| + eps): with the default eps, the float noise of gradients that are zero
  # in exact arithmetic (biases before a per-channel GroupNorm) becomes a ±lr step that depends
  # on the reduction order. A larger eps keeps those steps at noise level, so layouts compare.
  config.optimizer.eps = 1e-3
  config.training.num_train_steps = 3
  config.training.checkpoint_every_steps = 3
  state = train.train_and_evaluate(config, workdir)
  flat, _ = jax.tree_util.tree_flatten_with_path(state.params)
  local = {jax.tree_util.keystr(p): jax.device_get(x.addressable_shards[0].data)
           for p, x in flat}
  import numpy as np  # pylint: disable=g-import-not-at-top
  np.savez(out, **local)


if __name__ == '__main__':
  main(*sys.argv[1:])
