"""train.py and ptft.py as a specification: freezing, schedules, runs, clear errors."""

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoint
import data
import evaluation
import finetuning
import model
import options
import ptft
import schedule
import toyworld
import train
from common import IGNORE_INDEX, InputError
from conftest import ROOT, assert_clear_error, quiet
from model import Classifier, PreTrainingModel, make_config
from options import FinetuneOptions, PretrainOptions, Remedies
from tokenizer import SPECIAL_TOKENS, Tokenizer


def finetune(out, init, train_tsv, valid=None, **flags):
    """finetuning.finetune on the CPU, quietly, with FinetuneOptions built from keyword flags."""
    return finetuning.finetune(str(out), FinetuneOptions(init=init, train=train_tsv, valid=valid, **{"device": "cpu", **flags}),
                          log=quiet, progress=False)


def test_pretraining_loss_falls_and_the_run_folder_is_complete(small_world):
    metrics, folder = small_world["metrics"], small_world["pre"]
    history = metrics["history"]
    assert history[-1]["held_out_mlm_loss"] < metrics["ln_vocab"] - 1.0  # well below a uniform guess
    assert history[-1]["held_out_mlm_loss"] < history[0]["held_out_mlm_loss"]
    assert set(os.listdir(folder)) >= {"checkpoint.pt", "vocab.txt", "metrics.json"}
    checkpoint = torch.load(os.path.join(folder, "checkpoint.pt"), weights_only=True)
    assert {"model", "config", "step"} <= set(checkpoint) and checkpoint["step"] == 40
    assert Tokenizer.load(os.path.join(folder, "vocab.txt")).vocab == checkpoint["vocab"]


@pytest.fixture(scope="session")
def context_world(tmp_path_factory):
    """A small encoder pre-trained long enough to use the context (a few seconds on a CPU)."""
    folder = tmp_path_factory.mktemp("context")
    corpus = str(folder / "unlabeled.txt")
    data.write_corpus(corpus, toyworld.toy_world(seed=7, num_documents=3000)["unlabeled"])
    recipe = PretrainOptions(corpus=[corpus], steps=600, batch_size=32, max_length=32, lr=3e-3, vocab_size=1024,
                             hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128, dropout=0.0,
                             precision="fp32", save_every=0, eval_every=600, device="cpu")
    metrics = train.pretrain(str(folder / "pre"), recipe, log=quiet, progress=False)
    return recipe, metrics, str(folder / "pre")


def test_pretrained_mlm_beats_every_model_that_ignores_the_context(context_world):
    # A model that ignores the context predicts one distribution q for every masked position; its
    # mean -log q(x_t) over the held-out targets is at least their empirical entropy H (Gibbs'
    # inequality, with equality at q = their own frequencies). Below H, the context is being used.
    recipe, metrics, folder = context_world
    _, documents = data.load_corpus(recipe.corpus)
    model, tokenizer, _ = checkpoint.open_model(folder)
    held_out = data.held_out_batches(data.encode_documents(tokenizer, data.split_held_out(documents)[1]), tokenizer,
                                     recipe.max_length, recipe.nsp)
    targets = np.concatenate([batch["mlm_labels"][batch["mlm_labels"] != IGNORE_INDEX] for batch in held_out])
    frequencies = np.unique(targets, return_counts=True)[1] / len(targets)
    entropy = float(-(frequencies * np.log(frequencies)).sum())
    loss = evaluation.mlm_evaluation(model, held_out, torch.device("cpu"))["mlm_loss"]
    assert loss == pytest.approx(metrics["held_out_mlm_loss"], abs=1e-4)  # the batches pretrain measured on
    assert loss < entropy - 0.3, (loss, entropy)


@pytest.mark.parametrize("freeze,trainable_layers", [("head", 0), ("top-1", 1), ("none", 2)])
def test_frozen_weights_are_bit_identical_after_fine_tuning(small_world, tmp_path, freeze, trainable_layers, device):
    out = str(tmp_path / "ft")
    metrics = finetune(out, small_world["pre"], small_world["train"], small_world["valid"], freeze=freeze, epochs=2, lr=1e-2,
                       device=device)
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


def fit_on_random_rows(options, monkeypatch=None, watch=None, seed=0):
    """train.fit_classifier on 48 random rows of a 2-layer encoder (dropout on), started from a
    random "pre-trained" encoder state; watch(model, optimizer) sees them before the first step."""
    config = make_config("tiny", vocab_size=60, max_positions=16, dropout=0.1, attention_dropout=0.1)
    torch.manual_seed(seed + 100)
    pretrained = {name: value.clone() for name, value in Classifier(config, 3).encoder.state_dict().items()}
    rng = np.random.default_rng(seed)
    rows = [list(rng.integers(5, 60, int(rng.integers(3, 12)))) for _ in range(48)]
    labels = [int(label) for label in rng.integers(0, 3, 48)]
    if watch is not None:
        original = train.make_optimizer

        def make_optimizer(model, *args, **kwargs):  # fit_classifier's model, before its first step
            optimizer = original(model, *args, **kwargs)
            watch(model, optimizer)
            return optimizer

        monkeypatch.setattr(train, "make_optimizer", make_optimizer)
    options = replace(options, batch_size=16, device="cpu")
    model, info = train.fit_classifier(rows, labels, 3, config, options, start=train.StartingPoint(encoder_state=pretrained))
    return model, info, pretrained


def test_frozen_layers_run_without_dropout_and_trainable_ones_with_it_during_fine_tuning(monkeypatch):
    seen = {}

    def watch(model, optimizer):  # at every forward pass: is the module in training mode?
        parts = {"embeddings": model.encoder.embeddings, "layer 0": model.encoder.layers[0],
                 "layer 1": model.encoder.layers[1], "head": model.classifier}
        for name, module in parts.items():
            module.register_forward_pre_hook(lambda module, args, name=name: seen.setdefault(name, set()).add(module.training))

    fit_on_random_rows(FinetuneOptions(freeze="top-1", epochs=2, lr=1e-3), monkeypatch, watch)
    assert seen == {"embeddings": {False}, "layer 0": {False}, "layer 1": {True}, "head": {True}}


def test_l2_sp_in_the_loop_pulls_toward_the_pretrained_weights(monkeypatch):
    # C5a inside fit_classifier: at every step the penalty is strength/2 * ||phi - theta_0||^2, theta_0
    # the weights fine-tuning started from (kept apart from the weights that train)
    values, original = [], train.l2_sp_penalty
    pretrained = {}

    def penalty(model, theta_0, strength):
        value = original(model, theta_0, strength)
        expected = strength / 2 * sum(((p - pretrained[name]) ** 2).sum().item() for name, p in model.encoder.named_parameters()
                                      if p.requires_grad and not name.startswith("pooler."))
        values.append((value.item(), expected))
        return value

    def watch(model, optimizer):
        pretrained.update({name: value.clone() for name, value in model.encoder.state_dict().items()})

    monkeypatch.setattr(train, "l2_sp_penalty", penalty)
    fit_on_random_rows(FinetuneOptions(freeze="none", epochs=2, lr=1e-2, remedies=Remedies(l2_sp=1.0)), monkeypatch, watch)
    assert len(values) == 6 and values[0][0] == 0.0 and all(value > 0 for value, _ in values[1:])
    for value, expected in values:
        assert value == pytest.approx(expected, rel=1e-4, abs=1e-9)


def test_every_fine_tuning_step_uses_the_schedule_times_each_layers_rate_scale(monkeypatch):
    # C4 x C5c: group rate at step t = learning_rate(t) * decay^depth
    rates = []

    def watch(model, optimizer):
        step = optimizer.step

        def recording_step(*args, **kwargs):
            rates.append([(group["lr"], group["lr_scale"]) for group in optimizer.param_groups])
            return step(*args, **kwargs)

        optimizer.step = recording_step

    options = FinetuneOptions(freeze="none", epochs=3, lr=1e-3, remedies=Remedies(layer_lr_decay=0.5))
    fit_on_random_rows(options, monkeypatch, watch)
    total = 3 * 3  # epochs x batches of 16 out of 48 rows
    warmup = max(1, int(options.warmup_fraction * total))
    assert len(rates) == total
    assert {scale for _, scale in rates[0]} == {1.0, 0.5, 0.25, 0.125}  # head, layer 1, layer 0, embeddings
    for step, groups in enumerate(rates):
        for lr, scale in groups:
            assert lr == pytest.approx(schedule.learning_rate(step, total, 1e-3, warmup) * scale)


def test_pretraining_updates_with_gradients_clipped_to_norm_1(small_world, tmp_path, monkeypatch):
    before, after = [], []
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        norm = clip(parameters, max_norm, *args, **kwargs)
        before.append(norm.item())
        after.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters if p.grad is not None])).item())
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    train.pretrain(str(tmp_path / "run"), PretrainOptions(corpus=[small_world["corpus"]], steps=6, batch_size=8, max_length=32,
                                                          lr=5e-3, eval_every=6, save_every=0, device="cpu", precision="fp32"),
                   log=quiet, progress=False)
    assert len(before) == 6 and max(before) > 1.0  # clipping had something to do
    assert all(norm <= 1.0 + 1e-5 for norm in after)


def test_the_held_out_mlm_loss_is_the_cross_entropy_over_every_masked_token_of_every_batch():
    config = make_config("tiny", vocab_size=70, max_positions=24)
    torch.manual_seed(0)
    net = PreTrainingModel(config).eval()
    rng = np.random.default_rng(0)
    tokenizer = Tokenizer(SPECIAL_TOKENS + [f"w{i}" for i in range(65)])
    documents = [[rng.integers(5, 70, int(n)) for n in rng.integers(2, 9, 4)] for _ in range(20)]
    batches = [data.pretraining_batch(documents, tokenizer, rng, size, 24) for size in (3, 8, 5)]  # unequal masked counts
    scores, targets = [], []
    with torch.no_grad():
        for batch in batches:
            tensors = evaluation.to_tensors(batch, torch.device("cpu"))
            sequence, _ = net.encoder(tensors["input_ids"], tensors["segment_ids"], tensors["attention_mask"])
            every_position = net.mlm_head(sequence, net.encoder.embeddings.token.weight)  # (B, T, V)
            scores.append(every_position[tensors["mlm_labels"] != IGNORE_INDEX])
            targets.append(tensors["mlm_labels"][tensors["mlm_labels"] != IGNORE_INDEX])
    expected = F.cross_entropy(torch.cat(scores), torch.cat(targets)).item()
    assert evaluation.mlm_evaluation(net, batches, torch.device("cpu"))["mlm_loss"] == pytest.approx(expected, rel=1e-5)


class FixedScores(torch.nn.Module):
    """A 'classifier' whose scores for a row are a table's row, looked up by the row's first id."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, input_ids, segment_ids=None, attention_mask=None):
        return self.table[input_ids[:, 0]]


def test_accuracy_and_macro_f1_are_their_written_out_formulas_over_every_class_seen():
    rng = np.random.default_rng(0)
    for _ in range(30):
        n, classes = int(rng.integers(1, 60)), int(rng.integers(2, 6))
        labels = [int(y) for y in rng.integers(0, classes, n)]
        scores = torch.from_numpy(rng.normal(size=(n, classes))).float()
        found = evaluation.classify(FixedScores(scores), [[i] for i in range(n)], labels, torch.device("cpu"), batch_size=7)
        predicted, truth = scores.argmax(-1).numpy(), np.array(labels)
        f1 = []  # per class seen among the labels or the predictions: 2 TP / (2 TP + FP + FN)
        for c in sorted(set(labels) | set(predicted.tolist())):
            tp = np.sum((predicted == c) & (truth == c))
            fp, fn = np.sum((predicted == c) & (truth != c)), np.sum((predicted != c) & (truth == c))
            f1.append(2 * tp / (2 * tp + fp + fn))
        assert found["accuracy"] == pytest.approx(np.mean(predicted == truth))
        assert found["macro_f1"] == pytest.approx(np.mean(f1))
        assert found["loss"] == pytest.approx(F.cross_entropy(scores, torch.tensor(labels)).item(), rel=1e-5)
        assert found["n"] == n


def test_a_step_diverged_when_either_loss_or_else_the_gradient_norm_is_not_finite():
    inf, nan = float("inf"), float("nan")
    assert train.divergence(2.0, 0.7, 1.5, fp16_scaling=False) == ""
    assert train.divergence(2.0, nan, 1.5, fp16_scaling=False) == "NSP loss is nan"
    assert train.divergence(inf, 0.7, nan, fp16_scaling=True) == "MLM loss is inf"
    assert train.divergence(2.0, 0.7, inf, fp16_scaling=False).startswith("the gradient norm is inf")
    assert train.divergence(2.0, 0.7, inf, fp16_scaling=True) == ""  # fp16: the scaler skips the step


def test_an_interrupted_command_says_its_checkpoint_is_intact_and_exits_130(cli, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(ptft.COMMANDS, "bench", interrupted)
    code, _, stderr = cli("bench")
    assert code == 130 and stderr.strip().splitlines() == ["interrupted; the last checkpoint written is intact (use --resume to continue)"]


def test_freeze_top_k_trains_exactly_the_top_k_layers_and_no_more_than_there_are():
    config = make_config("tiny", vocab_size=60, max_positions=16, num_layers=4)
    for k in range(5):
        model = Classifier(config, 2)
        frozen = train.freeze_below(model, options.trainable_layers(f"top-{k}", 4))
        assert frozen == [model.encoder.embeddings, *model.encoder.layers[:4 - k]]
        assert [all(p.requires_grad for p in layer.parameters()) for layer in model.encoder.layers] == [i >= 4 - k for i in range(4)]
    for k in (5, 9):
        with pytest.raises(InputError, match="only 4 layers"):
            options.trainable_layers(f"top-{k}", 4)


def test_the_default_fine_tuning_rate_follows_what_trains():
    # C4 at this scale: 1e-3 with a frozen encoder or its top layers training, 3e-4 when everything trains
    for freeze, rate in (("head", 1e-3), ("top-1", 1e-3), ("top-3", 1e-3), ("none", 3e-4)):
        assert FinetuneOptions(freeze=freeze).peak_lr() == rate
        assert FinetuneOptions(freeze=freeze, lr=5e-5).peak_lr() == 5e-5


def test_fill_mask_gives_e4s_softmax_best_first_and_at_most_the_whole_vocabulary(small_world):
    vocabulary = len(Tokenizer.load(os.path.join(small_world["pre"], "vocab.txt")))
    for top_k in (1, 7, vocabulary + 10):
        predictions = evaluation.fill_mask(small_world["pre"], "the [MASK] is [MASK] .", top_k=top_k, device="cpu", log=quiet)
        assert len(predictions) == 2
        for candidates in predictions:
            probabilities = [p for _, p in candidates]
            assert len(candidates) == min(top_k, vocabulary) and probabilities == sorted(probabilities, reverse=True)
        if top_k > vocabulary:  # all of V: a distribution
            assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)


def test_optimizer_holds_only_trainable_parameters_and_counts_match():
    config = make_config("tiny", vocab_size=300, max_positions=32)
    hidden, labels = config.hidden_size, 3
    head = hidden * hidden + hidden + hidden * labels + labels  # pooler + classifier
    layer = sum(p.numel() for p in Classifier(config, labels).encoder.layers[0].parameters())
    for freeze, expected in [("head", head), ("top-1", head + layer), ("top-2", head + 2 * layer)]:
        model = Classifier(config, labels)
        train.freeze_below(model, options.trainable_layers(freeze, config.num_layers))
        optimizer = schedule.make_optimizer(model, 1e-3)
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert in_optimizer == trainable
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


def test_no_weight_decay_on_biases_and_layer_norms():
    model = PreTrainingModel(make_config("tiny", vocab_size=100, max_positions=16))
    optimizer = schedule.make_optimizer(model, 1e-3, weight_decay=0.01)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (not (name.endswith("bias") or "norm" in name)), name


def test_warmup_then_cosine_schedule():
    rates = [schedule.learning_rate(s, 100, 1e-3, 10) for s in range(100)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(rates[:9], rates[1:10]))  # rising during warmup
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))  # then never rising
    assert rates[55] == pytest.approx(0.5e-3, rel=0.05) and rates[-1] < 1e-6 + 1e-3 * 0.001
    assert schedule.learning_rate(50, 100, 1e-3, 10, "constant") == 1e-3


def test_same_seed_same_numbers(small_world, tmp_path, device):
    # on the CPU always; on a GPU with --deterministic
    runs = [finetune(tmp_path / f"r{i}", small_world["pre"], small_world["train"], small_world["valid"], epochs=1,
                     device=device, deterministic=device != "cpu") for i in range(2)]
    assert runs[0]["loss"] == runs[1]["loss"] and runs[0]["last_batch_loss"] == runs[1]["last_batch_loss"]


def test_cli_bad_inputs_get_one_line_naming_the_file(small_world, tmp_path, cli):
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
    empty_text = tmp_path / "empty_text.tsv"
    empty_text.write_text("a sentence\tsea\n \tsea\n", encoding="utf-8")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("one line\ncaf\xe9 au lait\n".encode("latin-1"))
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
        (["finetune", "--init", "scratch", "--train", str(empty_text), "--out", out], ["empty_text.tsv:2", "empty text"]),
        (["pretrain", "--corpus", str(latin1), "--out", out], ["latin1.txt:2", "byte 12 is not valid UTF-8"]),
        (["pretrain", "--out", out, "--steps", "-3"], ["--steps"]),
        (["pretrain", "--out", out, "--device", "tpu"], ["--device: expected auto, cpu, cuda or mps, got 'tpu'"]),
        (["finetune", "--init", small_world["pre"], "--train", small_world["train"], "--out", out, "--freeze", "top-3"],
         ["--freeze top-3: the model has only 2 layers"]),
        (["fill-mask", "--init", small_world["pre"], "a [MASK]", "--top-k", "0"], ["--top-k must be positive, got 0"]),
        (["bench", "--peak-tflops", "fp16=1"], ["--peak-tflops", "fp16=1"]),
        (["bench", "--peak-tflops", "bf16=-1"], ["--peak-tflops", "bf16=-1"]),
        (["pretrain", "--out", out, "--config", "huge"], ["unknown config 'huge'"]),
        (["pretrain", "--out", out, "--lr", "nan"], ["--lr must be a number > 0 (and below 1e38), got nan"]),
        (["demo", "--out", out, "--pretrain-steps", "0"], ["--pretrain-steps"]),
        (["bench", "--steps", "0"], ["--steps must be at least 1, got 0"]),
        (["finetune", "--init", small_world["pre"], "--train", small_world["train"], "--out", out, "--lora", "-1"],
         ["--lora: the rank must be a positive whole number, got -1"]),
        (["finetune", "--init", "scratch", "--train", small_world["train"], "--out", out, "--lora", "2"], ["--lora"]),
        (["finetune", "--init", small_world["pre"], "--train", small_world["train"], "--out", out, "--lora", "2",
          "--freeze", "head"], ["not with --init scratch or --freeze"]),
        (["pretrain", "--out", out, "--hidden-size", "100", "--num-heads", "3"],
         ["--config tiny: --hidden-size 100 is not divisible by --num-heads 3"]),
        (["pretrain", "--out", out, "--attention", "flash"], ["error: --attention must be 'explicit' or 'sdpa'"]),
        (["pretrain", "--out", out, "--vocab-size", "0"], ["--vocab-size must be at least 8, got 0"]),
        (["demo", "--out", out, "--precision", "fp8"], ["--precision: expected auto"]),  # before the toy world is written
        (["tokenize", "--corpus", small_world["corpus"], "--out", str(tmp_path / "missing" / "big")],
         ["the folder", "missing", "does not exist"]),
        (["pretrain", "--out", str(tmp_path / "empty.txt" / "run"), "--steps", "1"], ["empty.txt", "Not a directory"]),
    ]
    for args, needles in cases:
        assert_clear_error(cli(*args), *needles)
        assert not os.path.exists(out) or os.listdir(out) in ([], [checkpoint.MARKER]), args  # nothing half-written


def test_a_checkpoint_carrying_code_is_refused_and_executes_nothing(tmp_path, cli):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"model": {}, "config": {}, "vocab": [], "step": 0, "x": Payload()}, tmp_path / "checkpoint.pt")
    assert_clear_error(cli("evaluate", "--init", tmp_path, "--data", "x.tsv"), "not a ptft checkpoint")
    assert not marker.exists()


def test_an_existing_run_folder_is_not_overwritten(small_world, cli):
    result = cli("finetune", "--init", small_world["pre"], "--train", small_world["train"], "--out", small_world["pre"])
    assert_clear_error(result, "not empty", "--force")
    assert os.path.exists(os.path.join(small_world["pre"], "checkpoint.pt"))


def test_evaluate_scores_a_classifier_run_and_a_pretraining_run(small_world, tmp_path, cli, device):
    out = str(tmp_path / "ft")
    finetune(out, small_world["pre"], small_world["train"], epochs=1, device=device)
    code, stdout, err = cli("evaluate", "--init", out, "--data", small_world["valid"], "--device", device)
    assert code == 0, err
    metrics = json.loads(stdout.strip().splitlines()[-1])
    assert metrics["n"] == 16 and 0 <= metrics["accuracy"] <= 1 and math.isfinite(metrics["loss"])
    code, stdout, err = cli("evaluate", "--init", small_world["pre"], "--data", small_world["corpus"], "--device", device)
    assert code == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["mlm_loss"] < small_world["metrics"]["ln_vocab"]
    # documents of one sentence each: no B2 pairs to draw, so MLM only and no NSP accuracy (it used to hang)
    single = tmp_path / "single.txt"
    single.write_text("the whale swims\n\nthe stars shine\n\nthe sea is deep\n", encoding="utf-8")
    code, stdout, err = cli("evaluate", "--init", small_world["pre"], "--data", single, "--device", device)
    assert code == 0, err
    metrics = json.loads(stdout.strip().splitlines()[-1])
    assert math.isfinite(metrics["mlm_loss"]) and "nsp_accuracy" not in metrics


def run_cli(*args):
    """ptft.py in a process of its own: where the process boundary is the point (exit status, SIGKILL)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "ptft.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def test_exit_statuses_reach_the_shell(small_world, tmp_path):
    result = run_cli("pretrain", "--out", tmp_path / "out", "--steps", "-3")
    assert_clear_error((result.returncode, result.stdout, result.stderr), "--steps must be at least 1, got -3")
    assert run_cli("--help").returncode == 0


def test_a_run_killed_at_a_random_moment_resumes_bit_identical(tmp_path, device):
    corpus = tmp_path / "corpus.txt"
    data.write_corpus(str(corpus), toyworld.toy_world(seed=2, num_documents=100)["unlabeled"])
    common = ["pretrain", "--corpus", str(corpus), "--steps", "80", "--batch-size", "8", "--max-length", "32",
              "--vocab-size", "300", "--save-every", "2", "--eval-every", "20", "--device", device, "--seed", "1",
              *(["--precision", "fp32"] if device == "cpu" else ["--deterministic"])]  # a GPU: its own precision
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
    # and its record: the held-out evaluations of both halves, as the straight run has them
    history = [json.load(open(folder / "metrics.json"))["history"] for folder in (tmp_path / "reference", run)]
    assert history[0] == history[1] and len(history[0]) >= 2


def test_a_diverged_run_stops_with_status_3_and_leaves_the_last_good_checkpoint_byte_identical(tmp_path, cli):
    corpus = tmp_path / "corpus.txt"
    data.write_corpus(str(corpus), toyworld.toy_world(seed=2, num_documents=60)["unlabeled"])
    common = ["pretrain", "--corpus", str(corpus), "--batch-size", "8", "--max-length", "32", "--vocab-size", "300",
              "--eval-every", "1000", "--device", "cpu", "--precision", "fp32", "--out", str(tmp_path / "run")]
    assert cli(*common, "--steps", "4", "--save-every", "2")[0] == 0
    good = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    # an absurd rate: step 5 still starts from good weights (finite loss), its update ruins them,
    # and step 6's loss is NaN -- a checkpoint of step 5, due with --save-every 1, must never be written
    code, _, stderr = cli(*common, "--resume", "--steps", "10", "--save-every", "1", "--lr", "1e30")
    assert code == 3, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.split("\n") if "error" in line]
    assert len(errors) == 1 and stderr.strip().split("\n")[-1] == errors[0], stderr  # the progress bar aside
    diverged_at = int(errors[0].split("training diverged at step ")[1].split(":")[0])
    assert diverged_at > 4 and ("MLM loss is nan" in errors[0] or "MLM loss is inf" in errors[0]), errors[0]
    assert "(step 4) is untouched" in errors[0]
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == good


def test_an_injected_inf_stops_the_run_before_the_weights_it_touched_are_saved(small_world, tmp_path, monkeypatch):
    recipe = PretrainOptions(corpus=[small_world["corpus"]], steps=3, batch_size=4, max_length=16, vocab_size=300,
                             save_every=1, device="cpu")
    # an infinite gradient norm at step 3 (its loss finite): step 2's weights are never saved either,
    # since no finite step after them vouched for them
    clip_grad_norm, calls = torch.nn.utils.clip_grad_norm_, []

    def infinite_at_step_3(parameters, max_norm):
        calls.append(1)
        norm = clip_grad_norm(parameters, max_norm)
        return torch.tensor(float("inf")) if len(calls) == 3 else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", infinite_at_step_3)
    with pytest.raises(train.TrainingDiverged, match=r"^step 3: the gradient norm is inf .*\(step 1\) is untouched"):
        train.pretrain(str(tmp_path / "a"), recipe, log=quiet, progress=False)
    assert torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["step"] == 1
    monkeypatch.undo()
    # the last update made the weights infinite: no next loss tells, so the weights themselves are looked at
    adamw_step, calls = torch.optim.AdamW.step, []

    def poisoned_at_step_3(self, *args, **kwargs):
        adamw_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            self.param_groups[0]["params"][0].data.fill_(float("inf"))

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_at_step_3)
    with pytest.raises(train.TrainingDiverged, match=r"^step 3: weight .* is not finite after the last update.*\(step 2\) is untouched"):
        train.pretrain(str(tmp_path / "b"), recipe, log=quiet, progress=False)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] == 2


def test_a_diverged_fine_tuning_names_the_classification_loss_and_writes_nothing(small_world, tmp_path, cli):
    out = tmp_path / "ft"
    code, _, stderr = cli("finetune", "--init", small_world["pre"], "--train", small_world["train"], "--out", out,
                          "--lr", "1e30", "--epochs", "3", "--device", "cpu")
    assert code == 3, stderr
    errors = [line for line in stderr.split("\n") if "error" in line]
    assert len(errors) == 1 and "fine-tuning step" in errors[0] and "loss is" in errors[0], stderr
    assert not os.path.exists(out / "checkpoint.pt")


def test_flags_that_cannot_train_are_refused_in_one_line_before_any_work(small_world, tmp_path):
    out = str(tmp_path / "out")
    pretraining = [
        (dict(lr=float("nan")), "--lr must be a number > 0 (and below 1e38), got nan"),
        (dict(lr=0.0), "--lr must be a number > 0 (and below 1e38), got 0.0"),
        (dict(lr=float("inf")), "--lr must be a number > 0 (and below 1e38), got inf"),
        (dict(lr=1e39), "--lr must be a number > 0 (and below 1e38), got 1e+39"),  # inf in float32
        (dict(nsp_weight=-1.0), "--nsp-weight (lambda in B3) must be a finite number >= 0, got -1.0"),
        (dict(nsp_weight=float("nan")), "--nsp-weight (lambda in B3) must be a finite number >= 0, got nan"),
        (dict(steps=0), "--steps must be at least 1, got 0"),
        (dict(batch_size=-2), "--batch-size must be at least 1, got -2"),
        (dict(accumulation=0), "--accum must be at least 1, got 0"),
        (dict(eval_every=0), "--eval-every must be at least 1, got 0"),
        (dict(save_every=-1), "--save-every must be at least 0, got -1"),
        (dict(mask_probability=1.5), "--mask-probability must be between 0 and 1, got 1.5"),
        (dict(dropout=-0.1), "--dropout must be at least 0 and below 1, got -0.1"),
        (dict(mask_token_fraction=0.8, random_token_fraction=0.3), "--mask-token-fraction 0.8 and --random-token-fraction 0.3: each"),
        (dict(hidden_size=100, num_heads=3), "--config tiny: --hidden-size 100 is not divisible by --num-heads 3"),
        (dict(num_heads=3), "--config tiny: hidden_size 128 is not divisible by --num-heads 3"),
        (dict(num_layers=0), "--config tiny: --num-layers must be positive, got 0"),
        (dict(init=small_world["pre"], hidden_size=64), "--hidden-size, --num-layers, --num-heads, --intermediate-size: not with --init"),
    ]
    for flags, message in pretraining:
        with pytest.raises(InputError) as error:
            train.pretrain(out, PretrainOptions(**{"device": "cpu", **flags}), log=quiet, progress=False)
        assert str(error.value).startswith(message) and "\n" not in str(error.value), (flags, str(error.value))
        assert not os.path.exists(out), flags  # refused before the run folder was made
    fine_tuning = [
        (dict(init="scratch", lr=-1.0), "--lr must be a number > 0 (and below 1e38), got -1.0"),
        (dict(init="scratch", epochs=0), "--epochs must be at least 1, got 0"),
        (dict(init="scratch", batch_size=0), "--batch-size must be at least 1, got 0"),
        (dict(init="scratch", hidden_size=96, num_heads=5), "--config tiny: --hidden-size 96 is not divisible by --num-heads 5"),
        (dict(init=small_world["pre"], num_layers=4),
         "--hidden-size, --num-layers, --num-heads, --intermediate-size: only with --init scratch"),
    ]
    for flags, message in fine_tuning:
        with pytest.raises(InputError) as error:
            finetune(out, train_tsv=small_world["train"], **flags)
        assert str(error.value).startswith(message) and "\n" not in str(error.value), (flags, str(error.value))
        assert not os.path.exists(out), flags


def test_size_flags_override_the_config_preset(small_world, tmp_path, cli):
    sizes = {"hidden_size": 48, "num_layers": 1, "num_heads": 3, "intermediate_size": 96}
    code, _, stderr = cli("pretrain", "--corpus", small_world["corpus"], "--out", tmp_path / "pre", "--steps", "2",
                          "--batch-size", "4", "--max-length", "16", "--vocab-size", "300", "--device", "cpu",
                          "--hidden-size", "48", "--num-layers", "1", "--num-heads", "3", "--intermediate-size", "96")
    assert code == 0, stderr
    config = torch.load(tmp_path / "pre" / "checkpoint.pt", weights_only=True)["config"]
    assert {key: config[key] for key in sizes} == sizes
    finetune(tmp_path / "ft", "scratch", small_world["train"], epochs=1, **sizes)
    config = torch.load(tmp_path / "ft" / "checkpoint.pt", weights_only=True)["config"]
    assert {key: config[key] for key in sizes} == sizes


def test_resume_refuses_a_run_of_another_model_naming_each_difference(small_world, tmp_path):
    run = tmp_path / "pre"
    shutil.copytree(small_world["pre"], run)
    before = (run / "checkpoint.pt").read_bytes()
    same = dict(corpus=[small_world["corpus"]], batch_size=16, max_length=32, device="cpu")
    with pytest.raises(InputError) as error:
        train.pretrain(str(run), PretrainOptions(**same, steps=50, vocab_size=400, dropout=0.0, attention="explicit",
                                                 hidden_size=64, num_heads=4), resume=True, log=quiet, progress=False)
    message = str(error.value)
    assert message.startswith(f"{run / 'checkpoint.pt'}: --resume with different settings") and "\n" not in message
    for difference in ["vocab_size: checkpoint 8192 vs now 400", "dropout: checkpoint 0.1 vs now 0.0",
                       "attention: checkpoint 'sdpa' vs now 'explicit'", "hidden_size: checkpoint 128 vs now 64",
                       "num_heads: checkpoint 2 vs now 4"]:
        assert difference in message, message
    # the data and the task too: another batch, sequence length or objective draws other batches
    with pytest.raises(InputError) as error:
        train.pretrain(str(run), PretrainOptions(corpus=[small_world["corpus"]], batch_size=8, max_length=24, nsp=False,
                                                 steps=50, device="cpu"), resume=True, log=quiet, progress=False)
    message = str(error.value)
    for difference in ["batch_size: checkpoint 16 vs now 8", "max_length: checkpoint 32 vs now 24",
                       "nsp: checkpoint True vs now False"]:
        assert difference in message, message
    assert "num_layers" not in message and "intermediate_size" not in message  # only what differs
    assert (run / "checkpoint.pt").read_bytes() == before


def test_a_checkpoint_whose_parts_do_not_fit_is_refused_in_one_line(small_world, tmp_path, cli):
    good = torch.load(os.path.join(small_world["pre"], "checkpoint.pt"), weights_only=True)
    vocab_size = good["config"]["vocab_size"]

    def tampered(**changes):
        checkpoint = {**good, **changes}
        path = tmp_path / "checkpoint.pt"
        torch.save(checkpoint, path)
        return str(path)

    cases = [
        (dict(config={**good["config"], "hidden_size": 64}),
         f"weight encoder.embeddings.token.weight has shape ({vocab_size}, 128), config says ({vocab_size}, 64)"),
        (dict(config={**good["config"], "num_heads": 3}), "the config is not valid (hidden_size 128 is not divisible by num_heads 3)"),
        (dict(config={**good["config"], "colour": "blue"}), "the config is not valid"),
        (dict(config={**good["config"], "intermediate_size": 512.5}), "the config is not valid"),
        (dict(vocab="not a list"), "not a ptft checkpoint"),
        (dict(vocab=good["vocab"][:-1]), f"the vocabulary has {vocab_size - 1} tokens, config says vocab_size {vocab_size}"),
        (dict(model={k: v for k, v in good["model"].items() if k != "nsp_head.weight"}), "weight nsp_head.weight is missing"),
        (dict(model={**good["model"], "encoder.extra": torch.zeros(2)}), "weight encoder.extra is not part of a model"),
        (dict(model={**good["model"], "nsp_head.weight": "not a tensor"}), "weight nsp_head.weight has shape str"),
        (dict(kind="classifier", labels=["a", "b"]), "weight"),  # pre-training weights are not a classifier's
    ]
    for changes, message in cases:
        path = tampered(**changes)
        with pytest.raises(InputError) as error:
            checkpoint.load_checkpoint(path)
        assert str(error.value).startswith(f"{path}: ") and message in str(error.value), str(error.value)
        assert "\n" not in str(error.value)
    assert checkpoint.load_checkpoint(tampered())["step"] == good["step"]  # the untouched checkpoint loads
    assert_clear_error(cli("evaluate", "--init", tampered(vocab=good["vocab"][:10]), "--data", small_world["valid"]),
                       "checkpoint.pt", "the vocabulary has 10 tokens")


def test_texts_longer_than_the_position_table_are_truncated_with_one_note_naming_the_file(small_world, tmp_path):
    long_text = " ".join(["the whale swims in the deep blue sea"] * 10)
    examples = [(long_text, "sea"), (long_text, "sky"), ("short one", "sea"), ("another short", "sky"), (long_text, "sky")]
    path = str(tmp_path / "long.tsv")
    data.write_tsv(path, examples)
    messages = []
    finetuning.finetune(str(tmp_path / "ft"), FinetuneOptions(train=path, epochs=1, max_length=16, device="cpu"),
                   log=messages.append, progress=False)
    notes = [message for message in messages if "truncated" in message]
    assert notes == [f"{path}: note: 3 of 5 texts were longer than the position table (16 tokens) and were truncated"]


def test_device_and_precision_choice_without_the_hardware(monkeypatch):
    # the CUDA/MPS branches, exercised on a CPU-only machine by pretending the hardware is there
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert options.pick_device("auto").type == "cuda"
    assert options.pick_precision("auto", torch.device("cuda")) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert options.pick_precision("auto", torch.device("cuda")) == "fp32"  # fp16 only when asked for
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert options.pick_device("auto").type == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert options.pick_device("auto").type == "cpu"
    with pytest.raises(InputError, match="no CUDA GPU"):
        options.pick_device("cuda")
    for name in ("fp32", "bf16", "fp16"):
        assert options.pick_precision(name, torch.device("cpu")) == name
    with pytest.raises(InputError, match="expected auto, fp32, bf16 or fp16"):
        options.pick_precision("fp8", torch.device("cpu"))
    # autocast: the matmul runs in the 16-bit type asked for, E4's softmax over V in float32
    x, targets = torch.randn(4, 8), torch.tensor([0, 1, 2, 3])
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        with options.autocast(torch.device("cpu"), precision):
            scores = x @ x.T
            loss = model.mlm_loss(scores, targets)
        assert scores.dtype == dtype and loss.dtype == torch.float32
        assert torch.equal(loss, model.mlm_loss(scores.float(), targets))


def test_fp16_skips_a_step_whose_gradients_overflowed_and_keeps_the_scaler_in_the_checkpoint(small_world, tmp_path, monkeypatch):
    # fp16 + GradScaler: an overflowed gradient is not divergence -- the step is skipped and the
    # scale halved -- while the same gradient in fp32 stops the run (previous tests)
    unscale, calls = torch.amp.GradScaler.unscale_, []

    def overflow_at_step_2(self, optimizer):
        calls.append(1)
        if len(calls) == 2:
            optimizer.param_groups[0]["params"][0].grad.fill_(float("inf"))
        return unscale(self, optimizer)

    monkeypatch.setattr(torch.amp.GradScaler, "unscale_", overflow_at_step_2)
    out = tmp_path / "fp16"
    metrics = train.pretrain(str(out), PretrainOptions(corpus=[small_world["corpus"]], steps=3, batch_size=4, max_length=16,
                                                       vocab_size=300, precision="fp16", device="cpu"),
                             log=quiet, progress=False)
    assert len(calls) == 3 and math.isfinite(metrics["final_train_mlm_loss"])
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["scaler"]["scale"] <= 2.0 ** 15  # 2^16 at the start, halved by the skipped step
    assert all(torch.isfinite(value).all() for value in checkpoint["model"].values())


def test_resume_of_a_finished_run_says_so_in_one_line_and_exits_0(small_world, tmp_path, cli):
    run = tmp_path / "pre"
    shutil.copytree(small_world["pre"], run)
    before = (run / "checkpoint.pt").read_bytes()
    code, stdout, stderr = cli("pretrain", "--corpus", small_world["corpus"], "--out", run, "--steps", "40",
                               "--batch-size", "16", "--max-length", "32", "--lr", "2e-3", "--device", "cpu", "--resume")
    assert code == 0 and "Traceback" not in stderr, stderr
    lines = stdout.strip().splitlines()
    final = small_world["metrics"]["final_train_mlm_loss"]
    assert len(lines) == 1 and "already finished at step 40" in lines[0] and f"{final:.3f}" in lines[0], stdout
    assert (run / "checkpoint.pt").read_bytes() == before  # nothing trained, nothing rewritten


def test_deterministic_mode_keeps_the_cpu_numbers_and_ends_with_the_run(small_world, tmp_path):
    recipe = dict(corpus=[small_world["corpus"]], steps=4, batch_size=4, max_length=16, vocab_size=300, device="cpu",
                  precision="fp32")
    plain = train.pretrain(str(tmp_path / "plain"), PretrainOptions(**recipe), log=quiet, progress=False)
    strict = train.pretrain(str(tmp_path / "strict"), PretrainOptions(**recipe, deterministic=True), log=quiet, progress=False)
    assert plain["final_train_mlm_loss"] == strict["final_train_mlm_loss"]
    assert not torch.are_deterministic_algorithms_enabled()  # switched on for the run only


def test_deterministic_mode_refuses_a_gpu_started_without_the_cublas_setting(monkeypatch):
    # cuBLAS reads CUBLAS_WORKSPACE_CONFIG once, when the process first uses the GPU: setting it later does nothing
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(InputError, match="CUBLAS_WORKSPACE_CONFIG=:4096:8"):
        with options.deterministic_algorithms(True):
            pass
    assert not torch.are_deterministic_algorithms_enabled()


def test_autocast_on_this_device_computes_in_16_bits_and_e4_in_float32(device):
    precision = options.pick_precision("auto", torch.device(device))
    x, targets = torch.randn(4, 8, device=device), torch.tensor([0, 1, 2, 3], device=device)
    with options.autocast(torch.device(device), precision):
        scores = x @ x.T
        loss = model.mlm_loss(scores, targets)
    assert scores.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    assert loss.dtype == torch.float32


def test_a_mean_pooled_classifier_trains_evaluates_and_is_refused_by_export(small_world, tmp_path, cli):
    out = tmp_path / "mean"
    code, stdout, stderr = cli("finetune", "--init", small_world["pre"], "--train", small_world["train"], "--valid",
                               small_world["valid"], "--out", out, "--pool", "mean", "--freeze", "head", "--epochs", "2",
                               "--device", "cpu")
    assert code == 0, stderr
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["pool"] == "mean"
    code, stdout, stderr = cli("evaluate", "--init", out, "--data", small_world["valid"], "--device", "cpu")
    assert code == 0 and json.loads(stdout.strip().splitlines()[-1])["accuracy"] == pytest.approx(
        json.loads((out / "metrics.json").read_text())["accuracy"])
    assert_clear_error(cli("export", "--init", out, "--out", tmp_path / "hf"), "--pool mean", "BertForSequenceClassification")
    assert not (tmp_path / "hf").exists()  # refused before anything was written
    assert_clear_error(cli("finetune", "--init", "scratch", "--train", small_world["train"], "--out", tmp_path / "x",
                           "--pool", "max"), "--pool: expected cls or mean, got 'max'")


def test_lora_trains_only_the_low_rank_updates_and_the_head_and_saves_an_ordinary_classifier(small_world, tmp_path):
    rank, out = 4, tmp_path / "lora"
    metrics = finetune(out, small_world["pre"], small_world["train"], small_world["valid"], lora=rank, epochs=2, lr=1e-2)
    before = torch.load(os.path.join(small_world["pre"], "checkpoint.pt"), weights_only=True)["model"]
    after = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    for name, value in after.items():
        if name.startswith("encoder.") and not name.startswith("encoder.pooler"):
            updated = name.endswith(("attention.query.weight", "attention.value.weight"))  # W + B A
            assert torch.equal(value, before[name]) != updated, name
    hidden, layers = 128, 2
    head = hidden * hidden + hidden + hidden * 8 + 8  # pooler + classifier (8 topics)
    low_rank = layers * 2 * rank * (hidden + hidden)  # A and B of query and value in every layer
    assert metrics["trainable_parameters"] == head + low_rank and metrics["task_bytes"] == 4 * (head + low_rank)


def test_task_adaptive_pretraining_continues_mlm_on_the_training_texts_before_fine_tuning(small_world, tmp_path, cli):
    out = tmp_path / "adapted"
    metrics = finetune(out, small_world["pre"], small_world["train"], small_world["valid"], freeze="head", adapt_steps=6,
                       epochs=1)
    adapted = torch.load(out / "adapted" / "run" / "checkpoint.pt", weights_only=True)
    assert adapted["step"] == 6 and adapted["run"]["init"] == small_world["pre"] and not adapted["run"]["nsp"]
    texts = (out / "adapted" / "texts.txt").read_text().split("\n\n")
    assert len([t for t in texts if t.strip()]) == len(data.read_tsv(small_world["train"])[0])  # one document per text
    # the frozen encoder of the classifier is the ADAPTED one, not the original pre-trained one
    original = torch.load(os.path.join(small_world["pre"], "checkpoint.pt"), weights_only=True)["model"]
    tuned = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    name = "encoder.layers.0.attention.query.weight"
    assert torch.equal(tuned[name], adapted["model"][name]) and not torch.equal(tuned[name], original[name])
    assert metrics["adapt_steps"] == 6
    assert_clear_error(cli("finetune", "--init", "scratch", "--train", small_world["train"], "--out", tmp_path / "x",
                           "--adapt-steps", 5), "--adapt-steps", "scratch")
    assert_clear_error(cli("finetune", "--init", out, "--train", small_world["train"], "--out", tmp_path / "x",
                           "--adapt-steps", 5), "--adapt-steps", "MLM head")
    assert not (tmp_path / "x").exists()


