"""Task data, the first step of the flow: task specs (YAML), where a split comes from (the hub,
``GLUE_DIR``, local files), tokenising, length-grouped batches and data fingerprints, and the task
metrics a spec names. Imports nothing above it."""
