"""train.py and ptft.py as a specification: freezing, schedules, runs, clear errors."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import train
from model import Classifier, PreTrainingModel, make_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_labeled(path, examples):
    data.write_tsv(str(path), examples)
    return str(path)


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    """A small toy world on disk and a pre-training run of a few steps on its text."""
    folder = tmp_path_factory.mktemp("world")
    world = data.toy_world(seed=5, num_documents=200, labeled_per_class=(4, 2, 2))
    corpus = folder / "unlabeled.txt"
    data.write_corpus(str(corpus), world["unlabeled"])
    metrics = train.pretrain(str(folder / "pre"), [str(corpus)], steps=40, batch_size=16, max_length=32,
                             lr=2e-3, eval_every=20, save_every=0, device="cpu", log=lambda *a: None,
                             progress=False)
    return {"folder": folder, "pre": str(folder / "pre"), "metrics": metrics,
            "train": write_labeled(folder / "train.tsv", world["train"]),
            "valid": write_labeled(folder / "valid.tsv", world["valid"])}


def test_pretraining_loss_falls_and_the_run_folder_is_complete(small_world):
    metrics, folder = small_world["metrics"], small_world["pre"]
    history = metrics["history"]
    assert history[-1]["held_out_mlm_loss"] < metrics["ln_vocab"] - 1.0  # well below a uniform guess
    assert set(os.listdir(folder)) >= {"checkpoint.pt", "vocab.txt", "metrics.json"}
    checkpoint = torch.load(os.path.join(folder, "checkpoint.pt"), weights_only=True)
    assert {"model", "config", "step"} <= set(checkpoint) and checkpoint["step"] == 40
    assert data.Tokenizer.load(os.path.join(folder, "vocab.txt")).vocab == checkpoint["vocab"]


@pytest.mark.parametrize("freeze,trainable_layers", [("head", 0), ("top-1", 1), ("none", 2)])
def test_frozen_weights_are_bit_identical_after_fine_tuning(small_world, tmp_path, freeze, trainable_layers):
    out = str(tmp_path / "ft")
    metrics = train.finetune(out, small_world["pre"], small_world["train"], small_world["valid"], freeze=freeze,
                             epochs=2, lr=1e-2, device="cpu", log=lambda *a: None, progress=False)
    assert {"accuracy", "loss", "n"} <= set(metrics) and metrics["n"] == 16
    assert json.load(open(os.path.join(out, "metrics.json")))["accuracy"] == metrics["accuracy"]
    before = torch.load(os.path.join(small_world["pre"], "checkpoint.pt"), weights_only=True)["model"]
    after = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["model"]
    num_layers = 2
    for name, value in after.items():
        if not name.startswith("encoder.") or name.startswith("encoder.pooler"):
            continue
        layer = int(name.split(".")[2]) if name.startswith("encoder.layers.") else -1  # embeddings: below layer 0
        frozen = freeze != "none" and layer < num_layers - trainable_layers
        assert torch.equal(value, before[name]) == frozen, name


def test_optimizer_holds_only_trainable_parameters_and_counts_match():
    config = make_config("tiny", vocab_size=300, max_positions=32)
    hidden, labels = config.hidden_size, 3
    head = hidden * hidden + hidden + hidden * labels + labels  # pooler + classifier
    layer = sum(p.numel() for p in Classifier(config, labels).encoder.layers[0].parameters())
    for freeze, expected in [("head", head), ("top-1", head + layer), ("top-2", head + 2 * layer)]:
        model = Classifier(config, labels)
        train.freeze_below(model, train.parse_freeze(freeze, config.num_layers))
        optimizer = train.make_optimizer(model, 1e-3)
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert in_optimizer == trainable
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


def test_no_weight_decay_on_biases_and_layer_norms():
    model = PreTrainingModel(make_config("tiny", vocab_size=100, max_positions=16))
    optimizer = train.make_optimizer(model, 1e-3, weight_decay=0.01)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (not (name.endswith("bias") or "norm" in name)), name


def test_warmup_then_cosine_schedule():
    rates = [train.learning_rate(s, 100, 1e-3, 10) for s in range(100)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(rates[:9], rates[1:10]))  # rising during warmup
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))  # then never rising
    assert rates[55] == pytest.approx(0.5e-3, rel=0.05) and rates[-1] < 1e-6 + 1e-3 * 0.001
    assert train.learning_rate(50, 100, 1e-3, 10, "constant") == 1e-3


def test_same_seed_same_numbers_on_cpu(small_world, tmp_path):
    runs = [train.finetune(str(tmp_path / f"r{i}"), small_world["pre"], small_world["train"], small_world["valid"],
                           epochs=1, device="cpu", log=lambda *a: None, progress=False) for i in range(2)]
    assert runs[0]["loss"] == runs[1]["loss"] and runs[0]["train_loss"] == runs[1]["train_loss"]


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, "ptft.py"), *args], capture_output=True, text=True, cwd=cwd)


def assert_clear_error(result, *needles):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) <= 2 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_cli_bad_inputs_get_one_line_naming_the_file(small_world, tmp_path):
    no_tab = tmp_path / "no_tab.tsv"
    no_tab.write_text("a fine line\tx\nsecond line\ty\nthird line without a tab\n", encoding="utf-8")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    not_a_run = tmp_path / "not_a_run"
    not_a_run.mkdir()
    fake = tmp_path / "fake.pt"
    fake.write_text("this is not a checkpoint")
    one_class = tmp_path / "one_class.tsv"
    one_class.write_text("a sentence\tsea\nanother one\tsea\n", encoding="utf-8")
    new_label = tmp_path / "new_label.tsv"
    new_label.write_text("the whale swims\tsea\nthe stars shine\tastrology\n", encoding="utf-8")
    empty_label = tmp_path / "empty_label.tsv"
    empty_label.write_text("a sentence\t  \n", encoding="utf-8")
    out = str(tmp_path / "out")
    cases = [
        (["pretrain", "--corpus", str(tmp_path / "missing.txt"), "--out", out], ["missing.txt", "no such file"]),
        (["pretrain", "--corpus", str(empty), "--out", out], ["empty.txt", "empty corpus"]),
        (["pretrain", "--corpus", str(tmp_path), "--out", out], ["is a folder"]),
        (["finetune", "--init", "scratch", "--train", str(no_tab), "--out", out], ["no_tab.tsv:3", "no tab"]),
        (["finetune", "--init", str(not_a_run), "--train", small_world["train"], "--out", out], ["not_a_run", "no checkpoint"]),
        (["evaluate", "--init", str(fake), "--data", small_world["valid"]], ["fake.pt", "not a ptft checkpoint"]),
        (["finetune", "--init", small_world["pre"], "--train", small_world["train"], "--out", out, "--freeze", "top"], ["--freeze"]),
        (["finetune", "--init", "scratch", "--train", str(one_class), "--out", out], ["one_class.tsv", "only one class"]),
        (["finetune", "--init", "scratch", "--train", small_world["train"], "--valid", str(new_label), "--out", out],
         ["new_label.tsv", "example 2", "'astrology' never appears"]),
        (["finetune", "--init", "scratch", "--train", str(empty_label), "--out", out], ["empty_label.tsv:1", "empty label"]),
        (["pretrain", "--out", out, "--steps", "-3"], ["--steps"]),
        (["pretrain", "--out", out, "--config", "huge"], ["unknown config 'huge'"]),
    ]
    for args, needles in cases:
        assert_clear_error(run_cli(*args), *needles)
        assert not os.path.exists(out) or not os.listdir(out), args  # nothing half-written


def test_a_checkpoint_carrying_code_is_refused_and_executes_nothing(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"model": {}, "config": {}, "vocab": [], "step": 0, "x": Payload()}, tmp_path / "checkpoint.pt")
    result = run_cli("evaluate", "--init", str(tmp_path), "--data", "x.tsv")
    assert_clear_error(result, "not a ptft checkpoint")
    assert not marker.exists()


def test_an_existing_run_folder_is_not_overwritten(small_world, tmp_path):
    result = run_cli("finetune", "--init", small_world["pre"], "--train", small_world["train"], "--out", small_world["pre"])
    assert_clear_error(result, "not empty", "--force")
    assert os.path.exists(os.path.join(small_world["pre"], "checkpoint.pt"))


def test_evaluate_scores_a_classifier_run_and_a_pretraining_run(small_world, tmp_path):
    out = str(tmp_path / "ft")
    train.finetune(out, small_world["pre"], small_world["train"], epochs=1, device="cpu", log=lambda *a: None, progress=False)
    result = run_cli("evaluate", "--init", out, "--data", small_world["valid"])
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert metrics["n"] == 16 and 0 <= metrics["accuracy"] <= 1 and math.isfinite(metrics["loss"])
    corpus = str(small_world["folder"] / "unlabeled.txt")
    result = run_cli("evaluate", "--init", small_world["pre"], "--data", corpus)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["mlm_loss"] < small_world["metrics"]["ln_vocab"]


def test_a_run_killed_at_a_random_moment_resumes_bit_identical(tmp_path):
    corpus = tmp_path / "corpus.txt"
    data.write_corpus(str(corpus), data.toy_world(seed=2, num_documents=100)["unlabeled"])
    common = ["pretrain", "--corpus", str(corpus), "--steps", "80", "--batch-size", "8", "--max-length", "32", "--vocab-size", "300",
              "--save-every", "2", "--eval-every", "1000", "--device", "cpu", "--precision", "fp32", "--seed", "1"]
    assert run_cli(*common, "--out", str(tmp_path / "reference")).returncode == 0
    run = tmp_path / "killed"
    victim = subprocess.Popen([sys.executable, os.path.join(ROOT, "ptft.py"), *common, "--out", str(run)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_after = int(np.random.default_rng().integers(4, 60))  # a random moment of the run
    while victim.poll() is None:
        path = run / "checkpoint.pt"
        if path.exists() and torch.load(path, weights_only=True)["step"] >= kill_after:
            victim.kill()  # SIGKILL: no chance to clean up
            break
    victim.wait()
    assert victim.returncode == -9, "the run finished before it could be killed"
    resumed = run_cli(*common, "--out", str(run), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    expected = torch.load(tmp_path / "reference" / "checkpoint.pt", weights_only=True)
    found = torch.load(run / "checkpoint.pt", weights_only=True)
    assert found["step"] == expected["step"] == 80
    for name, value in expected["model"].items():
        assert torch.equal(found["model"][name], value), name
