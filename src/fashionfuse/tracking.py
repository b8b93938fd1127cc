"""Experiment tracking where users look for it, beside the run dir's own metrics files.

`report_to` (top level of the config) lists the trackers: `tensorboard` (default; offline event
files under `RUN_DIR/tensorboard/<stage>/<name>/`, read by TensorBoard or its
`EventAccumulator`), `wandb` and `mlflow` (used when their packages are installed; their own
environment variables choose the project, server and credentials, which fashionfuse never
writes anywhere). Training logs loss, learning rate, tokens/s and padding per step; the search
logs each trial's score and weights.
"""

from __future__ import annotations

from pathlib import Path

from .config import RunConfig
from .errors import UserError
from .rundir import RunLayout


class Tracker:
    """One stage's metrics stream (`stage` train or search, `name` the adapter or the search)."""

    def __init__(self, cfg: RunConfig, stage: str, name: str, resume_step: int = 0):
        self.sinks = []
        run_name = f"{Path(cfg.run_dir).name}-{stage}-{name}"
        for kind in cfg.report_to:
            if kind == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                folder = RunLayout(cfg.run_dir).root / "tensorboard" / stage / name
                # a resumed run drops the events an interrupted one wrote after its checkpoint
                writer = SummaryWriter(str(folder), purge_step=resume_step or None)
                self.sinks.append(("tensorboard", writer))
            elif kind == "wandb":
                wandb = _require("wandb")
                self.sinks.append(("wandb", wandb.init(name=run_name, dir=cfg.run_dir,
                                                       reinit="create_new",
                                                       config={"stage": stage, "name": name})))
            elif kind == "mlflow":
                mlflow = _require("mlflow")
                self.sinks.append(("mlflow", mlflow.start_run(run_name=run_name, nested=True)))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Scalars at `step` (None values are skipped)."""
        values = {k: float(v) for k, v in metrics.items() if v is not None}
        for kind, sink in self.sinks:
            if kind == "tensorboard":
                for key, value in values.items():
                    sink.add_scalar(key, value, step)
            elif kind == "wandb":
                sink.log(values, step=step)
            elif kind == "mlflow":
                import mlflow

                mlflow.log_metrics(values, step=step, run_id=sink.info.run_id)

    def close(self) -> None:
        for kind, sink in self.sinks:
            if kind == "tensorboard":
                sink.close()
            elif kind == "wandb":
                sink.finish()
            elif kind == "mlflow":
                import mlflow

                mlflow.end_run()
        self.sinks = []


def _require(package: str):
    try:
        return __import__(package)
    except ImportError:
        raise UserError(f"report_to: {package} is not installed (pip install {package}, or "
                        f"remove it from report_to)") from None
