"""Training, backend-agnostic: the run config, the LLaVA data, the step plan and schedule, the run
directory, adapters, the model source, DeepSpeed config resolution, the shared run loop.

`parrot.training.train(config)` runs a training; the backends supply the step (`Engine`)."""

from .prepare import PreparedRun, launch_world, prepare_run, train

__all__ = ["PreparedRun", "launch_world", "prepare_run", "train"]
