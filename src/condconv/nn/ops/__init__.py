"""Execution back-ends of the engine (:mod:`condconv.nn.functional`): each computes the same dynamic convolution."""
