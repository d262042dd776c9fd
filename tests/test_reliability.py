"""What ptft promises about its files, as a specification (docs/runs.md, "What ptft promises"):
nothing is lost -- a write is whole or absent, a full disk or an interrupt leaves the old file
and no debris, --force deletes only what ptft made, one writer per folder -- and nothing is
trusted -- a damaged file, a config of impossible sizes, a token set that does not fit, a path
named by a checkpoint, a process of a torchrun that differs: each refused in one line.

The random properties (bit flips, interrupted writes) run PTFT_RELIABILITY_TRIALS trials each
(default small, for CI); `PTFT_RELIABILITY_TRIALS=2000 pytest tests/test_reliability.py` runs more.
"""

import errno
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import checkpoint
import common
import data
import hf
import parallel
import toyworld
import train
from common import InputError
from conftest import ROOT, assert_clear_error, quiet
from model import PreTrainingModel, make_config
from options import PretrainOptions
from tokenizer import (
    MAX_WORD_CHARACTERS,
    SPECIAL_TOKENS,
    UNK,
    Tokenizer,
    is_punctuation,
    split_word,
    train_tokenizer,
)

TRIALS = int(os.environ.get("PTFT_RELIABILITY_TRIALS", "60"))


def tiny_checkpoint(seed=0):
    """A small but complete pre-training checkpoint dict (no training: built in milliseconds)."""
    torch.manual_seed(seed)
    config = make_config("tiny", vocab_size=40, max_positions=16, hidden_size=16, intermediate_size=32, num_layers=1)
    tokenizer = Tokenizer(SPECIAL_TOKENS + [f"w{i}" for i in range(35)])
    return checkpoint.make_checkpoint("pretraining", PreTrainingModel(config).state_dict(), config, tokenizer, step=3,
                                      run={"corpus": "x.txt", "seed": 0}, history=[{"step": 3, "train_mlm_loss": 1.5}])


def same(a, b):
    """Two loaded checkpoints (nested dicts, lists, tensors) hold exactly the same values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def flip_bit(path, rng):
    raw = bytearray(open(path, "rb").read())
    position = int(rng.integers(len(raw)))
    raw[position] ^= 1 << int(rng.integers(8))
    with open(path, "wb") as f:
        f.write(raw)


@pytest.fixture
def run_copy(small_world, tmp_path):
    """A private copy of the session's finished 40-step pre-training run."""
    run = tmp_path / "pre"
    shutil.copytree(small_world["pre"], run)
    return run


PRETRAIN_FLAGS = ("--batch-size", "16", "--max-length", "32", "--lr", "2e-3", "--device", "cpu")


# ----------------------------------------------------------------------------------------
# 1. Integrity: a damaged file is refused, never loaded with other values
# ----------------------------------------------------------------------------------------


def test_a_random_bit_flip_in_a_checkpoint_is_refused_or_changes_nothing(tmp_path):
    original = tiny_checkpoint()
    clean = tmp_path / "clean.pt"
    checkpoint.save_atomic(str(clean), original)
    rng, outcomes = np.random.default_rng(0), {"refused": 0, "identical": 0}
    for _ in range(TRIALS):
        damaged = tmp_path / "checkpoint.pt"
        shutil.copyfile(clean, damaged)
        flip_bit(damaged, rng)
        try:
            loaded = checkpoint.load_checkpoint(str(damaged))
        except InputError:
            outcomes["refused"] += 1
            continue
        assert same(loaded, original), "a flipped bit loaded with different values"
        outcomes["identical"] += 1
    assert outcomes["refused"] > 0


def test_a_flipped_weight_or_a_truncated_file_is_refused_on_the_command_line(run_copy, small_world, cli):
    path = run_copy / "checkpoint.pt"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x40  # in the middle of the file: tensor data
    path.write_bytes(raw)
    assert_clear_error(cli("evaluate", "--init", run_copy, "--data", small_world["corpus"]), "checkpoint.pt")
    path.write_bytes(raw[: len(raw) // 3])
    assert_clear_error(cli("pretrain", "--corpus", small_world["corpus"], "--out", run_copy, "--steps", "40", "--resume",
                           *PRETRAIN_FLAGS), "checkpoint.pt")


def test_non_finite_weights_are_refused_on_load(tmp_path):
    payload = tiny_checkpoint()
    payload["model"]["encoder.embeddings.token.weight"][3, 2] = float("inf")
    checkpoint.save_atomic(str(tmp_path / "checkpoint.pt"), payload)
    with pytest.raises(InputError, match="NaN or infinite"):
        checkpoint.load_checkpoint(str(tmp_path))


def test_a_random_bit_flip_in_an_exported_folder_is_refused_or_changes_nothing(tmp_path):
    original = tiny_checkpoint()
    clean = tmp_path / "clean"
    hf.export(original, str(clean))
    reference = checkpoint.load_checkpoint(str(clean))
    names = sorted(name for name in os.listdir(clean) if not name.startswith("."))
    rng, refused = np.random.default_rng(1), 0
    for _ in range(max(10, TRIALS // 3)):
        damaged = tmp_path / "damaged"
        shutil.rmtree(damaged, ignore_errors=True)
        shutil.copytree(clean, damaged)
        flip_bit(damaged / names[int(rng.integers(len(names)))], rng)
        try:
            loaded = checkpoint.load_checkpoint(str(damaged))
        except InputError:
            refused += 1
            continue
        loaded["source"] = reference["source"]  # the folder's own path
        assert same(loaded, reference)
    assert refused > 0
    raw = bytearray((clean / "model.safetensors").read_bytes())
    raw[-5] ^= 0x7F  # inside the last float of the data
    (clean / "model.safetensors").write_bytes(raw)
    with pytest.raises(InputError, match="SHA-256"):
        checkpoint.load_checkpoint(str(clean))


# ----------------------------------------------------------------------------------------
# 2. A run's state is decided from its checkpoint, never from metrics.json
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["deleted", "corrupt", "stale"])
def test_a_finished_run_without_good_metrics_is_finished_and_its_metrics_are_rebuilt(run_copy, small_world, cli, damage):
    metrics_path = run_copy / "metrics.json"
    if damage == "deleted":
        metrics_path.unlink()
    elif damage == "corrupt":
        metrics_path.write_text('{"step": 40, "hist')
    else:
        metrics_path.write_text(json.dumps({"step": 12}))
    before = (run_copy / "checkpoint.pt").read_bytes()
    code, out, err = cli("pretrain", "--corpus", small_world["corpus"], "--out", run_copy, "--steps", "40", "--resume",
                         *PRETRAIN_FLAGS)
    assert code == 0 and "already finished at step 40" in out and "Traceback" not in err, err
    assert (run_copy / "checkpoint.pt").read_bytes() == before
    rebuilt = json.loads(metrics_path.read_text())
    assert rebuilt["step"] == 40 and rebuilt["history"] == small_world["metrics"]["history"]


def test_resume_with_fewer_steps_than_done_is_refused_and_rewrites_nothing(run_copy, small_world, cli):
    before = (run_copy / "checkpoint.pt").read_bytes()
    result = cli("pretrain", "--corpus", small_world["corpus"], "--out", run_copy, "--steps", "10", "--resume", *PRETRAIN_FLAGS)
    assert_clear_error(result, "step 40", "--steps 10")
    assert (run_copy / "checkpoint.pt").read_bytes() == before


def test_metrics_without_a_checkpoint_is_not_nothing_to_do(run_copy, small_world, cli):
    (run_copy / "checkpoint.pt").unlink()
    result = cli("pretrain", "--corpus", small_world["corpus"], "--out", run_copy, "--steps", "40", "--resume", *PRETRAIN_FLAGS)
    assert_clear_error(result, "no checkpoint.pt")


def test_evaluate_out_refuses_a_run_folder(run_copy, small_world, cli):
    before = (run_copy / "metrics.json").read_bytes()
    assert_clear_error(cli("evaluate", "--init", run_copy, "--data", small_world["corpus"], "--out", run_copy), "run folder")
    assert (run_copy / "metrics.json").read_bytes() == before


# ----------------------------------------------------------------------------------------
# 3. A changed corpus is noticed on --resume
# ----------------------------------------------------------------------------------------


def test_resume_on_a_changed_corpus_is_refused(tmp_path):
    corpus = tmp_path / "corpus.txt"
    world = toyworld.toy_world(seed=3, num_documents=40)["unlabeled"]
    data.write_corpus(str(corpus), world)
    recipe = dict(corpus=[str(corpus)], batch_size=4, max_length=16, vocab_size=200, hidden_size=16, num_layers=1,
                  num_heads=2, intermediate_size=32, device="cpu", save_every=0)
    train.pretrain(str(tmp_path / "run"), PretrainOptions(steps=2, **recipe), log=quiet, progress=False)
    data.write_corpus(str(corpus), world[:-1] + [["a different last document", "of the same corpus file"]])
    with pytest.raises(InputError, match="corpus_fingerprint"):
        train.pretrain(str(tmp_path / "run"), PretrainOptions(steps=4, **recipe), resume=True, log=quiet, progress=False)


# ----------------------------------------------------------------------------------------
# 4. Token files and the token cache are validated
# ----------------------------------------------------------------------------------------


@pytest.fixture
def token_set(tmp_path):
    corpus = tmp_path / "corpus.txt"
    data.write_corpus(str(corpus), toyworld.toy_world(seed=4, num_documents=30)["unlabeled"])
    tokenizer = train_tokenizer((s for d in data.read_corpus([str(corpus)]) for s in d), 120)
    prefix = str(tmp_path / "set")
    data.write_token_file([str(corpus)], tokenizer, prefix)
    return prefix, tokenizer, corpus


@pytest.mark.parametrize("damage, message", [
    ("truncated", "truncated"),
    ("id beyond the vocabulary", "holds id"),
    ("another set's index", "damaged or mixed"),
    ("missing vocabulary", "missing"),
])
def test_a_damaged_token_set_is_refused_in_one_line(token_set, damage, message):
    prefix, tokenizer, _ = token_set
    tokens = f"{prefix}.tokens"
    if damage == "truncated":
        raw = open(tokens, "rb").read()
        open(tokens, "wb").write(raw[:-3])
    elif damage == "id beyond the vocabulary":
        ids = np.fromfile(tokens, dtype=np.uint16)
        ids[len(ids) // 2] = len(tokenizer) + 5
        ids.tofile(tokens)
    elif damage == "another set's index":
        documents = np.load(f"{prefix}.documents.npy")
        np.save(f"{prefix}.documents.npy", documents[:-1])
    else:
        os.unlink(f"{prefix}.vocab.txt")
    with pytest.raises(InputError, match=message):
        data.load_corpus([tokens])


def test_a_damaged_token_cache_is_rebuilt_not_trusted(tmp_path):
    documents = toyworld.toy_world(seed=4, num_documents=20)["unlabeled"]
    tokenizer = train_tokenizer((s for d in documents for s in d), 100)
    expected = data.encode_documents(tokenizer, documents)
    data.encode_documents(tokenizer, documents, str(tmp_path))
    (cached,) = tmp_path.glob("tokens-*.npz")
    with np.load(cached) as arrays:
        tokens, lengths, sizes = arrays["tokens"].copy(), arrays["sentence_lengths"], arrays["document_sizes"]
    tokens[0] = len(tokenizer) + 100  # an id beyond the vocabulary
    np.savez(cached, tokens=tokens, sentence_lengths=lengths, document_sizes=sizes)
    again = data.encode_documents(tokenizer, documents, str(tmp_path))
    assert all(np.array_equal(a, b) for x, y in zip(again, expected) for a, b in zip(x, y))


# ----------------------------------------------------------------------------------------
# 5. One long "word" is one [UNK], in training and in encoding (BERT's rule)
# ----------------------------------------------------------------------------------------


def test_a_word_over_100_characters_is_unk_and_teaches_the_vocabulary_nothing():
    texts = [" ".join(sentence) for sentence in toyworld.toy_world(seed=1, num_documents=40)["unlabeled"]]
    plain = train_tokenizer(texts, 150)
    started = time.time()
    with_long = train_tokenizer(texts + ["x" * 2_000_000, "q" * (MAX_WORD_CHARACTERS + 1)], 150)
    assert time.time() - started < 60  # it took minutes and gigabytes before: the word's characters were merged
    assert with_long.vocab == plain.vocab
    assert plain.tokenize("a " + "b" * (MAX_WORD_CHARACTERS + 1) + " a") == [*plain.tokenize("a"), UNK, *plain.tokenize("a")]
    assert plain.tokenize("b" * MAX_WORD_CHARACTERS) != [UNK]  # 100 characters is still a word


def test_ascii_words_split_as_the_character_loop_splits_them():
    rng = np.random.default_rng(2)
    alphabet = [chr(c) for c in range(33, 127)]
    for _ in range(2000):
        word = "".join(rng.choice(alphabet, size=int(rng.integers(1, 20))))
        expected, current = [], ""
        for ch in word.lower():
            if is_punctuation(ch):
                expected += [current] if current else []
                expected.append(ch)
                current = ""
            else:
                current += ch
        expected += [current] if current else []
        assert list(split_word(word, True)) == expected


# ----------------------------------------------------------------------------------------
# 6. Text with no tokens, 7. TSV read as written
# ----------------------------------------------------------------------------------------


def test_text_with_no_words_is_refused_in_one_line(tmp_path, run_copy, cli):
    empty = tmp_path / "zero-width.txt"
    empty.write_text("\u200b\u200b\n\u200c\n\n\u200b\n", encoding="utf-8")
    assert_clear_error(cli("evaluate", "--init", run_copy, "--data", empty), "no words")
    assert_clear_error(cli("pretrain", "--init", run_copy, "--corpus", empty, "--no-nsp", "--out", tmp_path / "p", "--steps", "1",
                           "--device", "cpu"), "no words")
    with pytest.raises(InputError, match="no words"):
        list(data.iter_documents([str(empty)]))


def test_a_tsv_has_exactly_two_columns_and_lines_end_only_at_line_breaks(tmp_path):
    three = tmp_path / "three.tsv"
    three.write_text("a text\tsea\t17\nanother\tland\t18\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"three.tsv:1: .*3 columns"):
        data.read_tsv(str(three))
    odd = tmp_path / "odd.tsv"
    odd.write_text("page\fbreak and a\u2028line separator\tsea\r\nplain\tland\n", encoding="utf-8")
    assert data.read_tsv(str(odd)) == (["page\fbreak and a\u2028line separator", "plain"], ["sea", "land"])


# ----------------------------------------------------------------------------------------
# 8. Nothing is written before the inputs are known good
# ----------------------------------------------------------------------------------------


def test_a_refused_run_leaves_nothing_that_refuses_the_corrected_command(tmp_path, cli):
    corpus = tmp_path / "one-document.txt"
    corpus.write_text("the whale swims in the sea\nthe sea is deep\n", encoding="utf-8")
    out = tmp_path / "run"
    small = ("--vocab-size", "64", "--hidden-size", "16", "--num-layers", "1", "--num-heads", "2", "--intermediate-size", "32",
             "--steps", "1", "--batch-size", "2", "--max-length", "16", "--device", "cpu")
    assert_clear_error(cli("pretrain", "--corpus", corpus, "--out", out, *small), "next-sentence prediction")
    assert os.listdir(out) in ([], [common.MARKER])
    code, _, err = cli("pretrain", "--corpus", corpus, "--out", out, "--no-nsp", *small)
    assert code == 0, err


# ----------------------------------------------------------------------------------------
# 9. Write failures: one line, exit 2, the old file intact, no temporary file left
# ----------------------------------------------------------------------------------------


def failing_after(writes, error):
    """A RecordingFile.write that raises `error` at its writes-th call."""
    original, calls = common.RecordingFile.write, [0]

    def write(self, chunk):
        calls[0] += 1
        if calls[0] >= writes:
            self.error = self.error or error
            raise error
        return original(self, chunk)
    return write


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), OSError(errno.EIO, "Input/output error"),
                                   OSError(errno.EROFS, "Read-only file system"), KeyboardInterrupt()])
def test_an_interrupted_save_at_a_random_point_keeps_the_old_file_and_leaves_no_debris(tmp_path, monkeypatch, error):
    path = str(tmp_path / "checkpoint.pt")
    old, new = tiny_checkpoint(0), tiny_checkpoint(1)
    checkpoint.save_atomic(path, old)
    rng = np.random.default_rng(3)
    for _ in range(max(4, TRIALS // 6)):
        monkeypatch.setattr(common.RecordingFile, "write", failing_after(int(rng.integers(1, 30)), error))
        with pytest.raises(type(error)) as raised:
            checkpoint.save_atomic(path, new)
        monkeypatch.undo()
        if isinstance(error, OSError):  # the error underneath, naming the file: not torch's RuntimeError
            assert raised.value.errno == error.errno and raised.value.filename == path
        assert os.listdir(tmp_path) == ["checkpoint.pt"]
        assert same(checkpoint.load_checkpoint(path), old)


def test_a_full_disk_is_one_line_on_the_command_line_for_pretrain_export_and_tokenize(small_world, run_copy, tmp_path, cli,
                                                                                     monkeypatch):
    monkeypatch.setattr(common.RecordingFile, "write", failing_after(1, OSError(errno.ENOSPC, "No space left on device")))
    out = tmp_path / "new-run"
    assert_clear_error(cli("pretrain", "--corpus", small_world["corpus"], "--out", out, "--steps", "2", "--vocab-size", "200",
                           *PRETRAIN_FLAGS), "No space left on device")
    assert os.listdir(out) in ([], [common.MARKER])
    assert_clear_error(cli("export", "--init", run_copy, "--out", tmp_path / "exported"), "No space left on device")
    assert not [name for name in os.listdir(tmp_path) if name.endswith(common.TEMPORARY_SUFFIX)]
    prefix = tmp_path / "set"
    assert_clear_error(cli("tokenize", "--corpus", small_world["corpus"], "--out", prefix, "--init", run_copy, "--workers", "1"),
                       "No space left on device")
    assert not list(tmp_path.glob("set.*")) and not list(tmp_path.glob(".set.*"))


def test_an_interrupt_during_a_save_ends_with_the_same_line_as_outside_one(small_world, tmp_path, cli, monkeypatch):
    monkeypatch.setattr(common.RecordingFile, "write", failing_after(5, KeyboardInterrupt()))
    code, _, err = cli("pretrain", "--corpus", small_world["corpus"], "--out", tmp_path / "run", "--steps", "2",
                       "--vocab-size", "200", *PRETRAIN_FLAGS)
    assert code == 130 and "interrupted" in err and "Traceback" not in err, err


# ----------------------------------------------------------------------------------------
# 10. tokenize never replaces a token set unasked, nor destroys it when it fails
# ----------------------------------------------------------------------------------------


def test_tokenize_refuses_an_existing_prefix_and_a_failed_replacement_keeps_the_old_set(token_set, cli, monkeypatch):
    prefix, tokenizer, corpus = token_set
    before = {path: open(path, "rb").read() for path in data.token_set_files(prefix)}
    assert_clear_error(cli("tokenize", "--corpus", corpus, "--out", prefix, "--workers", "1"), "--force")
    monkeypatch.setattr(common.RecordingFile, "write", failing_after(3, OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(OSError):
        data.write_token_file([str(corpus)], tokenizer, prefix, force=True)
    monkeypatch.undo()
    assert {path: open(path, "rb").read() for path in data.token_set_files(prefix)} == before
    assert len(data.load_corpus([f"{prefix}.tokens"])[1]) > 0


# ----------------------------------------------------------------------------------------
# 11. Temporary files: unique, exclusive, never through a symbolic link
# ----------------------------------------------------------------------------------------


def test_a_planted_symbolic_link_is_never_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    folder = tmp_path / "run"
    folder.mkdir()
    for name in ("checkpoint.pt.tmp", "metrics.json.tmp", "checkpoint.pt"):
        os.symlink(victim, folder / name)
    checkpoint.save_atomic(str(folder / "checkpoint.pt"), tiny_checkpoint())
    checkpoint.write_json(str(folder / "metrics.json"), {"step": 1})
    assert victim.read_text() == "precious" and not (folder / "checkpoint.pt").is_symlink()
    assert same(checkpoint.load_checkpoint(str(folder)), tiny_checkpoint())


def test_export_leaves_unrelated_folders_alone_and_writes_through_a_linked_folder(run_copy, tmp_path, cli):
    unrelated = tmp_path / "m.partial"
    unrelated.mkdir()
    (unrelated / "mine.txt").write_text("keep")
    code, _, err = cli("export", "--init", run_copy, "--out", tmp_path / "m")
    assert code == 0 and (unrelated / "mine.txt").read_text() == "keep", err
    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "link")
    code, _, err = cli("export", "--init", run_copy, "--out", tmp_path / "link")
    assert code == 0 and (real / "model.safetensors").exists(), err
    assert checkpoint.load_checkpoint(str(tmp_path / "link"))["kind"] == "pretraining"


# ----------------------------------------------------------------------------------------
# 12. --force deletes only what ptft made
# ----------------------------------------------------------------------------------------


def test_force_deletes_only_a_folder_ptft_made_never_the_working_folder_nor_an_input(run_copy, small_world, tmp_path, cli,
                                                                                 monkeypatch):
    repository = tmp_path / "myrepo"
    (repository / ".git").mkdir(parents=True)
    (repository / "code.py").write_text("print('mine')")
    flags = ("--corpus", small_world["corpus"], "--steps", "1", "--vocab-size", "200", *PRETRAIN_FLAGS)
    assert_clear_error(cli("pretrain", "--out", repository, "--force", *flags), "not a folder ptft made")
    assert (repository / "code.py").exists()
    monkeypatch.chdir(run_copy)
    assert_clear_error(cli("pretrain", "--out", ".", "--force", *flags), "working folder")
    assert (run_copy / "checkpoint.pt").exists()
    monkeypatch.chdir(tmp_path)
    assert_clear_error(cli("finetune", "--init", run_copy, "--train", small_world["train"], "--out", run_copy, "--force"),
                       "--init")
    assert (run_copy / "checkpoint.pt").exists()
    code, _, err = cli("pretrain", "--out", run_copy, "--force", *flags)  # a run folder ptft made: replaced
    assert code == 0, err


# ----------------------------------------------------------------------------------------
# 13. A Hugging Face config.json is checked before anything is allocated
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": 10 ** 9}, "hidden_size"), ({"hidden_size": 1e9}, "whole number"), ({"num_hidden_layers": 2.0}, "whole number"),
    ({"vocab_size": -5}, "vocab_size"), ({"hidden_dropout_prob": 5.0}, "[0, 1)"), ({"attention_probs_dropout_prob": -0.1}, "[0, 1)"),
    ({"layer_norm_eps": float("nan")}, "layer_norm_eps"), ({"max_position_embeddings": True}, "whole number"),
])
def test_a_config_of_impossible_sizes_is_refused_before_allocation(run_copy, tmp_path, change, message):
    folder = tmp_path / "bert"
    hf.export(checkpoint.load_checkpoint(str(run_copy)), str(folder))
    os.unlink(folder / hf.CHECKSUMS)  # edited on purpose, as people edit downloaded configs
    settings = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**settings, **change}))
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace(")", r"\)")):
        checkpoint.load_checkpoint(str(folder))


def test_a_config_larger_than_the_memory_is_refused_with_the_numbers(monkeypatch):
    monkeypatch.setattr(hf, "available_memory", lambda: 2 ** 30)
    values = dict(vocab_size=30522, hidden_size=4096, num_layers=48, num_heads=32, intermediate_size=16384, max_positions=512)
    with pytest.raises(InputError, match="GiB of memory is available"):
        hf.check_config_values(values, "config.json")
    hf.check_config_values({**values, "num_layers": 1, "hidden_size": 64, "num_heads": 2, "intermediate_size": 128}, "c")


def test_the_parameter_count_estimate_is_exact_for_bert():
    config = make_config("tiny", vocab_size=300, max_positions=64)
    assert hf.parameter_count(config.to_dict()) == sum(p.numel() for p in PreTrainingModel(config).parameters())


# ----------------------------------------------------------------------------------------
# 14. A path named by a checkpoint is read only if it is still the text it recorded
# ----------------------------------------------------------------------------------------


def test_a_corpus_path_in_a_checkpoint_is_never_opened_on_its_word(tmp_path, monkeypatch):
    # the text behind a pre-trained run is read only where the user names it (--unlabeled) or the
    # checkpoint names a built-in corpus; any path it stores -- the very file, a device, a FIFO,
    # /etc/passwd -- is not opened at all (open and os.stat are watched)
    text = tmp_path / "corpus.txt"
    data.write_corpus(str(text), toyworld.toy_world(seed=6, num_documents=30)["unlabeled"])
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: opened.append(str(path)) or real_open(path, *a, **k))
    for stored in [str(text), "/dev/zero", str(fifo), "/etc/passwd", str(tmp_path / "missing")]:
        assert data.pretraining_text(stored) is None
    assert not [path for path in opened if str(tmp_path) in path or path.startswith(("/dev", "/etc"))]
    training, held_out = data.pretraining_text(str(text), [str(text)])  # named by the user: read
    assert len(training) + len(held_out) == 30
    assert data.pretraining_text("toy-world") is not None  # a built-in corpus may be named


# ----------------------------------------------------------------------------------------
# 15. torchrun: the processes agree, or all refuse; a lost process ends all
# ----------------------------------------------------------------------------------------


def test_processes_that_differ_all_refuse_with_the_same_line(monkeypatch):
    mine = {"steps": 20, "corpus_fingerprint": "10 bytes, sha256 aa", "vocabulary": "v1"}
    others = [mine, {**mine, "corpus_fingerprint": "11 bytes, sha256 bb"}]
    monkeypatch.setattr(parallel, "gather_from_processes", lambda value, processes: others)
    with pytest.raises(InputError, match="corpus_fingerprint differs: rank 0 has '10 bytes, sha256 aa', rank 1"):
        parallel.refuse_differences(mine, parallel.Processes(rank=1, world_size=2))
    others[1] = mine
    parallel.refuse_differences(mine, parallel.Processes(rank=1, world_size=2))


def test_the_collective_timeout_is_minutes_and_a_failed_collective_is_one_line(monkeypatch):
    assert 60 <= parallel.collective_timeout().total_seconds() <= 600
    monkeypatch.setenv("PTFT_COLLECTIVE_TIMEOUT", "7")
    assert parallel.collective_timeout().total_seconds() == 7
    monkeypatch.setenv("PTFT_COLLECTIVE_TIMEOUT", "soon")
    with pytest.raises(InputError, match="PTFT_COLLECTIVE_TIMEOUT"):
        parallel.collective_timeout()
    monkeypatch.setenv("PTFT_COLLECTIVE_TIMEOUT", "7")
    with pytest.raises(parallel.ProcessesLost, match="another process stopped"):
        with parallel.lost_processes_said_in_one_line():
            raise RuntimeError("[gloo] Timed out waiting 7000ms for recv operation to complete\nmore")


# ----------------------------------------------------------------------------------------
# 16. One writer per folder
# ----------------------------------------------------------------------------------------


def test_a_second_writer_is_refused_and_the_lock_dies_with_its_holder(small_world, tmp_path, cli):
    out = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; os.makedirs(sys.argv[1]); d = os.open(sys.argv[1], os.O_RDONLY);"
        "fcntl.flock(d, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)"), str(out)], stdout=subprocess.PIPE,
        text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert_clear_error(cli("pretrain", "--corpus", small_world["corpus"], "--out", out, "--resume", "--steps", "1",
                               "--vocab-size", "200", *PRETRAIN_FLAGS), "another ptft process")
    finally:
        holder.kill()
        holder.wait()
    checkpoint.prepare_out_folder(str(out), resume=True)  # the holder is gone: so is its lock


def test_two_pretrains_on_one_folder_one_refused_never_both_done(small_world, tmp_path):
    out = tmp_path / "same"
    command = [sys.executable, os.path.join(ROOT, "ptft.py"), "pretrain", "--corpus", small_world["corpus"], "--out", str(out),
               "--steps", "3", "--vocab-size", "200", *PRETRAIN_FLAGS]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(run.wait(timeout=300), run.stdout.read(), run.stderr.read()) for run in runs]
    done = [r for r in results if r[0] == 0]
    refused = [r for r in results if r[0] == 2]
    assert len(done) + len(refused) == 2 and len(done) >= 1, results
    for _, _, err in refused:
        assert "Traceback" not in err and ("another ptft process" in err or "not empty" in err), err
    assert checkpoint.load_checkpoint(str(out))["step"] == 3


def test_a_lock_taken_elsewhere_refuses_in_process(tmp_path):
    out = tmp_path / "locked"
    out.mkdir()
    other = os.open(out, os.O_RDONLY)  # another open description: to flock, another process
    try:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(InputError, match="another ptft process"):
            checkpoint.prepare_out_folder(str(out))
    finally:
        os.close(other)
    checkpoint.prepare_out_folder(str(out))
