"""Progress bars for long library work: rich bars on a terminal, plain tqdm lines in logs."""

from __future__ import annotations

import sys
import warnings


def progress_bar(total: int, desc: str, unit: str = "it", initial: int = 0):
    """A tqdm-compatible bar (update/close); drawn with rich when stderr is a terminal."""
    if sys.stderr.isatty():
        try:
            from tqdm import TqdmExperimentalWarning
            from tqdm.rich import tqdm as rich_tqdm

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", TqdmExperimentalWarning)
                return rich_tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=False)
        except ImportError:
            pass
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=False)
