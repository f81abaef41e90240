"""extract_codes: a real Ray actor pool over real prep shards, with a (random) nano tokenizer export."""

import shutil

import numpy as np
import pytest
import ray
from conftest import nano_cfg, write_tokenizer_export
from PIL import Image

from data_prep import prepare
from infra import code_shards, paths, storage, tracking
from infra.manifest import read_manifest
from infra.stages import stage_fingerprint
from jobs import extract_codes


def make_cfg(work_dir, *extra):
    return nano_cfg(
        work_dir,
        "data.synthetic.train_per_class=12",
        "data.samples_per_shard=16",
        "extract.augment=flip",
        "extract.batch_size=16",
        "extract.num_actors=2",
        *extra,
    )


@pytest.fixture(scope="module")
def upstream(ray_local, tmp_path_factory):
    """Real prep shards + a train_tokenizer export (random nano weights, the real export format)."""
    cfg = make_cfg(tmp_path_factory.mktemp("upstream"))
    prepare.run(cfg)
    write_tokenizer_export(cfg)
    return cfg


def copy_upstream(upstream, cfg):
    for stage in ("prep", "train_tokenizer"):
        shutil.copytree(paths.stage_dir(upstream, stage), paths.stage_dir(cfg, stage))
    return cfg


def retrain_tokenizer(cfg, seed):
    """Replace the export with other random weights under the same config (same fingerprint)."""
    write_tokenizer_export(cfg, seed=seed)


def all_codes(cfg):
    out_dir = paths.stage_dir(cfg, "extract_codes")
    return {"train": code_shards.load_split(out_dir, "train")}


def assert_same_codes(cfg, clean_cfg):
    """Codes, classes and shard bytes equal those of a clean extraction."""
    got, want = all_codes(cfg), all_codes(clean_cfg)
    for split in want:
        assert np.array_equal(got[split][0], want[split][0]) and np.array_equal(got[split][1], want[split][1])

    def shas(c):
        return [s["sha256"] for s in read_manifest(paths.stage_dir(c, "extract_codes"))["shards"]]

    assert shas(cfg) == shas(clean_cfg)


@pytest.mark.slow
def test_deterministic_counts_match_and_killed_run_resumes(upstream, tmp_path, monkeypatch):
    first = extract_codes.run(copy_upstream(upstream, make_cfg(tmp_path / "a")), run_id=None)
    prep = read_manifest(paths.stage_dir(upstream, "prep"))
    assert first["counts"]["train"] == sum(s["count"] for s in prep["splits"]["train"]["shards"]) == 48
    assert first["code_shape"] == [2, 16] and first["dtype"] == "int16"
    assert first["tokenizer_sha256"] == storage.sha256_url(
        storage.join(paths.stage_dir(upstream, "train_tokenizer"), "tokenizer_ema.safetensors")
    )
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


def test_tencrop_views_are_the_releases():
    """The release (LlamaGen's extraction): ADM's centre crop at int(size x 1.1) (281 for 256,
    not 282), then torchvision's TenCrop: five crops, then five of the mirrored image."""
    from torchvision.transforms import TenCrop

    from data_prep.transforms import adm_center_crop

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 410, 3), dtype=np.uint8))
    views = extract_codes.views(image, 256, "tencrop")
    assert len(views) == 10 and all(v.size == (256, 256) for v in views)
    big = adm_center_crop(image, 281)
    assert big.size == (281, 281)
    for ours, theirs in zip(views, TenCrop(256)(big), strict=True):
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    # ADM's arithmetic: box-halve while the short side >= 2 x size, bicubic to round(x * scale),
    # crop at the floored centre.
    small = adm_center_crop(image, 64)  # 410x300 -> 205x150 -> 102x75 (box) -> 87x64 -> left 11
    halved = image.resize((205, 150), resample=Image.Resampling.BOX).resize((102, 75), Image.Resampling.BOX)
    expected = halved.resize((87, 64), resample=Image.Resampling.BICUBIC).crop((11, 0, 75, 64))
    assert np.array_equal(np.asarray(small), np.asarray(expected))
    assert len(extract_codes.views(image, 32, "flip")) == 2
    assert len(extract_codes.views(image, 32, "none")) == 1
    with pytest.raises(ValueError, match="extract.augment"):
        extract_codes.views(image, 32, "sixcrop")


ONE_ACTOR = "extract.num_actors=1"  # one actor process per extraction: the cheapest real pool


@pytest.fixture(scope="module")
def flip_codes(upstream, tmp_path_factory):
    """A complete augment=flip extraction with the upstream tokenizer (copied into each test)."""
    cfg = copy_upstream(upstream, make_cfg(tmp_path_factory.mktemp("flip"), ONE_ACTOR))
    extract_codes.run(cfg)
    return cfg


def copy_flip_codes(flip_codes, cfg):
    copy_upstream(flip_codes, cfg)
    shutil.copytree(paths.stage_dir(flip_codes, "extract_codes"), paths.stage_dir(cfg, "extract_codes"))
    return cfg


@pytest.mark.slow
def test_changed_augment_discards_stale_code_shards(upstream, flip_codes, tmp_path, monkeypatch, capsys):
    """Issue 19: code shards of another extract config are never reused by a resume."""
    work = tmp_path / "a"
    copy_flip_codes(flip_codes, make_cfg(work))
    # augment=none, run alone over the complete flip outputs, killed after its first shard.
    none = make_cfg(work, "extract.augment=none", ONE_ACTOR)
    monkeypatch.setenv(extract_codes.TEST_EXIT_ENV, "1")
    with pytest.raises(ray.exceptions.RayError):
        extract_codes.run(none)
    monkeypatch.delenv(extract_codes.TEST_EXIT_ENV)
    # The flip manifest no longer claims the half-rewritten directory.
    assert read_manifest(paths.stage_dir(none, "extract_codes")) is None
    assert "discarded 3 of 3 code shards: 3 made under another config" in capsys.readouterr().out
    resumed = extract_codes.run(none)
    assert resumed["code_shape"] == [1, 16] and resumed["augment"] == "none"
    clean = copy_upstream(upstream, make_cfg(tmp_path / "clean", "extract.augment=none", ONE_ACTOR))
    extract_codes.run(clean)
    assert_same_codes(none, clean)


@pytest.mark.slow
def test_retrained_tokenizer_discards_stale_code_shards(upstream, flip_codes, tmp_path, capsys):
    """Issue 19: a tokenizer retrained under the same config (same fingerprint) is caught by its hash."""
    cfg = copy_flip_codes(flip_codes, make_cfg(tmp_path / "c", ONE_ACTOR))
    old = read_manifest(paths.stage_dir(cfg, "extract_codes"))
    old_codes = all_codes(cfg)["train"][0]
    retrain_tokenizer(cfg, seed=1)
    new = extract_codes.run(cfg)  # the stage run alone over a complete manifest of the same fingerprint
    assert new["tokenizer_sha256"] != old["tokenizer_sha256"]
    assert "discarded 3 of 3 code shards: 3 made by other tokenizer weights" in capsys.readouterr().out
    assert new["tokenizer_sha256"] == storage.sha256_url(
        storage.join(paths.stage_dir(cfg, "train_tokenizer"), "tokenizer_ema.safetensors")
    )
    clean = copy_upstream(upstream, make_cfg(tmp_path / "d", ONE_ACTOR))
    retrain_tokenizer(clean, seed=1)
    extract_codes.run(clean)
    assert_same_codes(cfg, clean)
    assert not np.array_equal(all_codes(cfg)["train"][0], old_codes)  # the weights did change the codes
