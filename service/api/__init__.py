"""The HTTP layer: FastAPI routers and dependencies (no torch/faiss imports here)."""
