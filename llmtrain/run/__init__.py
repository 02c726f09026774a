"""What every training mode stands on: the run folder, checkpoints, resume, set-up and the trained-model loader."""
