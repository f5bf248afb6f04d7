"""Episode videos for ``dvla eval --video``: every camera side by side, one file each.

A success rate says how often a policy fails, not how; watching the failed episodes
does. Files are named by task, episode index and outcome so a directory listing already
sorts them (``task03_ep0042_fail.mp4``). OpenCV writes them: it ships with the
``[libero]`` extra, and is imported only when videos are asked for, so a toy install
does not need it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dvla import logs
from dvla.data import Trajectory
from dvla.errors import ConfigError, DvlaError

log = logs.get(__name__)

FPS = 10
#: MPEG-4 part 2: every OpenCV build can write it without an external encoder.
FOURCC = "mp4v"


def _cv2() -> Any:
    """The ``cv2`` module, imported on first use.

    Raises:
        ConfigError: OpenCV is not installed.
    """
    try:
        import cv2
    except ImportError:
        raise ConfigError(
            "--video needs opencv-python (pip install opencv-python-headless)"
        ) from None
    return cv2


def episode_path(directory: Path, task_id: int, episode: int, success: bool) -> Path:
    """Where the video of one evaluation episode goes."""
    outcome = "success" if success else "fail"
    return directory / f"task{task_id:02d}_ep{episode:04d}_{outcome}.mp4"


def side_by_side(images: Mapping[str, np.ndarray]) -> np.ndarray:
    """Frames of every camera joined left to right: uint8 ``[T, H, sum(W), 3]``.

    Cameras of different heights are padded with black at the bottom, so a wrist camera
    smaller than the agent view still fits one frame.
    """
    if not images:
        raise ValueError("no camera images to write")
    frames = list(images.values())
    height = max(f.shape[1] for f in frames)
    padded = [
        np.pad(f, ((0, 0), (0, height - f.shape[1]), (0, 0), (0, 0))) if f.shape[1] < height else f
        for f in frames
    ]
    return np.concatenate(padded, axis=2)


def write_video(path: Path, frames: np.ndarray, fps: int = FPS) -> None:
    """Write RGB uint8 ``frames[T, H, W, 3]`` to ``path`` as an MPEG-4 video.

    Raises:
        ConfigError: OpenCV is missing.
        DvlaError: OpenCV cannot open ``path`` for writing (bad directory, no encoder).
    """
    cv2 = _cv2()
    t, h, w, _ = frames.shape
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*FOURCC), float(fps), (w, h))
    if not writer.isOpened():
        raise DvlaError(f"--video: OpenCV cannot write {path} (codec {FOURCC}, {w}x{h})")
    try:
        for i in range(t):
            # OpenCV expects BGR; simulators render RGB.
            writer.write(np.ascontiguousarray(frames[i, :, :, ::-1]))
    finally:
        writer.release()


class EpisodeVideos:
    """Writes each finished evaluation episode to ``directory``; an ``on_episode`` hook.

    Works on whole trajectories, which already hold every frame an action was taken on,
    so evaluation needs no per-step recording.
    """

    def __init__(self, directory: Path, fps: int = FPS) -> None:
        """Check OpenCV and create ``directory`` now, before any episode runs.

        Raises:
            ConfigError: OpenCV is missing or ``directory`` cannot be created.
        """
        _cv2()
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(
                f"--video {directory}: cannot create it ({err.strerror or err})"
            ) from None
        self.directory = directory
        self.fps = fps
        self.written: list[Path] = []

    def __call__(self, traj: Trajectory) -> None:
        """Write ``traj``; its ``group_id`` is the episode index in evaluation."""
        path = episode_path(self.directory, traj.task_id, traj.group_id, traj.success)
        write_video(path, side_by_side(traj.images), self.fps)
        self.written.append(path)
        log.debug("episode video written", path=str(path), frames=traj.length)
