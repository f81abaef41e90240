"""`restok convert`: release checkpoints -> our exports (loadable like our own), fixture verification,
and one-line failures that write nothing (issue 9)."""

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "official"


def test_verify_passes_on_the_shipped_fixtures(capsys):
    assert main(["convert", "verify", str(FIXTURES)]) == 0
    out = capsys.readouterr().out
    assert " 0 failed" in out and "tokenizer/codes" in out and "generator/har_sample_codes" in out
    # The release's loss fixtures (issue 13) beside the model ones.
    assert "losses/full/generator_total" in out and "losses/diffaug/seed0" in out


def test_verify_fails_when_a_stored_tensor_is_off(tmp_path, capsys):
    bad = tmp_path / "fixtures"
    shutil.copytree(FIXTURES, bad)
    io = load_file(str(bad / "har_tiny_io.safetensors"))
    io["har_logits"] = io["har_logits"] + 1e-3  # above the 1e-5 logit tolerance
    save_file(io, str(bad / "har_tiny_io.safetensors"))
    (bad / "restok_tiny.json").unlink()  # generator part only: keeps the test short
    (bad / "losses_tiny.json").unlink()
    assert main(["convert", "verify", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "generator/har_logits" in out and " 1 failed" in out


def test_converted_tokenizer_loads_like_our_own_export(tmp_path):
    from jobs.training.checkpoints import load_tokenizer

    dst = tmp_path / "tok"
    assert (
        main(
            [
                "convert",
                "official-tokenizer",
                str(FIXTURES / "restok_tiny.safetensors"),
                str(dst),
                "--config",
                str(FIXTURES / "restok_tiny.json"),
            ]
        )
        == 0
    )
    manifest = json.loads((dst / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_elements"] == 4_086_747
    model = load_tokenizer(str(dst))
    io = load_file(str(FIXTURES / "restok_tiny_io.safetensors"))
    with torch.no_grad():
        _, info = model.encode(io["images"])
    assert torch.equal(info["codes"], io["codes"].reshape(info["codes"].shape))


@pytest.mark.parametrize("vanilla", [False, True])
def test_converted_generator_loads_like_our_own_export(tmp_path, vanilla):
    from jobs.training.checkpoints import load_generator

    src = FIXTURES / "har_tiny.safetensors"
    if vanilla:
        weights = {k: v for k, v in load_file(str(src)).items() if not k.startswith("spe_tok_embeddings")}
        src = tmp_path / "vanilla.safetensors"
        save_file(weights, str(src))
    args = ["convert", "official-generator", str(src), str(tmp_path / "gen"), "--levels", "1,1,2,4,8,16"]
    assert main(args + (["--vanilla"] if vanilla else [])) == 0
    model = load_generator(str(tmp_path / "gen"))
    assert model.cfg.har is (not vanilla) and model.block_size == 32
    io = load_file(str(FIXTURES / "har_tiny_io.safetensors"))
    if not vanilla:
        with torch.no_grad():
            assert (model(io["labels"], io["tokens"]) - io["har_logits"]).abs().max() <= 1e-5


def test_mismatched_checkpoint_fails_in_one_line_and_writes_nothing(tmp_path, capsys):
    weights = load_file(str(FIXTURES / "har_tiny.safetensors"))
    weights.pop("layers.0.attention.wo.weight")
    weights["output.weight"] = torch.zeros(3, 3)
    src = tmp_path / "bad.safetensors"
    save_file(weights, str(src))
    dst = tmp_path / "out"
    assert main(["convert", "official-generator", str(src), str(dst)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.safetensors" in err and "missing" in err
    assert not dst.exists()


def test_pickle_refused_by_weights_only_fails_in_one_line(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    src = tmp_path / "evil.pt"
    src.write_bytes(pickle.dumps({"model": Evil()}))
    assert main(["convert", "official-tokenizer", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "evil.pt" in err and "weights_only" in err
    assert not (tmp_path / "out").exists()


def test_from_hub_offline_names_the_local_path_alternative(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert (
        main(["convert", "official-tokenizer", str(tmp_path / "o"), "--from-hub", "Kwai-Kolors/ResTok"]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "restok convert official-tokenizer /path/to/checkpoint" in err
