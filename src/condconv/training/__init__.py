"""Training services: config and recipes, optimisers and schedules, weight averaging (``ema``), the loop (``loop``),
evaluation, routing analysis, sweeps, run logs and figures."""
