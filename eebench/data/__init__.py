"""Task data, the first step of the flow, read top-down:

- ``tasks``: task specs (``tasks/*.yaml``, or a user's own YAML) and their validation;
- ``sources``: where a split comes from (``--data-dir``, ``GLUE_DIR``, the hub), reading and
  validating local files, the on-disk cache, seeded subsets;
- ``tokenise``: tokenising, length-grouped batches, data fingerprints.

Imports nothing above it. The names below are the package's public surface.
"""

from eebench.data.sources import load_task, subset
from eebench.data.tasks import (
           FileFormat,
           HubSource,
           SplitSpec,
           TaskSpec,
           check_trainable,
           get_task,
           list_tasks,
)
from eebench.data.tokenise import data_fingerprint, make_loader, tokenize

__all__ = ["TaskSpec", "HubSource", "FileFormat", "SplitSpec", "get_task", "list_tasks", "check_trainable",
           "load_task", "subset", "tokenize", "make_loader", "data_fingerprint"]
