"""The typed schema: every preset loads, overrides apply, bad keys and values fail clearly."""

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
