import pytest

from data_pipelines.config import nearest_frames
from dit.config import ConfigError, load_config


def test_defaults_and_dotted_overrides(tmp_path):
    cfg = load_config(None, ["train.steps=200", "data.shards=data/{00000..00003}.tar", "data.frames=9",
                             "data.height=32", "data.width=48", "train.batch_size=4", "train.output_dir=runs/x",
                             "train.seed=7", "train.lr=3e-4", "model.patch_size=[1,1,1]"])
    assert cfg.train.steps == 200 and cfg.data.shards == "data/{00000..00003}.tar"
    assert (cfg.data.frames, cfg.data.height, cfg.data.width) == (9, 32, 48)
    assert cfg.train.batch_size == 4 and cfg.train.output_dir == "runs/x" and cfg.train.seed == 7
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.model.patch_size == [1, 1, 1]


def test_yaml_file_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  steps: 5\n  lr: 1\ndata:\n  frames: 17\n")
    cfg = load_config(p, ["train.steps=6"])
    assert cfg.train.steps == 6 and cfg.train.lr == 1.0 and cfg.data.frames == 17


@pytest.mark.parametrize("override,key", [
    ("train.stepz=3", "train.steps"),  # suggests the close key
    ("trian.steps=3", "trian"),
    ("data.frames=16", "data.frames"),
    ("data.height=30", "data.height"),
    ("train.steps=abc", "train.steps"),
    ("train.batch_size=0", "train.batch_size"),
    ("model.preset=DiT-Q/2", "model.preset"),
    ("text.encoder=hf", "text.path"),
    ("data.width=40", "data.width"),  # 40 is a multiple of 8 but not of 8 x patch 2
    ("model.gradient_checkpointing_every=0", "model.gradient_checkpointing_every"),
    ("text.dtype=fp8", "text.dtype"),
    ("vae.dtype=float16", "vae.dtype"),
    ("vae.dtype=bf16", "vae.dtype"),  # our CausalVAE stays fp32
])
def test_bad_keys_and_values_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_yaml_booleans_in_string_keys() -> None:
    """`no` is a documented value of train.mixed_precision that YAML reads as false; elsewhere the error says why."""
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert load_config(None, ["train.mixed_precision='no'"]).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match=r"text\.encoder: expected a string, got False \(YAML reads yes/no"):
        load_config(None, ["text.encoder=off"])


def test_frames_error_names_nearest_valid():
    with pytest.raises(ConfigError, match=r"\[13, 17\]"):
        load_config(None, ["data.frames=16"])
    assert nearest_frames(16) == [13, 17] and nearest_frames(17) == [17]


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nope.yaml")


def test_buckets_must_fit_the_model_patch() -> None:
    ok = load_config(None, ["data.buckets.enabled=true", "model.patch_size=[1,2,2]", "data.buckets.multiple=16"])
    assert ok.data.buckets.enabled
    with pytest.raises(ConfigError, match=r"data.buckets.patch: \[1, 2, 2\] differs .* \[1, 4, 4\]"):
        load_config(None, ["data.buckets.enabled=true", "model.patch_size=[1,4,4]"])
    with pytest.raises(ConfigError, match="data.buckets.multiple: 16 is not a multiple of 32"):
        load_config(None, ["data.buckets.enabled=true", "model.patch_size=[1,4,4]", "data.buckets.patch=[1,4,4]"])
    with pytest.raises(ConfigError, match=r"data.buckets.frames: \[1, 33\]"):
        load_config(None, ["data.buckets.enabled=true", "model.patch_size=[2,2,2]", "data.buckets.patch=[2,2,2]",
                           "data.frames=5", "data.buckets.frames=[1,5,33]"])
    # off (the default): the bucket settings are not checked against the model
    assert not load_config(None, ["model.patch_size=[1,4,4]", "data.height=64", "data.width=64"]).data.buckets.enabled
