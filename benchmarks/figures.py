"""The benchmark figures, each measured for Orthanc and Lightbox in the same run."""

from __future__ import annotations

from collections.abc import Callable

from bench import Bench
from fig_frames import figure_frames
from fig_latency import figure_metadata, figure_qido
from fig_memory import figure_memory
from fig_stow import figure_stow

FIGURES: dict[str, Callable[[Bench], None]] = {
    "stow": figure_stow,
    "frames": figure_frames,
    "metadata": figure_metadata,
    "qido": figure_qido,
    "memory": figure_memory,
}
