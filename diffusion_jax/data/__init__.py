"""Datasets and the input pipeline (TFDS array_record sources read with grain).

`input_pipeline` builds the training and evaluation iterators; `digits` is a
small TFDS dataset built offline from the copy of the 8x8 digits inside
scikit-learn, used by the tests and the tiny configs.
"""

from diffusion_jax.data.digits import prepare_digits
from diffusion_jax.data.input_pipeline import (
    ImageDatasetInfo,
    create_eval_iterator,
    create_train_iterator,
    dataset_info,
)

__all__ = [
    'ImageDatasetInfo',
    'create_eval_iterator',
    'create_train_iterator',
    'dataset_info',
    'prepare_digits',
]
