"""retrogen: augment a labelled image dataset by retrieval or generation, with provenance.

This package is the foundation every retrogen library may import (version, safe image decoding,
ImageFolder reading, provenance basics) plus the ``retrogen`` command's composition root (``cli``).
It imports nothing heavy.
"""

import os

__version__ = "0.1.0"

# torch and faiss each ship an OpenMP runtime; with the default ACTIVE wait policy their idle threads spin
# against each other in one process (a test here swung 4.6 s -> 42 s). PASSIVE must be in the environment
# before either library loads, so every retrogen package imports this module first. A user's explicit
# setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
