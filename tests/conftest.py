"""Shared fixtures (session scope: built once for the whole suite) and the in-process CLI."""

import os
import sys
import tempfile
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

# the project's files are flat at the top level: make them importable from tests/
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# pretrain caches tokenised corpora on disk (train.TOKEN_CACHE): keep the tests' cache out of
# the user's home folder (subprocesses inherit it)
os.environ.setdefault("PTFT_CACHE", os.path.join(tempfile.gettempdir(), f"ptft-test-cache-{os.getpid()}"))

# --deterministic on a GPU needs cuBLAS's fixed workspace, which cuBLAS reads once, when this process
# first uses it -- before the deterministic tests run, in-process (ptft.main sets it the same way)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import data  # noqa: E402  (after the path and the cache are set)
import ptft  # noqa: E402
import toyworld  # noqa: E402
import train  # noqa: E402
from common import IGNORE_INDEX  # noqa: E402
from model import Config, mlm_loss  # noqa: E402
from options import PretrainOptions  # noqa: E402


def quiet(*args):
    """A log function that says nothing."""


# The tests that depend on the device run on the CPU always, and on CUDA too where there is a GPU.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """A small toy world on disk and a pre-training run of a few steps on its text."""
    folder = tmp_path_factory.mktemp("world")
    world = toyworld.toy_world(seed=5, num_documents=200, labeled_per_class=(4, 2, 2))
    corpus = folder / "unlabeled.txt"
    data.write_corpus(str(corpus), world["unlabeled"])
    metrics = train.pretrain(str(folder / "pre"), PretrainOptions(corpus=[str(corpus)], steps=40, batch_size=16,
                                                                  max_length=32, lr=2e-3, eval_every=20, save_every=0,
                                                                  device="cpu"), log=quiet, progress=False)
    train_tsv, valid_tsv = folder / "train.tsv", folder / "valid.tsv"
    data.write_tsv(str(train_tsv), world["train"])
    data.write_tsv(str(valid_tsv), world["valid"])
    return {"folder": folder, "pre": str(folder / "pre"), "metrics": metrics, "corpus": str(corpus),
            "train": str(train_tsv), "valid": str(valid_tsv)}


class CommandLine:
    """ptft.py's main(argv) run in this process: (exit status, stdout, stderr)."""

    def __init__(self, capsys):
        self.capsys = capsys

    def __call__(self, *args):
        self.capsys.readouterr()  # forget what came before
        status = ptft.main([str(arg) for arg in args])
        captured = self.capsys.readouterr()
        return status, captured.out, captured.err


@pytest.fixture
def cli(capsys):
    return CommandLine(capsys)


def assert_clear_error(result, *needles, status=2):
    """Bad input: the given exit status, at most one line (besides a progress bar), no traceback."""
    code, _, err = result
    assert code == status, err
    lines = err.strip().splitlines()
    assert len(lines) <= 2 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


# ----------------------------------------------------------------------------------------
# Small models and random batches (test_model.py, test_fast.py)
# ----------------------------------------------------------------------------------------


def small_config(**overrides):
    return replace(Config(vocab_size=97, hidden_size=24, num_layers=2, num_heads=3,
                          intermediate_size=40, max_positions=32), **overrides)


def random_batch(config, batch=5, length=17, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, config.vocab_size, (batch, length), generator=generator)
    lengths = torch.randint(3, length + 1, (batch,), generator=generator)
    lengths[0] = length
    attention_mask = torch.arange(length)[None, :] < lengths[:, None]
    input_ids = input_ids.masked_fill(~attention_mask, 0)
    segment_ids = (torch.arange(length)[None, :] >= (lengths[:, None] // 2)).long() * attention_mask
    selected = (torch.rand(batch, length, generator=generator) < 0.3) & attention_mask
    selected[:, 1] = True  # at least one masked position per row
    mlm_labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    nsp_labels = torch.randint(0, 2, (batch,), generator=generator)
    return input_ids, segment_ids, attention_mask, mlm_labels, nsp_labels


def pretraining_losses(model, input_ids, segment_ids, attention_mask, mlm_labels, nsp_labels=None,
                       nsp_weight=1.0, num_masked_total=None, speed=None):
    """(B3's total, E4's MLM loss, the NSP loss or None) from PreTrainingModel's scores, the lines
    of train.pretraining_step."""
    scores, targets, nsp_scores = model(input_ids, segment_ids, attention_mask, mlm_labels,
                                        with_nsp=nsp_labels is not None, speed=speed)
    loss_mlm = mlm_loss(scores, targets, num_masked_total)
    if nsp_labels is None:
        return loss_mlm, loss_mlm, None
    loss_nsp = F.cross_entropy(nsp_scores.float(), nsp_labels)
    return loss_mlm + nsp_weight * loss_nsp, loss_mlm, loss_nsp
