"""Prefect flows that run the DVC pipeline: `pipeline.flow` (the `tactic` flow), `pipeline.serve` (deployment `full`)."""
