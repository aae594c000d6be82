"""Execution back-ends of the engine (:mod:`condconv.functional`): each computes the same dynamic convolution."""
