"""Local inference: the live models, their figures, tensor I/O."""
