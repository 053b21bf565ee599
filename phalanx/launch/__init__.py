"""Entry points: the `phalanx` CLI, the Hydra app and the worker process."""

import os

# Before torch is imported by any entry point: c10d's C++ warnings include one per store wait
# that times out ("waitForInput ... timed out after 200ms"), which the commit protocol does by
# design every 200 ms -- noise in every log. Errors still print; TORCH_CPP_LOG_LEVEL=WARNING
# (or INFO) shows the rest.
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
