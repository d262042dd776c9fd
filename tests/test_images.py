"""C8 on images (images.py): patches, the masked-patch loss E-img, freezing, pre-training, bad
input."""

import os
import struct
import zlib

import numpy as np
import pytest
import torch

import images
import ptft
from model import make_config


@pytest.fixture
def small_world(monkeypatch):
    """The image world with a few hundred unlabeled images instead of 20,000: the tests' budget."""
    monkeypatch.setattr(images, "WORLD_UNLABELED", 400)
    monkeypatch.setattr(images, "WORLD_POOL_PER_CLASS", 8)
    monkeypatch.setattr(images, "WORLD_TEST_PER_CLASS", 10)


def small_config(num_patches):
    return make_config("tiny", hidden_size=32, num_heads=2, intermediate_size=64, vocab_size=1,
                       type_vocab_size=1, max_positions=num_patches + 1, dropout=0.0,
                       attention_dropout=0.0)


def test_patchify_and_unpatchify_round_trip_exactly_on_random_shapes():
    rng = np.random.default_rng(0)
    for _ in range(50):
        patch = int(rng.integers(1, 5))
        height, width = patch * int(rng.integers(1, 6)), patch * int(rng.integers(1, 6))
        batch = int(rng.integers(1, 4))
        array = rng.normal(size=(batch, height, width)).astype(np.float32)
        patches = images.patchify(array, patch)
        assert patches.shape == (batch, (height // patch) * (width // patch), patch * patch)
        assert np.array_equal(images.unpatchify(patches, height, width, patch), array)
        tensor = torch.from_numpy(array)
        assert torch.equal(images.patchify(tensor, patch), torch.from_numpy(patches))
        assert torch.equal(images.unpatchify(images.patchify(tensor, patch), height, width, patch),
                           tensor)
        # the first patch is the top-left P x P block, read row by row
        assert np.array_equal(patches[:, 0], array[:, :patch, :patch].reshape(batch, -1))


def test_the_patch_loss_counts_masked_patches_only_and_is_their_mean_squared_error():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        predictions, targets = torch.randn(3, 9, 4), torch.randn(3, 9, 4)
        masked = images.random_patch_mask(3, 9, 0.4, generator)
        loss = images.masked_patch_loss(predictions, targets, masked)
        by_hand = np.mean([((predictions[b, i] - targets[b, i]) ** 2).mean().item()
                           for b in range(3) for i in range(9) if masked[b, i]])
        assert loss.item() == pytest.approx(by_hand, rel=1e-5)
        changed = predictions.clone()
        changed[~masked] += 100.0  # every unmasked patch's prediction, far off
        assert images.masked_patch_loss(changed, targets, masked).item() == loss.item()
        changed[masked] += 1.0  # a masked one moves the loss
        assert images.masked_patch_loss(changed, targets, masked).item() != loss.item()
        assert int(masked.sum(dim=1).unique().item()) == round(0.4 * 9)  # the same count each


@pytest.mark.parametrize("freeze, frozen_prefixes, trained_prefixes", [
    ("head", ["encoder.embeddings.", "encoder.layers.0.", "encoder.layers.1."], ["classifier."]),
    ("top-1", ["encoder.embeddings.", "encoder.layers.0."], ["encoder.layers.1.", "classifier."]),
    ("none", [], ["encoder.embeddings.", "encoder.layers.0.", "classifier."]),
])
def test_image_fine_tuning_freezes_what_freeze_says(freeze, frozen_prefixes, trained_prefixes):
    torch.manual_seed(0)
    config = small_config(16)
    start = images.MaskedPatchModel(config, 4).encoder.state_dict()
    patches, labels = torch.randn(12, 16, 4), torch.arange(12) % 3
    options = images.ImageFinetuneOptions(freeze=freeze, epochs=3, batch_size=4, lr=1e-2)
    model = images.fit_image_classifier(patches, labels, 3, config, options, start)
    before = {f"encoder.{k}": v for k, v in start.items()}
    torch.manual_seed(0)  # as fit_image_classifier seeds (options.seed = 0) before building it
    before.update({name: value for name, value in
                   images.image_classifier(config, 4, 3).state_dict().items()
                   if name.startswith("classifier.")})  # the head's start, seeded alike
    after = model.state_dict()
    for name, value in after.items():
        if name.startswith(tuple(frozen_prefixes)):
            assert torch.equal(value, before[name]), f"{freeze}: {name} moved"
    for prefix in trained_prefixes:
        moved = [name for name in after if name.startswith(prefix) and name in before
                 and not torch.equal(after[name], before[name])]
        assert moved, f"{freeze}: nothing under {prefix} trained"


def test_pre_training_on_the_image_world_lowers_the_masked_patch_loss(small_world, tmp_path):
    options = images.ImagePretrainOptions(steps=100, batch_size=16, save_every=0, lr=3e-3)
    metrics = images.pretrain_images(str(tmp_path / "pre"), options, log=lambda *a: None)
    # at the first evaluation (step 10) the model predicts about the mean pixel (loss ~ the
    # pixels' variance); below it, the visible patches are being read
    first, last = metrics["history"][0]["held_out_loss"], metrics["held_out_loss"]
    assert last < 0.92 * first, (first, last)
    assert os.path.exists(tmp_path / "pre" / "reconstructions.png")


def test_a_resumed_image_pre_training_ends_with_the_uninterrupted_runs_weights(small_world,
                                                                             tmp_path):
    quiet = dict(log=lambda *a: None)
    options = images.ImagePretrainOptions(steps=20, batch_size=8, save_every=10, dropout=0.1)
    images.pretrain_images(str(tmp_path / "whole"), options, **quiet)

    def killed_at_step_14(line):
        if line.startswith("step 14:"):
            raise KeyboardInterrupt  # after the checkpoint of step 10
    with pytest.raises(KeyboardInterrupt):
        images.pretrain_images(str(tmp_path / "split"), options, log=killed_at_step_14)
    images.pretrain_images(str(tmp_path / "split"), options, resume=True, **quiet)
    a = images.load_image_checkpoint(str(tmp_path / "whole"))["model"]
    b = images.load_image_checkpoint(str(tmp_path / "split"))["model"]
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_the_reconstruction_picture_is_a_valid_png(tmp_path):
    gray = np.linspace(0, 1, 6 * 5).reshape(6, 5)
    path = tmp_path / "picture.png"
    images.write_png(str(path), gray)
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", raw[16:24])
    assert (width, height) == (5, 6)
    length = struct.unpack(">I", raw[33:37])[0]
    assert raw[37:41] == b"IDAT"
    rows = zlib.decompress(raw[41:41 + length])
    pixels = np.frombuffer(rows, dtype=np.uint8).reshape(6, 6)[:, 1:]
    assert np.array_equal(pixels, (gray * 255).round().astype(np.uint8))


def test_the_world_is_seeded_balanced_and_unreadable_to_a_pixel_average():
    a, labels = images.image_world(200, seed=5)
    b, _ = images.image_world(200, seed=5)
    assert np.array_equal(a, b) and np.bincount(labels).tolist() == [20] * 10
    # the textures' phases are random: a class's mean image is nearly flat
    class_means = np.stack([a[labels == c].mean(0) for c in range(10)])
    assert class_means.std(axis=(1, 2)).max() < 0.15


@pytest.mark.parametrize("arguments, expected", [
    (["pretrain-images", "--data", "cifar"], "--data"),
    (["pretrain-images", "--image-size", "10", "--patch-size", "4"], "--patch-size 4"),
    (["pretrain-images", "--data", "digits", "--image-size", "16"], "--image-size 16"),
    (["pretrain-images", "--mask-ratio", "1.5"], "--mask-ratio"),
    (["pretrain-images", "--config", "huge"], "--config"),
    (["finetune-images", "--freeze", "top-x"], "--freeze"),
    (["finetune-images", "--init", "no-such-run"], "no-such-run"),
])
def test_bad_image_input_is_one_line_and_exit_status_2(arguments, expected, tmp_path, capsys):
    out = tmp_path / "run"
    assert ptft.main(arguments + ["--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and expected in error, error
    assert not out.exists()


def test_the_digits_ship_inside_scikit_learn():
    pytest.importorskip("sklearn")
    data = images.image_data("digits")
    assert data["image_size"] == 8 and data["classes"] == 10
    assert len(data["unlabeled"]) + len(data["test"][0]) == 1797
    assert 0 <= data["unlabeled"].min() and data["unlabeled"].max() <= 1


def test_the_c8_plans_image_tables_keep_per_seed_values_get_verdicts_and_resume(small_world,
                                                                                tmp_path):
    import experiments
    plan = {"image_data": ["world"], "image_pretrain_steps": {"world": 10},
            "image_labels_per_class": [2], "image_finetune_steps": 2, "seeds": 2}
    runs_path = str(tmp_path / "runs.jsonl")
    quiet = lambda *a: None  # noqa: E731
    tables, pretraining, decided = experiments.run_c8_images(str(tmp_path), plan, {}, runs_path,
                                                             quiet)
    (table,) = tables
    assert [row["setting"] for row in table["rows"]] == [
        f"k=2: {name}" for name in experiments.IMAGE_ROWS.values()]
    for row in table["rows"]:
        accuracy = row["cells"]["accuracy"]
        assert len(accuracy["values"]) == 2 and accuracy["seeds"] == [0, 1]
        assert accuracy["std"] == pytest.approx(np.std(accuracy["values"], ddof=1))
    assert {v["verdict"] for v in decided} <= {"holds", "does not hold", "not settled"}
    assert any(v["margin"] == experiments.IMAGE_TARGET for v in decided)
    assert len(pretraining["world"]["held_out_loss"]) >= 2
    runs = open(runs_path).read()
    again = experiments.run_c8_images(str(tmp_path), plan, experiments.finished_runs(
        runs_path, True, quiet), runs_path, quiet)
    assert again[0] == tables and open(runs_path).read() == runs  # nothing run twice
