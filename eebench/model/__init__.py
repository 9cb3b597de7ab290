"""The model: backbone adapters, exit heads, the layer stepper (``ExitOutput``) and the speed
settings (precision, attention kernel). Depends on nothing but the shared helpers."""
