"""The pipeline stages, one module each: siblings that never import one another (`genzoo <stage>`)."""
