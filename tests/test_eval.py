"""``dvla eval``: scoring saved weights per task, its error lines, and episode videos."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from dvla.cli import load_and_check, main
from dvla.data import Trajectory
from dvla.pipeline.evaluate import format_table, run_eval
from dvla.pipeline.video import EpisodeVideos, episode_path

REPO = Path(__file__).resolve().parents[1]
TOY = str(REPO / "configs" / "toy.yaml")
# Small and fast: 4 environments, short episodes (the toy's limit is 8 steps).
SETS = ["--set", "pipeline.num_envs=4"]
VIDEO_NAME = re.compile(r"task(\d{2})_ep(\d{4})_(success|fail)\.mp4")


def _drop_handlers() -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_dvla", False):
            root.removeHandler(h)
            h.close()


@pytest.fixture(autouse=True)
def _drop_dvla_log_handlers() -> Iterator[None]:
    """The CLI installs root log handlers bound to the captured stderr; remove them after."""
    yield
    _drop_handlers()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-iteration toy run: its policy.pt, final checkpoint and the directory itself."""
    d = tmp_path_factory.mktemp("evalrun") / "run"
    code = main(
        [
            "run",
            TOY,
            "--set",
            "run.max_iterations=2",
            "--set",
            "run.eval_episodes=0",
            "--set",
            "run.target_success=null",
            "--set",
            "run.log_level=error",
            "--set",
            "pipeline.num_envs=16",
            "--run-dir",
            str(d),
        ]
    )
    _drop_handlers()
    assert code == 0
    assert (d / "policy.pt").is_file()
    assert (d / "checkpoints" / "ckpt-000000002.pt").is_file()
    return d


def _eval(
    capsys: pytest.CaptureFixture[str], checkpoint: Path | str, *extra: str
) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["eval", TOY, "--checkpoint", str(checkpoint), *SETS, *extra])
    out, err = capsys.readouterr()
    return code, out, err


def _fails(capsys: pytest.CaptureFixture[str], checkpoint: Path | str, *extra: str) -> str:
    """Run ``dvla eval``, expecting exit 2 and one ``error:`` line; return that line."""
    code, _, err = _eval(capsys, checkpoint, *extra)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


# ------------------------------------------------------------------ results
def test_table_and_json(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json = tmp_path / "eval.json"
    code, out, err = _eval(
        capsys, run_dir / "policy.pt", "--episodes", "7", "--json", str(out_json)
    )
    assert code == 0, err
    rows = out.strip().splitlines()
    assert rows[0].split() == ["task", "instruction", "episodes", "successes", "rate"]
    assert len(rows) == 1 + 3 + 1  # header, one row per toy task, total
    assert [r.split()[0] for r in rows[1:]] == ["0", "1", "2", "all"]
    assert "pick up the red block" in rows[1]
    assert rows[-1].split()[1:3] == ["toy", "7"]

    doc = json.loads(out_json.read_text())
    assert doc["config"] == TOY
    assert doc["checkpoint"] == str(run_dir / "policy.pt")
    assert doc["simulator"] == "toy"
    assert doc["suite"] is None
    assert doc["episodes"] == 7
    per_task = doc["per_task"]
    # Episode k runs task k mod 3: tasks 0, 1, 2 get 3, 2, 2 of the 7.
    assert {k: v["episodes"] for k, v in per_task.items()} == {"0": 3, "1": 2, "2": 2}
    assert sum(v["episodes"] for v in per_task.values()) == 7
    successes = sum(v["successes"] for v in per_task.values())
    assert doc["success_rate"] == pytest.approx(successes / 7)
    assert per_task["1"]["instruction"] == "pick up the green block"


def test_policy_checkpoint_and_run_dir_score_the_same(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = run_dir / "checkpoints" / "ckpt-000000002.pt"
    docs = []
    for i, source in enumerate([run_dir / "policy.pt", ckpt, run_dir]):
        path = tmp_path / f"{i}.json"
        code, _, err = _eval(capsys, source, "--episodes", "9", "--json", str(path))
        assert code == 0, err
        docs.append(json.loads(path.read_text()))
    assert docs[1]["checkpoint"] == str(ckpt)
    assert docs[2]["checkpoint"] == str(run_dir / "policy.pt")
    scores = [{k: v for k, v in d.items() if k != "checkpoint"} for d in docs]
    assert scores[0] == scores[1] == scores[2]


def test_same_weights_take_the_same_actions(run_dir: Path) -> None:
    """Token by token, so the check does not rest on an untrained policy's 0% success."""
    cfg = load_and_check(TOY, ["pipeline.num_envs=4"])

    def actions(checkpoint: Path) -> dict[int, np.ndarray]:
        seen: dict[int, np.ndarray] = {}

        def record(traj: Trajectory) -> None:
            seen[traj.group_id] = traj.tokens

        result = run_eval(cfg, TOY, checkpoint, 6, 4, record)
        assert result["episodes"] == 6
        return seen

    from_policy = actions(run_dir / "policy.pt")
    from_ckpt = actions(run_dir / "checkpoints" / "ckpt-000000002.pt")
    assert sorted(from_policy) == list(range(6))
    for k, tokens in from_policy.items():
        np.testing.assert_array_equal(tokens, from_ckpt[k])

    # Other weights act otherwise: the file really was loaded.
    state = torch.load(run_dir / "policy.pt", map_location="cpu", weights_only=True)
    g = torch.Generator().manual_seed(0)
    other = {
        k: v + 0.5 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
        for k, v in state.items()
    }
    torch.save(other, run_dir.parent / "other.pt")
    from_other = actions(run_dir.parent / "other.pt")
    assert any(not np.array_equal(from_policy[k], from_other[k]) for k in range(6))


def test_default_episodes(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "e.json"
    code, _, err = _eval(capsys, run_dir, "--set", "run.eval_episodes=5", "--json", str(path))
    assert code == 0, err
    assert json.loads(path.read_text())["episodes"] == 5
    code, _, err = _eval(
        capsys, run_dir, "--set", "run.eval_episodes=0", "--envs", "16", "--json", str(path)
    )
    assert code == 0, err
    assert json.loads(path.read_text())["episodes"] == 50


def test_table_clips_long_instructions() -> None:
    long = "put the black bowl on the plate that is next to the cookie box on the wooden cabinet"
    table = format_table(
        {
            "simulator": "libero",
            "suite": "libero_spatial",
            "episodes": 4,
            "success_rate": 0.25,
            "per_task": {
                0: {"instruction": long, "episodes": 2, "successes": 1, "success_rate": 0.5},
                1: {"instruction": "short", "episodes": 2, "successes": 0, "success_rate": 0.0},
            },
        }
    )
    rows = table.splitlines()
    assert len(rows) == 4
    assert long[:57] + "..." in rows[1]
    assert long not in table
    assert "libero libero_spatial" in rows[-1]
    assert rows[-1].split()[-3:] == ["4", "1", "25.0%"]
    assert len({len(r) for r in rows}) == 1  # columns line up


# ------------------------------------------------------------------ bad input
def test_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.pt"
    line = _fails(capsys, missing)
    assert str(missing) in line
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    line = _fails(capsys, empty_dir)
    assert str(empty_dir) in line and "policy.pt" in line


def test_other_architecture(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = torch.load(run_dir / "policy.pt", map_location="cpu", weights_only=True)
    first = next(iter(state))

    renamed = dict(state)
    renamed["renamed." + first] = renamed.pop(first)
    path = tmp_path / "renamed.pt"
    torch.save(renamed, path)
    line = _fails(capsys, path)
    assert str(path) in line and repr(first) in line and repr("renamed." + first) in line

    key = next(k for k, v in state.items() if v.dim() >= 1)
    wrong = dict(state)
    wrong[key] = torch.zeros(wrong[key].shape[0] + 1, *wrong[key].shape[1:])
    path = tmp_path / "shape.pt"
    torch.save(wrong, path)
    line = _fails(capsys, path)
    assert str(path) in line and repr(key) in line and "shape" in line

    # Same backend, other option: the linear head has a logit per bin, not one per dim.
    line = _fails(capsys, run_dir, "--set", "model.head=linear")
    assert "tiny-vla" in line and str(run_dir / "policy.pt") in line


def test_not_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file at all")
    line = _fails(capsys, garbage)
    assert str(garbage) in line

    a_list = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], a_list)
    line = _fails(capsys, a_list)
    assert str(a_list) in line and "list" in line


def test_tampered_checkpoint(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    payload = torch.load(
        run_dir / "checkpoints" / "ckpt-000000002.pt", map_location="cpu", weights_only=True
    )
    name = next(k for k, v in payload["model"].items() if v.is_floating_point())
    payload["model"][name] = payload["model"][name] + 1.0
    path = tmp_path / "ckpt-000000002.pt"
    torch.save(payload, path)
    line = _fails(capsys, path)
    assert str(path) in line and "digest" in line


@pytest.mark.parametrize("flag", ["--episodes", "--envs"])
def test_counts_must_be_positive(
    run_dir: Path, flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _fails(capsys, run_dir, flag, "0")
    assert flag in line


def test_unwritable_json(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "no" / "such" / "dir" / "e.json"
    line = _fails(capsys, run_dir, "--episodes", "1", "--json", str(target))
    assert "--json" in line


# ------------------------------------------------------------------ videos
def _read_video(path: Path) -> tuple[list[np.ndarray], int, int]:
    import cv2

    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened(), path
    width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
    height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    return frames, width, height


def test_video_per_episode(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    videos = tmp_path / "videos"
    out_json = tmp_path / "e.json"
    code, _, err = _eval(
        capsys, run_dir, "--episodes", "5", "--video", str(videos), "--json", str(out_json)
    )
    assert code == 0, err
    files = sorted(videos.iterdir())
    names = [VIDEO_NAME.fullmatch(f.name) for f in files]
    assert all(names), [f.name for f in files]
    got = sorted((int(m[2]), int(m[1])) for m in names if m)
    assert got == [(k, k % 3) for k in range(5)]  # episode k runs task k mod 3
    doc = json.loads(out_json.read_text())
    won = sum(1 for m in names if m and m[3] == "success")
    assert won == sum(v["successes"] for v in doc["per_task"].values())
    for f in files:
        assert f.stat().st_size > 0
        frames, width, height = _read_video(f)
        assert 1 <= len(frames) <= 8  # the toy's episode limit
        assert (width, height) == (32, 32)


def test_video_cameras_side_by_side(tmp_path: Path) -> None:
    t, h, w = 5, 16, 24
    red = np.zeros((t, h, w, 3), np.uint8)
    red[..., 0] = 255  # RGB red
    wrist = np.zeros((t, h - 4, w, 3), np.uint8)  # a smaller camera is padded, not refused
    wrist[..., 2] = 255  # RGB blue
    traj = Trajectory(
        producer="eval",
        seq=1,
        group_id=42,
        task_id=3,
        init_state_id=0,
        instruction="x",
        images={"agentview": red, "wrist": wrist},
        proprio=np.zeros((t, 3), np.float32),
        tokens=np.zeros((t, 7), np.int64),
        logprobs=np.zeros((t, 7), np.float32),
        versions=np.zeros(t, np.int64),
        rewards=np.zeros(t, np.float32),
        success=True,
    )
    writer = EpisodeVideos(tmp_path / "v")
    writer(traj)
    path = episode_path(tmp_path / "v", 3, 42, True)
    assert path.name == "task03_ep0042_success.mp4"
    assert writer.written == [path]
    frames, width, height = _read_video(path)
    assert len(frames) == t
    assert (width, height) == (2 * w, h)
    # BGR on disk: the left (red) half is high in channel 2, the right (blue) in channel 0.
    left, right = frames[0][: h - 4, :w].mean(axis=(0, 1)), frames[0][: h - 4, w:].mean(axis=(0, 1))
    assert left[2] > 200 and left[0] < 60
    assert right[0] > 200 and right[2] < 60


def test_video_without_opencv(
    run_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 now raises ImportError
    line = _fails(capsys, run_dir, "--video", str(tmp_path / "v"))
    assert "opencv-python" in line
    assert not (tmp_path / "v").exists()
