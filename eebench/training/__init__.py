"""Training: the trainer (optimiser phases, gradient accumulation, checkpoints, per-layer dev
metrics). The method contract it drives (``Strategy``, phases, the method registry) is
``eebench.strategy``, below the model; methods live in ``methods/`` (``eebench.methods``) and plugins."""
