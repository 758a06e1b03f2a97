"""Networks: the codec (imports CompressAI, slow to load, so not imported here) and task networks."""
