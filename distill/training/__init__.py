"""Training: `run_training` sets a run up (processes, run folder, data, model, method) and `Trainer` runs the loop."""
