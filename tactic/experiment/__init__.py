"""The run machinery: the grid of runs and their names (grid.py), the mode table (modes.py), a codec
in front of a task network as one system (system.py), the training loop (train.py), real-bitstream
evaluation (evaluate.py), and what each DVC stage runs (run.py)."""
