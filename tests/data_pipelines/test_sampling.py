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
