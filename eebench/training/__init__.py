"""Training: the method contract (``Strategy``, phases, the method registry) and the trainer.
Methods themselves live in ``methods/`` (shipped as ``eebench.methods``) and plugins."""
