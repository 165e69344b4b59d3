from pathlib import Path

import pytest

from data_pipelines.shards import expand_shards


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    for i in range(4):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"")
    (tmp_path / "notes.md").write_text("not a shard")
    return tmp_path


def test_brace_pattern(shard_dir):
    assert expand_shards(f"{shard_dir}/{{00000..00002}}.tar") == [f"{shard_dir}/{i:05d}.tar" for i in range(3)]


def test_directory_lists_sorted_tars_only(shard_dir):
    assert expand_shards(str(shard_dir)) == [str(shard_dir / f"{i:05d}.tar") for i in range(4)]


def test_comma_list_mixes_forms_and_keeps_commas_inside_braces(shard_dir):
    spec = f"{shard_dir}/00003.tar,{shard_dir}/{{00000,00001}}.tar"
    assert expand_shards(spec) == [f"{shard_dir}/{i:05d}.tar" for i in (3, 0, 1)]


def test_list_file_with_comments_and_relative_paths(shard_dir):
    listing = shard_dir / "train.txt"
    listing.write_text(f"# train shards\n00001.tar\n\n{shard_dir}/00002.tar  # absolute\n{{00000..00000}}.tar\n")
    assert expand_shards(str(listing)) == [str(shard_dir / f"{i:05d}.tar") for i in (1, 2, 0)]


def test_pipe_urls_pass_through_unchecked(shard_dir):
    spec = f"pipe:curl -s http://host/{{0..1}}.tar,{shard_dir}/00000.tar"
    assert expand_shards(spec) == ["pipe:curl -s http://host/0.tar", "pipe:curl -s http://host/1.tar",
                                   f"{shard_dir}/00000.tar"]


def test_missing_paths_are_named(shard_dir):
    with pytest.raises(FileNotFoundError) as err:
        expand_shards(f"{shard_dir}/{{00002..00005}}.tar")
    msg = str(err.value)
    assert "2 of 4" in msg and f"{shard_dir}/00004.tar" in msg and f"{shard_dir}/00005.tar" in msg
    assert f"{shard_dir}/00002.tar" not in msg.split("do not exist")[1]
    with pytest.raises(FileNotFoundError, match="nowhere/x.tar"):
        expand_shards("nowhere/x.tar")


def test_no_shards_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="names no shards"):
        expand_shards(str(tmp_path))  # an empty directory
    with pytest.raises(ValueError, match="data.shards is empty"):
        expand_shards("")
