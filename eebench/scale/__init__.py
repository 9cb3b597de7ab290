"""Scale-out: cells as Ray tasks (``--executor ray``) and hyper-parameter searches with Ray Tune."""
