"""SliceGPT: rotate the residual stream by per-layer PCA bases and delete the least significant directions."""
from llmsp.prune.methods.slicegpt.method import SliceGPT, slice_model, sliced_dim

__all__ = ["SliceGPT", "slice_model", "sliced_dim"]
