"""C7's task file as a specification: `finetune --save delta` keeps only what trained (the head, the
top-K layers, LoRA's unmerged A and B), a few percent of the model; read on top of the run it was
trained from it is the fine-tuned classifier bit for bit; it refuses any other base, and a damaged
file, in one line."""

import json
import os

import pytest
import torch

import deploy
import finetuning
from checkpoint import TASK_FILE, load_checkpoint, open_model, read_task_file
from common import InputError
from conftest import assert_clear_error, quiet
from evaluation import classifier_logits
from options import FinetuneOptions

# what trains in each run: --freeze head, --freeze top-2, --lora 4, LoRA on every projection and the
# token-embedding table, LoRA with the embedding layer trained whole (everything else is the base)
KINDS = {"head": dict(freeze="head"), "top-2": dict(freeze="top-2"), "lora-4": dict(lora=4),
         "lora-embeddings": dict(lora=2, lora_targets="all+embeddings"),
         "lora-table": dict(lora=2, lora_targets="all+embedding-table")}


@pytest.fixture(scope="module")
def runs(small_world, tmp_path_factory):
    """Each kind fine-tuned twice from the small world's pre-training run, the same seed: once
    saved whole (checkpoint.pt), once as a task file."""
    folder = tmp_path_factory.mktemp("task-files")
    made = {}
    for kind, settings in KINDS.items():
        for save in ("full", "delta"):
            out = str(folder / f"{kind}-{save}")
            finetuning.finetune(out, FinetuneOptions(init=small_world["pre"],
                                                     train=small_world["train"], epochs=1,
                                                     device="cpu", save=save, **settings),
                                log=quiet, progress=False)
            made[kind, save] = out
    return made


def random_rows(vocab_size, count=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 30, (count,), generator=generator)
    return [torch.randint(5, vocab_size, (int(n),), generator=generator).tolist()
            for n in lengths]


@pytest.mark.parametrize("kind", KINDS)
def test_base_plus_task_file_gives_the_merged_models_logits_bit_for_bit(small_world, runs, kind):
    full, _, _ = open_model(runs[kind, "full"], quiet)
    delta, _, checkpoint = open_model(runs[kind, "delta"], quiet, base=small_world["pre"])
    assert checkpoint["task_file"].endswith(TASK_FILE)
    assert not os.path.exists(os.path.join(runs[kind, "delta"], "checkpoint.pt"))
    full_state, delta_state = full.state_dict(), delta.state_dict()
    assert full_state.keys() == delta_state.keys()
    assert all(torch.equal(full_state[name], delta_state[name]) for name in full_state)
    rows = random_rows(full.config.vocab_size)
    assert torch.equal(classifier_logits(full, rows, "cpu"), classifier_logits(delta, rows, "cpu"))


@pytest.mark.parametrize("kind", KINDS)
def test_a_task_file_holds_exactly_the_tensors_that_trained(runs, kind):
    tensors, metadata = read_task_file(os.path.join(runs[kind, "delta"], TASK_FILE))
    names = set(tensors)
    head = {"encoder.pooler.weight", "encoder.pooler.bias", "classifier.weight", "classifier.bias"}
    assert head <= names
    rest = names - head
    if kind == "head":
        assert not rest
    elif kind == "top-2":  # the small world's model has 2 layers: both train, embeddings do not
        assert rest and all(name.startswith(("encoder.layers.0.", "encoder.layers.1."))
                            for name in rest)
    elif kind == "lora-4":  # LoRA: A and B of every layer's query and value, never the merged weights
        assert rest == {f"encoder.layers.{i}.attention.{p}.{m}" for i in range(2)
                        for p in ("query", "value") for m in "AB"}
        assert tensors["encoder.layers.0.attention.query.A"].shape[0] == 4
        assert json.loads(metadata["lora_scale"]) == 1.0  # alpha = r by default
    else:  # every projection's A and B; the table's own A and B, or the embedding layer whole
        projections = {f"encoder.layers.{i}.{p}.{m}" for i in range(2) for m in "AB"
                       for p in ("attention.query", "attention.key", "attention.value", "attention.output",
                                 "feed_forward_in", "feed_forward_out")}
        embeddings = ({"encoder.embeddings.token.A", "encoder.embeddings.token.B"} if kind == "lora-embeddings"
                      else {f"encoder.embeddings.{name}" for name in ("token.weight", "position.weight",
                            "segment.weight", "layer_norm.weight", "layer_norm.bias")})
        assert rest == projections | embeddings


@pytest.mark.parametrize("kind", ["head", "lora-4"])
def test_a_head_only_or_lora_4_task_file_is_at_most_5_percent_of_the_full_model(runs, kind):
    task_bytes = os.path.getsize(os.path.join(runs[kind, "delta"], TASK_FILE))
    full_bytes = os.path.getsize(os.path.join(runs[kind, "full"], "checkpoint.pt"))
    assert task_bytes <= 0.05 * full_bytes, (task_bytes, full_bytes)
    metrics = json.loads(open(os.path.join(runs[kind, "delta"], "metrics.json")).read())
    assert metrics["saved_as"] == TASK_FILE and metrics["saved_bytes"] == task_bytes


def test_evaluate_and_export_read_a_task_file_on_top_of_its_base(small_world, runs, cli, tmp_path):
    code, stdout, stderr = cli("evaluate", "--init", runs["lora-4", "full"], "--data",
                               small_world["valid"], "--device", "cpu")
    assert code == 0, stderr
    code, delta_stdout, stderr = cli("evaluate", "--init", runs["lora-4", "delta"], "--base",
                                     small_world["pre"], "--data", small_world["valid"],
                                     "--device", "cpu")
    assert code == 0, stderr
    assert json.loads(delta_stdout) == json.loads(stdout)
    for save, base in (("full", []), ("delta", ["--base", small_world["pre"]])):
        code, _, stderr = cli("export", "--init", runs["lora-4", save], *base, "--out",
                              tmp_path / save)
        assert code == 0, stderr
    assert ((tmp_path / "full" / "model.safetensors").read_bytes()
            == (tmp_path / "delta" / "model.safetensors").read_bytes())
    # fill-mask reads it too, and says what any classifier gets: it has no MLM head
    assert_clear_error(cli("fill-mask", "--init", runs["head", "delta"], "--base",
                           small_world["pre"], "a [MASK]"), "no MLM head")


def test_a_task_file_refuses_a_base_it_was_not_trained_from(small_world, runs, cli, tmp_path):
    other = tmp_path / "int8"  # the same run, its weights rounded: no longer the base
    deploy.quantize(str(other), small_world["pre"], log=quiet)
    result = cli("evaluate", "--init", runs["head", "delta"], "--base", other, "--data",
                 small_world["valid"], "--device", "cpu")
    _, metadata = read_task_file(os.path.join(runs["head", "delta"], TASK_FILE))
    assert_clear_error(result, "--base", "not the run", metadata["base"], "fingerprint")
    found = result[2].split("base fingerprint ")[1].split(";")[0]
    assert found != metadata["base"] and "sha256" in found
    # without --base, and --base on a run that is no task file: one line each
    assert_clear_error(cli("evaluate", "--init", runs["head", "delta"], "--data",
                           small_world["valid"]), "--base", "task file")
    assert_clear_error(cli("evaluate", "--init", runs["head", "full"], "--base", small_world["pre"],
                           "--data", small_world["valid"]), "--base", "not a task file")


def test_a_damaged_task_file_is_refused_or_loads_exactly_as_written(small_world, runs, tmp_path):
    path = os.path.join(runs["lora-4", "delta"], TASK_FILE)
    written = open(path, "rb").read()
    reference = load_checkpoint(path, quiet, base=small_world["pre"])["model"]
    generator = torch.Generator().manual_seed(0)
    damaged_path = tmp_path / TASK_FILE
    refused = 0
    for trial in range(60):
        damaged = bytearray(written)
        if trial % 10 == 9:  # cut short
            damaged = damaged[:int(torch.randint(1, len(written), (1,), generator=generator))]
        else:  # one bit flipped
            position = int(torch.randint(0, len(written), (1,), generator=generator))
            damaged[position] ^= 1 << int(torch.randint(0, 8, (1,), generator=generator))
        damaged_path.write_bytes(bytes(damaged))
        try:
            state = load_checkpoint(str(damaged_path), quiet, base=small_world["pre"])["model"]
        except InputError as error:
            assert "\n" not in str(error)
            refused += 1
            continue
        assert all(torch.equal(state[name], reference[name]) for name in reference), trial
    assert refused >= 50  # nearly every change is caught (a flip in the header's padding is not)


def test_save_delta_is_refused_where_everything_trains(small_world, cli, tmp_path):
    assert_clear_error(cli("finetune", "--init", small_world["pre"], "--train", small_world["train"],
                           "--save", "delta", "--out", tmp_path / "full"), "--save delta")
    assert_clear_error(cli("finetune", "--init", "scratch", "--train", small_world["train"],
                           "--freeze", "head", "--save", "delta", "--out", tmp_path / "scratch"),
                       "--save delta")
    assert not (tmp_path / "full").exists()
