"""The typed schema: every preset loads, overrides apply, bad keys and values fail clearly."""

import re
import subprocess
import sys

import pytest
from conftest import run_restok

from configs.loading import ConfigError, list_presets, load_config


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_loads(preset):
    cfg = load_config(preset)
    assert cfg.preset == preset


def test_override_applies_and_is_typed():
    cfg = load_config(None, ["tokenizer_train.steps=7", "data.synthetic.num_classes=12"])
    assert cfg.tokenizer_train.steps == 7 and cfg.data.synthetic.num_classes == 12


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["tokenizer_train.stepz=5"])
    msg = str(err.value)
    assert "tokenizer_train.stepz" in msg and "steps" in msg and "\n" not in msg


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match="tokenizer_train.steps"):
        load_config(None, ["tokenizer_train.steps=abc"])


def test_bad_choice_names_choices():
    with pytest.raises(ConfigError, match="imagenet_folder"):
        load_config(None, ["data.source=foo"])


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="default"):
        load_config("no-such-preset")


def test_batch_arithmetic_checked():
    with pytest.raises(ConfigError, match="global_batch_size"):
        load_config(None, ["tokenizer_train.global_batch_size=33"])


@pytest.mark.parametrize("section", ["tokenizer_train", "generator_train"])
def test_bf16_without_zero_is_refused(section):
    """At ZeRO-0 DeepSpeed's bf16 optimizer hides the fp32 masters from the export and the EMA."""
    with pytest.raises(ConfigError, match=f"{section}.precision=bf16 needs {section}.zero_stage 1-3"):
        load_config(None, [f"{section}.precision=bf16", f"{section}.zero_stage=0"])
    assert load_config(None, [f"{section}.precision=bf16", f"{section}.zero_stage=1"])


def test_compile_choices_and_zero3_conflict_named():
    assert load_config(None, ["tokenizer_train.compile=inductor"]).tokenizer_train.compile == "inductor"
    with pytest.raises(ConfigError, match="aot_eager"):
        load_config(None, ["tokenizer_train.compile=yes"])
    with pytest.raises(ConfigError, match="tokenizer_train.compile=inductor needs zero_stage 0-2"):
        load_config(None, ["tokenizer_train.compile=inductor", "tokenizer_train.zero_stage=3"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("tokenizer_train.log_every=0", "tokenizer_train.log_every=0 must be at least 1"),
        ("generator_train.checkpoint_every=0", "generator_train.checkpoint_every=0 must be at least 1"),
        ("tokenizer_train.micro_batch_size=0", "tokenizer_train.micro_batch_size=0 must be at least 1"),
        ("cluster.num_workers=0", "cluster.num_workers=0 must be at least 1"),
        ("tokenizer_train.optim.betas=[0.9]", "tokenizer_train.optim.betas=[0.9] must be two numbers"),
        ("data.image_size=64", "data.image_size=64 must equal tokenizer.image_size=32"),
        ("generator.num_classes=20", "data.synthetic.num_classes=10 must equal generator.num_classes=20"),
        ("tokenizer_train.loss.disc_diffaug=colour", "unknown DiffAugment op 'colour'"),
        ("work_dir=", "work_dir is empty"),
        ("cluster.address=http://head:8265", "is an HTTP (Jobs API) address"),
    ],
)
def test_configs_that_would_fail_inside_the_workers_are_refused_at_load(override, message):
    """Each of these used to pass load_config and fail in a Ray Train worker or actor (a division
    by zero at the first log step, a shape error at the first forward, ...)."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_codebook_larger_than_the_code_dtype_is_refused_at_load():
    big = ["tokenizer.codebook_size=40000", "generator.vocab_size=40000"]
    with pytest.raises(ConfigError, match="does not fit extract.code_dtype=int16"):
        load_config(None, big)
    assert load_config(None, [*big, "extract.code_dtype=int32"])


def test_the_default_generator_has_the_built_in_datas_class_count():
    assert load_config(None, ["data.synthetic.num_classes=4"]).generator.num_classes == 4


def test_string_overrides_are_kept_as_typed(tmp_path, monkeypatch):
    """OmegaConf's dotlist reads values as YAML; string fields keep what was typed."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        None,
        [
            "tracking.run_name=1e-4",
            "tracking.experiment=no",
            "seed=3",
            "data.shards_url=s3://bucket/run,1",
            "data.root=/mnt/imagenet,v2",
            "tracking.tracking_uri=postgresql://u@db1:5432,db2:5432/mlflow",
            "eval.reference_shards=a.tar,s3://b/c.tar",
        ],
    )
    assert (cfg.tracking.run_name, cfg.tracking.experiment, cfg.seed) == ("1e-4", "no", 3)
    # a comma is part of a path or URL; only a list-valued path key is split (and resolved per item)
    assert cfg.data.shards_url == "s3://bucket/run,1" and cfg.data.root == "/mnt/imagenet,v2"
    assert cfg.tracking.tracking_uri == "postgresql://u@db1:5432,db2:5432/mlflow"
    assert cfg.eval.reference_shards == f"{tmp_path}/a.tar,s3://b/c.tar"
    assert load_config(None, ["tracking.run_name=it's"]).tracking.run_name == "it's"


def test_preset_yaml_errors_are_one_line_and_bases_are_found_beside_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tokenizer: [\n")
    with pytest.raises(ConfigError, match=f"{bad}: not valid YAML"):
        load_config(str(bad))
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="a preset is a mapping of config keys"):
        load_config(str(bad))
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text("base: default\nseed: 7\n")
    (tmp_path / "sub" / "child.yaml").write_text("base: ../base.yaml\ntracking:\n  run_name: child\n")
    cfg = load_config(str(tmp_path / "sub" / "child.yaml"))
    assert (cfg.seed, cfg.tracking.run_name) == (7, "child")


def test_preset_yaml_unknown_key_names_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: default\ndata:\n  sorce: synthetic\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(bad))
    assert "bad.yaml" in str(err.value) and "source" in str(err.value)


def test_cli_config_show_prints_resolved_and_rejects_bad_key(tmp_path):
    ok = run_restok("config", "show", "default", "seed=3", cwd=tmp_path)
    assert ok.returncode == 0 and "seed: 3" in ok.stdout
    bad = run_restok("config", "show", "default", "sed=3", cwd=tmp_path)
    assert bad.returncode == 2 and "unknown config key 'sed'" in bad.stderr


def test_loading_builds_the_models_for_their_shapes_only():
    """The build check at load skips weight initialisation: on the meta device nn.init runs
    torch._refs, which imports torch._dynamo (~1 s of every command's start); a model that cannot
    be built is still a config error."""
    code = (
        "import sys\n"
        "from configs.loading import ConfigError, load_config\n"
        "for preset in ('default', 'imagenet256-restok-l'):\n"
        "    load_config(preset)\n"
        "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo imported by load_config'\n"
        "try:\n"
        "    load_config(None, ['tokenizer.pixel_channels=12'])\n"
        "except ConfigError as e:\n"
        "    assert 'divisible' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('an unbuildable tokenizer loaded')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
