"""llmtune: recipe-driven fine-tuning and alignment of large language models."""

import os

__version__ = "0.1.0"

# transformers 5.2x swaps layers for kernels fetched from the hub whenever the `kernels` package is
# installed (transformers requires it) and the model is on a GPU. On an offline cluster that fails at
# the first training step ("could not verify publisher trust status", seen on an H200), and online
# it runs code downloaded at train time. Off unless the user asks: USE_HUB_KERNELS=YES.
os.environ.setdefault("USE_HUB_KERNELS", "NO")
