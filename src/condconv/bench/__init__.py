"""Benchmarks: layers against their static twins (``layers``) and whole models, eager, exported and int8
(``models``)."""
