import random

import pytest

from data_pipelines.sampling import TooShort, frame_indices


def test_start_without_rng():
    assert frame_indices(100, 5, 1) == [0, 1, 2, 3, 4]
    assert frame_indices(100, 5, 3) == [0, 3, 6, 9, 12]
    assert frame_indices(1, 1, 4) == [0]


def test_random_start_stays_inside_and_covers_all_starts():
    rng = random.Random(0)
    starts = set()
    for _ in range(500):
        idx = frame_indices(20, 4, 2, rng)  # span 7: starts 0..13
        assert idx == [idx[0] + 2 * i for i in range(4)] and idx[-1] <= 19
        starts.add(idx[0])
    assert starts == set(range(14))


def test_exact_fit_and_too_short():
    assert frame_indices(17, 9, 2, random.Random(1)) == list(range(0, 17, 2))
    with pytest.raises(TooShort, match="16 frames; 9 frames at stride 2 need 17"):
        frame_indices(16, 9, 2)
    with pytest.raises(ValueError):
        frame_indices(10, 0, 1)


def test_fps_indices_retime_by_the_source_rate():
    from data_pipelines.sampling import FramePicker, fps_indices

    assert fps_indices(17, 25.0, 5, 12.5) == [0, 2, 4, 6, 8]  # half the rate: every other frame
    assert fps_indices(30, 29.97, 5, 12.5) == [0, 2, 5, 7, 10]  # 2.3976 frames per step, nearest frames
    assert fps_indices(9, 8.0, 5, 16.0) == [0, 0, 1, 2, 2]  # a higher target rate repeats frames
    rng = random.Random(0)
    for _ in range(50):  # a random start keeps every index inside the clip and the spacing at the rate
        idx = fps_indices(40, 25.0, 9, 10.0, rng)
        assert 0 <= idx[0] and idx[-1] <= 39 and all(2 <= b - a <= 3 for a, b in zip(idx, idx[1:]))
    with pytest.raises(TooShort, match=r"9 frames at 29.97 fps .* need 10.6 source frames"):
        fps_indices(9, 29.97, 5, 12.5)
    with pytest.raises(ValueError, match="no frame rate"):
        fps_indices(9, 0.0, 5, 12.5)
    assert FramePicker(5, fps=12.5)(17, 25.0) == [0, 2, 4, 6, 8]
    assert FramePicker(3, stride=4)(17, 25.0) == [0, 4, 8]
