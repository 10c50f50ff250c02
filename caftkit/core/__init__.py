"""The method's core: what reads a transformers model from the inside (the capture of layer L's call)."""
