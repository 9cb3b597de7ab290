"""Named run recipes (``eebench run --config NAME``): one YAML each, shipped as ``eebench.recipes``."""
