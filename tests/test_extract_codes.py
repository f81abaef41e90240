"""extract_codes: a real Ray actor pool over real prep shards, with a (random) nano tokenizer export."""
import shutil

import numpy as np
import pytest
import ray
from PIL import Image

from configs.loading import load_config
from jobs import checkpoints, code_shards, extract_codes
from pipeline import paths, storage, tracking
from pipeline.manifest import read_manifest, write_manifest
from pipeline.stages import stage_fingerprint

NANO = ["tokenizer.encoder_size=nano", "tokenizer.decoder_size=nano", "tokenizer.image_size=32",
        "tokenizer.pixel_channels=16", "tokenizer.channel_mult=[1,2,2]", "tokenizer.num_res_blocks=1",
        "tokenizer.z_channels=32", "tokenizer.cnn_norm_groups=8", "tokenizer.levels=[1,1,2,4,8]",
        "tokenizer.codebook_size=64", "tokenizer.num_scales=2", "tokenizer.vf_align=none"]


def make_cfg(work_dir, *extra):
    return load_config(None, [
        f"work_dir={work_dir}", "data.image_size=32", "data.synthetic.num_classes=4",
        "data.synthetic.train_per_class=12", "data.synthetic.val_per_class=2", "data.samples_per_shard=16",
        "data.prep_tasks=1", *NANO, "extract.augment=flip", "extract.batch_size=16",
        "extract.num_actors=2", *extra])


@pytest.fixture(scope="module")
def ray_local():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def upstream(ray_local, tmp_path_factory):
    """Real prep shards + a train_tokenizer export (random nano weights, the real export format)."""
    from data_prep import prepare
    from models.tokenizer import ResTok

    cfg = make_cfg(tmp_path_factory.mktemp("upstream"))
    prepare.run(cfg)
    tok_dir = paths.stage_dir(cfg, "train_tokenizer")
    state = ResTok(checkpoints.tokenizer_config(cfg)).state_dict()
    checkpoints.write_export(tok_dir, "tokenizer", state, state, cfg)
    write_manifest(tok_dir, "train_tokenizer", stage_fingerprint(cfg, "train_tokenizer"), complete=True,
                   codebook_size=64, levels=[1, 1, 2, 4, 8])
    return cfg


def copy_upstream(upstream, cfg):
    for stage in ("prep", "train_tokenizer"):
        shutil.copytree(paths.stage_dir(upstream, stage), paths.stage_dir(cfg, stage))
    return cfg


@pytest.mark.slow
def test_deterministic_counts_match_and_killed_run_resumes(upstream, tmp_path, monkeypatch):
    first = extract_codes.run(copy_upstream(upstream, make_cfg(tmp_path / "a")), run_id=None)
    prep = read_manifest(paths.stage_dir(upstream, "prep"))
    assert first["counts"]["train"] == sum(s["count"] for s in prep["splits"]["train"]["shards"]) == 48
    assert first["code_shape"] == [2, 16] and first["dtype"] == "int16"
    assert first["tokenizer_sha256"] == storage.sha256_url(
        storage.join(paths.stage_dir(upstream, "train_tokenizer"), "tokenizer_ema.safetensors"))
    codes, classes = code_shards.load_split(paths.stage_dir(make_cfg(tmp_path / "a"), "extract_codes"))
    run = tracking.client_for(paths.tracking_uri(make_cfg(tmp_path / "a"))).get_run(first["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["codes_train"] == 48
    assert run.data.params["extract.augment"] == "flip"
    assert codes.shape == (48, 2, 16) and codes.dtype == np.int16 and set(classes) == {0, 1, 2, 3}

    # Killed after one shard (one actor, test-only exit): the rerun finishes the rest.
    killed = copy_upstream(upstream, make_cfg(tmp_path / "b", "extract.num_actors=1"))
    monkeypatch.setenv(extract_codes.TEST_EXIT_ENV, "1")
    with pytest.raises(ray.exceptions.RayError):
        extract_codes.run(killed)
    out_dir = paths.stage_dir(killed, "extract_codes")
    receipts = [n for n in storage.filesystem(out_dir)[0].ls(out_dir, detail=False) if n.endswith(".json")]
    assert len(receipts) == 1 and read_manifest(out_dir) is None
    monkeypatch.delenv(extract_codes.TEST_EXIT_ENV)
    resumed = extract_codes.run(killed)
    # Same codes as the uninterrupted run, byte for byte (deterministic extraction).
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in first["shards"]]
    assert resumed["fingerprint"] == stage_fingerprint(killed, "extract_codes")
    # A rerun of a complete stage is a no-op returning the manifest.
    assert extract_codes.run(killed)["written_at"] == resumed["written_at"]


def test_tencrop_views_are_five_crops_and_their_flips():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    views = extract_codes.views(image, 32, "tencrop")
    assert len(views) == 10 and all(v.size == (32, 32) for v in views)
    for crop, flipped in zip(views[:5], views[5:]):
        assert np.array_equal(np.asarray(crop)[:, ::-1], np.asarray(flipped))
    assert len(extract_codes.views(image, 32, "flip")) == 2
    assert len(extract_codes.views(image, 32, "none")) == 1
    with pytest.raises(ValueError, match="extract.augment"):
        extract_codes.views(image, 32, "sixcrop")
