"""Relative paths resolve where the user typed the command; bad input ends in one line, at once
(issue 18). Every command here is the real console script in a scratch working directory."""

import json
import os
import time

import pytest
from cluster_harness import full_log_text
from conftest import run_restok

from configs.loading import load_config, path_keys

TINY_DATA = ["data.synthetic.train_per_class=4", "data.synthetic.val_per_class=1", "data.prep_tasks=1"]
TINY_TOKENIZER = [
    "tokenizer_train.steps=2",
    "tokenizer_train.checkpoint_every=2",
    "tokenizer_train.image_log_every=0",
    "tokenizer_train.global_batch_size=4",
    "tokenizer_train.micro_batch_size=2",
    "cluster.num_workers=1",  # a Train worker's own cwd is what is tested: one is enough
]


def restok(cwd, *argv, timeout=900):
    t0 = time.perf_counter()
    done = run_restok(*argv, cwd=cwd, timeout=timeout)
    return done, time.perf_counter() - t0


def assert_one_line_failure(done, seconds, *needles, limit_s=60):
    """Non-zero exit, one line on stderr naming the culprit, no traceback, quickly."""
    assert done.returncode != 0, done.stdout[-2000:]
    err = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(err) == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr
    for needle in needles:
        assert needle in err[0], err[0]
    assert seconds < limit_s, (seconds, err[0])
    return err[0]


def test_every_path_field_is_made_absolute_against_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        None,
        [
            "data.root=imagenet",
            "cluster.storage_path=ckpt",
            "tracking.tracking_uri=sqlite:///m.db",
            "eval.reference_shards=a/*.tar,s3://bucket/b",
            "data.shards_url=s3://bucket/shards",
        ],
    )
    assert cfg.work_dir == str(tmp_path / "restok_work")
    assert cfg.data.root == str(tmp_path / "imagenet")
    assert cfg.cluster.storage_path == str(tmp_path / "ckpt")
    assert cfg.tracking.tracking_uri == f"sqlite:///{tmp_path}/m.db"
    assert cfg.eval.reference_shards == f"{tmp_path}/a/*.tar,s3://bucket/b"
    assert cfg.data.shards_url == "s3://bucket/shards"  # URLs are left alone
    assert cfg.tokenizer_train.resume == "auto"  # a word, not a path
    for key in (
        "work_dir",
        "data.root",
        "tokenizer_train.resume",
        "tracking.tracking_uri",
        "tokenizer_train.loss.vf_teacher_weights",
        "eval.inception_weights",
    ):
        assert key in path_keys()


def test_empty_value_of_a_string_key_is_the_empty_string():
    cfg = load_config(None, ["tracking.run_name=", "data.max_images_per_split="])
    assert cfg.tracking.run_name == "" and cfg.data.max_images_per_split is None


def test_a_model_that_cannot_be_built_is_a_config_error_at_load(tmp_path):
    done, seconds = restok(tmp_path, "run", "tokenizer.pixel_channels=12")
    line = assert_one_line_failure(done, seconds, "tokenizer", "divisible", limit_s=90)
    assert line.startswith("restok: config error:")
    assert not (tmp_path / "restok_work").exists()


def test_generator_vocabulary_and_levels_must_match_the_tokenizer_at_load():
    from configs.loading import ConfigError

    with pytest.raises(ConfigError, match="generator.vocab_size=300 must equal tokenizer.codebook_size=256"):
        load_config(None, ["generator.vocab_size=300"])
    with pytest.raises(ConfigError, match="generator.levels"):
        load_config(None, ["generator.levels=[1,1,2,4]"])


def test_unknown_key_is_one_line_naming_the_valid_keys(tmp_path):
    done, seconds = restok(tmp_path, "run", "tokenizer_train.stepz=3")
    assert_one_line_failure(done, seconds, "tokenizer_train.stepz", "steps", limit_s=90)
    assert not (tmp_path / "restok_work").exists()


def test_missing_data_root_names_the_root_and_the_layout_and_creates_nothing(tmp_path):
    done, seconds = restok(tmp_path, "run", "data.source=imagenet_folder", "data.root=no/such/dir")
    assert_one_line_failure(done, seconds, f"{tmp_path}/no/such/dir", "train/<wnid>", limit_s=90)
    assert os.listdir(tmp_path) == []
    (tmp_path / "tars").mkdir()
    done, seconds = restok(tmp_path, "run", "data.source=imagenet_tar", "data.root=tars")
    assert_one_line_failure(done, seconds, "ILSVRC2012_img_train.tar", limit_s=90)


def test_missing_upstream_output_is_one_line_and_creates_nothing(tmp_path):
    done, seconds = restok(tmp_path, "train-tokenizer")
    assert_one_line_failure(
        done, seconds, f"{tmp_path}/restok_work/prep/manifest.json", "restok prep", limit_s=90
    )
    done, seconds = restok(tmp_path, "eval", "gen")
    assert_one_line_failure(done, seconds, "train_tokenizer/manifest.json", limit_s=90)
    assert os.listdir(tmp_path) == []  # no work dir, no MLflow store


def test_compare_with_an_unknown_run_is_one_line(tmp_path):
    done, seconds = restok(tmp_path, "compare", "nope", "--tracking-uri", f"sqlite:///{tmp_path}/x.db")
    assert_one_line_failure(
        done, seconds, "nope" if (tmp_path / "x.db").exists() else "no MLflow store", limit_s=90
    )


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_stage_alone_from_another_cwd_finds_prep_and_bad_input_fails_once(tmp_path):
    """prep from one directory, train-tokenizer from a subdirectory, both with relative work dirs
    naming the same place: the Ray Train workers (in their own cwd) must find prep's output. A
    corrupt checkpoint fails before any worker starts; a worker's own error is not retried."""
    done, _ = restok(tmp_path, "prep", "work_dir=w", *TINY_DATA)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sub = tmp_path / "elsewhere"
    sub.mkdir()

    bad = tmp_path / "corrupt-ckpt"
    bad.mkdir()
    (bad / "meta.json").write_text("{not json")
    done, seconds = restok(
        sub,
        "train-tokenizer",
        "work_dir=../w",
        *TINY_DATA,
        *TINY_TOKENIZER,
        "tokenizer_train.resume=../corrupt-ckpt",
    )
    assert_one_line_failure(done, seconds, f"{bad}", "not a restok checkpoint", limit_s=60)

    done, _ = restok(sub, "train-tokenizer", "work_dir=../w", *TINY_DATA, *TINY_TOKENIZER)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    manifest = json.loads((tmp_path / "w" / "train_tokenizer" / "manifest.json").read_text())
    assert manifest["complete"] is True
    assert not (sub / "w").exists()

    # A stage alone refuses an input made under another config (the tokenizer's steps changed)
    # rather than stamp its output with this config while encoding with the old tokenizer.
    done, seconds = restok(
        sub, "extract-codes", "work_dir=../w", *TINY_DATA, *TINY_TOKENIZER, "tokenizer_train.steps=7"
    )
    assert_one_line_failure(
        done,
        seconds,
        "train_tokenizer/manifest.json",
        "made under another config",
        "restok train-tokenizer",
        limit_s=90,
    )
    assert not (tmp_path / "w" / "extract_codes").exists()

    # An error raised by our code inside a Train worker stops the stage once with its own line;
    # retries are for worker deaths (test_train_tokenizer covers a killed worker).
    for shard in (tmp_path / "w" / "prep").glob("train-*.tar"):  # the manifest still says complete
        shard.unlink()
    done, _ = restok(
        sub,
        "train-tokenizer",
        "work_dir=../w",
        *TINY_DATA,
        *TINY_TOKENIZER,
        "tokenizer_train.steps=3",
        "tokenizer_train.max_failures=3",
    )
    line = assert_one_line_failure(
        done, 0.0, "restok train-tokenizer:", "FileNotFoundError", "/prep/train-", "full log:"
    )
    log = full_log_text(line)
    assert "train-000000.tar" in log and "retry 1" not in log


def test_a_dataloader_worker_error_is_told_by_its_own_last_line():
    """torch re-raises a loader worker's error as "Caught X in DataLoader worker process N." plus the
    worker's traceback; the one line is the worker's error (the missing file), not the wrapper."""
    from torch._utils import ExceptionWrapper

    from infra.console import one_line

    try:
        open("/nonexistent/restok/train-000000.tar")
    except OSError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(FileNotFoundError) as info:
        wrapped.reraise()
    assert one_line(info.value) == (
        "FileNotFoundError: [Errno 2] No such file or directory: '/nonexistent/restok/train-000000.tar'"
    )
