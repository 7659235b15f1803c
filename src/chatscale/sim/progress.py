"""A progress bar on stderr (tqdm), or a silent stand-in when not wanted."""

from __future__ import annotations

from tqdm import tqdm


def progress(total: float, desc: str, show: bool, unit: str = "req") -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, disable=not show, mininterval=1.0, smoothing=0.1)
