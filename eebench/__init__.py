"""eebench: a benchmark harness for early-exit transformer classifiers."""

__version__ = "0.1.0"
