"""retrogen: augment a labelled image dataset by retrieval or generation, with provenance.

This folder holds the foundation every retrogen package may import (errors, safe image decoding, file
mechanics, the output folder, the config idiom, progress) and, above the libraries, the ``retrogen`` command
(``cli``), the demo and the HTTP client. The libraries install beneath it: ``retrogen.retrieval``,
``retrogen.index_builder``, ``retrogen.generation``, ``retrogen.evaluation``, ``retrogen.service``
(docs/architecture.md). Importing it loads nothing heavy.
"""

import os

__version__ = "0.1.0"

# torch and faiss each ship an OpenMP runtime; with the default ACTIVE wait policy their idle threads spin
# against each other in one process (a test here swung 4.6 s -> 42 s). PASSIVE must be in the environment
# before either library loads, so every retrogen package imports this module first. A user's explicit
# setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
