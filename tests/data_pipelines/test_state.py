import io
import itertools
from pathlib import Path

import pytest
import torch

from data_pipelines.loader import build_loader
from data_pipelines.state import merge_states
from dit.config import DataConfig


def take(loader, n: int, close: bool = True) -> list[dict]:
    """The first n batches of a new iteration; then stop the loader's workers (forking new workers while an
    old loader's queue threads run can hang them)."""
    out = list(itertools.islice(iter(loader), n))
    if close:
        loader.close()
    return out


def roundtrip(state: dict) -> dict:
    """Through torch.save / torch.load(weights_only=True), as a checkpoint stores it."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["key"] == y["key"] and x["caption"] == y["caption"]
        assert torch.equal(x["video"], y["video"])


def cfg_for(shards, workers: int, **kw) -> DataConfig:
    return DataConfig(shards=str(Path(shards[0]).parent), frames=5, height=16, width=16, num_workers=workers,
                      shuffle_buffer=8, **kw)


@pytest.mark.parametrize("workers,k", [(0, 7), (2, 7)])
def test_resume_infinite_equals_uninterrupted(synthetic_shards, workers, k):
    """Stop after k batches, restore into a fresh loader: the next batches (across an epoch end) are the same."""
    cfg, more = cfg_for(synthetic_shards, workers), 12  # 15 batches per epoch: k + more crosses into epoch 1
    full = take(build_loader(cfg, 4, seed=3), k + more)
    first = build_loader(cfg, 4, seed=3)
    head = take(first, k)
    state = roundtrip(first.state_dict())
    assert state["stats"]["seen"] == first.stats.seen >= 4 * k
    resumed = build_loader(cfg, 4, seed=3)
    resumed.load_state_dict(state)
    tail = take(resumed, more)
    assert_same_batches(head, full[:k])
    assert_same_batches(tail, full[k:])
    assert resumed.stats.seen == sum(b["seen"] for b in full)
    keys = [key for b in full for key in b["key"]]
    assert len(set(keys[:60])) == 60  # the first epoch holds every clip once


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_then_next_epoch(synthetic_shards, workers):
    cfg = cfg_for(synthetic_shards, workers)
    make = lambda: build_loader(cfg, 4, seed=1, infinite=False, drop_last=False)  # noqa: E731
    ref = make()
    epoch0, epoch1 = list(ref), list(ref)
    ref.close()
    first = make()
    head = take(first, 5)
    resumed = make()
    resumed.load_state_dict(roundtrip(first.state_dict()))
    rest = list(resumed)
    assert_same_batches(head + rest, epoch0)
    assert resumed.stats.as_dict() == {"seen": 60, "ok": 60, "bad": {}}
    assert_same_batches(list(resumed), epoch1)  # the next iter() is the next epoch, not a replay
    resumed.close()
    done = make()  # a state taken between epochs starts the next epoch
    list(done)
    done.close()
    again = make()
    again.load_state_dict(done.state_dict())
    assert_same_batches(list(again), epoch1)
    again.close()


def test_changed_world_size_continues_with_the_next_epoch(synthetic_shards, caplog):
    cfg = cfg_for(synthetic_shards, 0)
    first = build_loader(cfg, 4, seed=2)
    take(first, 3)
    state = first.state_dict()
    resumed = build_loader(cfg, 4, rank=1, world_size=2, seed=2, infinite=False)
    resumed.load_state_dict(state)
    expected = build_loader(cfg, 4, rank=1, world_size=2, seed=2, infinite=False)
    expected.set_epoch(1)  # epoch 0 was begun: go on with epoch 1, rank 1's half of it
    got = [k for b in resumed for k in b["key"]]
    assert got == [k for b in expected for k in b["key"]] and 0 < len(got) < 60
    assert "different world_size" in caplog.text


def test_state_of_another_rank_is_refused_and_merge_joins_ranks(synthetic_shards):
    cfg = cfg_for(synthetic_shards, 0)
    states, streams = [], []
    for rank in (0, 1):
        loader = build_loader(cfg, 4, rank=rank, world_size=2, seed=2)
        streams.append(iter(loader))
        list(itertools.islice(streams[-1], 2))
        states.append(loader.state_dict())
    with pytest.raises(ValueError, match="not rank 1.*merge_states"):
        build_loader(cfg, 4, rank=1, world_size=2, seed=2).load_state_dict(states[0])
    merged = roundtrip(merge_states(states))
    assert [r["rank"] for r in merged["ranks"]] == [0, 1]
    for rank in (0, 1):
        resumed = build_loader(cfg, 4, rank=rank, world_size=2, seed=2)
        resumed.load_state_dict(merged)
        assert_same_batches(take(resumed, 2), list(itertools.islice(streams[rank], 2)))
    with pytest.raises(ValueError, match="not a loader state"):
        resumed.load_state_dict({"step": 3})


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_with_two_weighted_datasets(synthetic_shards, workers):
    datasets = [{"shards": ",".join(synthetic_shards[:2]), "weight": 2.0}, {"shards": ",".join(synthetic_shards[2:])}]
    cfg = DataConfig(datasets=datasets, frames=1, height=16, width=16, num_workers=workers, shuffle_buffer=4)
    full = take(build_loader(cfg, 3, seed=4), 25)  # past the end of the smaller dataset's first epoch
    first = build_loader(cfg, 3, seed=4)
    take(first, 9)
    resumed = build_loader(cfg, 3, seed=4)
    resumed.load_state_dict(roundtrip(first.state_dict()))
    assert_same_batches(take(resumed, 16), full[9:])
