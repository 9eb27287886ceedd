"""What the service does (HTTP-free): uploads, storage, export, job runners, the worker, evaluations, and the
registry of loaded corpus indexes."""
