"""Where training logs go besides `log_history.json`: `training.report_to`, the logging
integrations of transformers' Trainer (TensorBoard, Weights & Biases, MLflow, Trackio...).

`training.report_to` is execution only (it decides where the logs are shown, not what is
trained), so it is in no training key. Unset, it is `tensorboard` when the `tensorboard`
package is importable and nothing otherwise; TensorBoard's event files are written to
`training/<key>/runs/` (on remote storage: in the local work folder, uploaded with the
adapter). Every other integration is configured the way its own package documents (for
W&B `WANDB_API_KEY`, `WANDB_PROJECT`; for MLflow `MLFLOW_TRACKING_URI`...): croco passes
the name to the Trainer and never reads, logs or stores those settings.

A name whose package is not installed fails before any model loads (`croco run` checks it
with the other packages in `croco.preflight`; `check_report_to` here, which training calls
first too), in one line naming `training.report_to` and the `pip install` that fixes it.
This module imports nothing heavy: the config and the pre-run checks read it.
"""

from __future__ import annotations

import importlib.util

from croco.errors import MissingPackageError

#: Each name `training.report_to` accepts -> (the module it needs, what to pip install).
REPORTERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"),
    "comet_ml": ("comet_ml", "comet_ml"),
    "neptune": ("neptune", "neptune"),
    "clearml": ("clearml", "clearml"),
    "dvclive": ("dvclive", "dvclive"),
    "swanlab": ("swanlab", "swanlab"),
    "codecarbon": ("codecarbon", "codecarbon"),
    "azure_ml": ("azureml", "azureml-core"),
    "dagshub": ("dagshub", "dagshub"),
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def normalize(value: str | list[str] | None) -> list[str] | None:
    """A config value as a list of names (None: unset, `[]`: none); raises ValueError on
    a name croco does not know."""
    if value is None:
        return None
    names = [value] if isinstance(value, str) else list(value)
    names = [n.strip() for n in names if n.strip()]
    if names == ["none"] or not names:
        return []
    unknown = [n for n in names if n not in REPORTERS]
    if unknown:
        raise ValueError(f"unknown logging integration {', '.join(map(repr, unknown))}: use "
                         f"none or any of {', '.join(REPORTERS)}")
    return list(dict.fromkeys(names))


def resolve(value: str | list[str] | None) -> list[str]:
    """The integrations a run reports to: `value`'s names; unset, `tensorboard` when its
    package is installed, else none."""
    names = normalize(value)
    if names is None:
        return ["tensorboard"] if _installed("tensorboard") else []
    return names


def check_report_to(value: str | list[str] | None, *, field: str = "training.report_to") -> None:
    """Raise a one-line `MissingPackageError` for the first integration whose package is
    not installed."""
    for name in normalize(value) or []:
        module, requirement = REPORTERS[name]
        if not _installed(module):
            raise MissingPackageError(
                f"{field}: {name} needs the {module} package, which is not installed: "
                f"pip install {requirement} (or set {field}: none)")
