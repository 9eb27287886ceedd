"""retrogen generation package."""

import retrogen  # noqa: F401  (sets OMP_WAIT_POLICY before torch/faiss load)
