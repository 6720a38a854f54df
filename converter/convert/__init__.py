"""Keras / SavedModel to TFLite: loading, pruning, quantization, evaluation, the report."""
