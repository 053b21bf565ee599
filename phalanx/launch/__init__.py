"""Entry points: the `phalanx` CLI, the Hydra app and the worker process."""
