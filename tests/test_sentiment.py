"""The real task that is not topic (data.prepare_sentiment, `ptft.py data sentiment`, the
sentiment plans of experiments.py) as a specification, on a tiny fake archive built here: no
network in the tests."""

import io
import json
import os
import subprocess
import tarfile

import pytest

import data
import experiments
from common import InputError
from conftest import assert_clear_error

POSITIVE = ["a wonderful film", "moving and funny", "the best of the year", "a joy to watch",
            "superb acting throughout", "clever and warm", "a small delight", "truly great fun"]
NEGATIVE = ["a dreadful film", "dull and long", "the worst of the year", "a chore to sit through",
            "wooden acting throughout", "clumsy and cold", "a tiresome mess", "truly bad fun"]


def labeled_file():
    """id<TAB>mean rating<TAB>text: 30 positive, 30 negative, 2 rated 0, one text twice."""
    lines = []
    for i in range(30):
        lines.append(f"{2 * i + 1}\t{1.5 + i / 30:.3f}\t{POSITIVE[i % 8]}, scene {i}")
        lines.append(f"{2 * i + 2}\t{-1.5 - i / 30:.3f}\t{NEGATIVE[i % 8]}, scene {i}")
    lines += ["61\t0\tit is a film", "62\t0.0\tthe film has a title",
              f"63\t2.0\t{POSITIVE[0]}, scene 0"]  # the same text as id 1
    return "\r\n".join(lines) + "\r\n"  # the archive's files end lines with \r\n


def unlabeled_file(kind, n=60):
    return "".join(f"{i}\t0.5\t{kind} sentence number {i} of the unlabeled text\n" for i in range(n))


def tar_gz(members):
    """{name: bytes} -> the bytes of a .tar.gz holding them."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def fake_archive(folder, labeled=None, leave_out=()):
    """A source distribution shaped like vaderSentiment 3.3.2's: the data set's tar.gz inside
    the package's tar.gz. Returns (path, its SHA-256)."""
    files = {data.SENTIMENT_LABELED: (labeled or labeled_file()).encode("utf-8")}
    for name in data.SENTIMENT_UNLABELED:
        files[name] = unlabeled_file(os.path.basename(name).split("_")[0]).encode("utf-8")
    files = {name: content for name, content in files.items() if name not in leave_out}
    outer = tar_gz({"vaderSentiment-3.3.2/setup.py": b"", data.SENTIMENT_INNER: tar_gz(files)})
    path = os.path.join(folder, data.SENTIMENT_ARCHIVE)
    with open(path, "wb") as f:
        f.write(outer)
    return path, data.sha256_of(path)


def read_split(folder, name):
    texts, labels = data.read_tsv(os.path.join(folder, f"{name}.tsv"))
    return list(zip(texts, labels))


def test_the_prepared_files_hold_every_rated_sentence_once_labeled_by_the_sign_of_its_rating(
        tmp_path):
    archive, sha256 = fake_archive(str(tmp_path))
    out = str(tmp_path / "sentiment")
    counts = data.prepare_sentiment(out, archive, sha256, log=lambda *a: None)
    splits = {name: read_split(out, name) for name in ("train", "valid", "test")}
    every = [example for split in splits.values() for example in split]
    # 60 rated sentences: the two rated 0 are left out, the text given twice is kept once
    assert len(every) == len({text for text, _ in every}) == 60
    assert {label for _, label in every} == {"positive", "negative"}
    for text, label in every:
        assert (label == "positive") == any(text.startswith(p) for p in POSITIVE)
    assert counts == {"train.tsv": 48, "valid.tsv": 6, "test.tsv": 6, "unlabeled.txt": 3 * 60 + 48}
    # pre-training may read the train texts and the other snippets, never a valid or test text
    unlabeled = {s for d in data.read_corpus([os.path.join(out, "unlabeled.txt")]) for s in d}
    assert {text for text, _ in splits["train"]} <= unlabeled
    assert not unlabeled & {text for text, _ in splits["valid"] + splits["test"]}
    assert "nytEditorialSnippets sentence number 3 of the unlabeled text" in unlabeled
    source = open(os.path.join(out, "SOURCE.txt"), encoding="utf-8").read()
    assert "MIT" in source and sha256 in source


def test_the_split_is_deterministic_disjoint_complete_and_keeps_the_labels_shares():
    examples = [(f"text {i}", "positive" if i % 3 else "negative") for i in range(300)]
    for seed in range(5):
        splits = data.split_examples(examples, 0.1, 0.2, seed)
        assert splits == data.split_examples(examples, 0.1, 0.2, seed)  # the same seed, the same
        sets = {name: set(split) for name, split in splits.items()}
        assert not (sets["train"] & sets["valid"] or sets["train"] & sets["test"]
                    or sets["valid"] & sets["test"])
        assert sets["train"] | sets["valid"] | sets["test"] == set(examples)
        for name, share in (("valid", 0.1), ("test", 0.2)):
            labels = [y for _, y in splits[name]]
            assert labels.count("negative") == round(share * 100)
            assert labels.count("positive") == round(share * 200)
    assert data.split_examples(examples, 0.1, 0.2, 0) != data.split_examples(examples, 0.1, 0.2, 1)


def test_an_archive_whose_checksum_differs_is_refused_before_anything_is_written(tmp_path, cli):
    archive, _ = fake_archive(str(tmp_path))
    out = tmp_path / "sentiment"
    with pytest.raises(InputError, match="SHA-256"):
        data.prepare_sentiment(str(out), archive)  # the pinned checksum: not the fake's
    assert_clear_error(cli("data", "sentiment", "--archive", archive, "--out", out), "SHA-256",
                       "refused")
    assert not out.exists()


def test_an_archive_without_the_data_set_or_not_an_archive_is_one_line(tmp_path, cli):
    archive, sha256 = fake_archive(str(tmp_path), leave_out=[data.SENTIMENT_LABELED])
    with pytest.raises(InputError, match="has no file"):
        data.prepare_sentiment(str(tmp_path / "a"), archive, sha256)
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a tar file")
    with pytest.raises(InputError, match="not a readable archive"):
        data.prepare_sentiment(str(tmp_path / "b"), str(junk), data.sha256_of(str(junk)))
    broken = labeled_file().replace("\t-1.500\t", "\tvery bad\t")
    archive, sha256 = fake_archive(str(tmp_path), labeled=broken)
    with pytest.raises(InputError, match=r"movieReviewSnippets_GroundTruth.txt:2: expected"):
        data.prepare_sentiment(str(tmp_path / "c"), archive, sha256)


def test_a_failed_download_is_one_line_and_exit_status_2(tmp_path, cli, monkeypatch):
    def no_network(command, **kwargs):
        assert command[1:4] == ["-m", "pip", "download"] and data.SENTIMENT_REQUIREMENT in command
        return subprocess.CompletedProcess(command, 1, "", "ERROR: Could not find a version\n")

    monkeypatch.setattr(data.subprocess, "run", no_network)
    assert_clear_error(cli("data", "sentiment", "--out", tmp_path / "s"), "vaderSentiment==3.3.2",
                       "pip download failed", "Could not find a version")


def test_prepared_files_are_replaced_only_with_force(tmp_path, monkeypatch):
    archive, sha256 = fake_archive(str(tmp_path))
    out = str(tmp_path / "sentiment")
    data.prepare_sentiment(out, archive, sha256, log=lambda *a: None)
    with pytest.raises(InputError, match="--force"):
        data.prepare_sentiment(out, archive, sha256, log=lambda *a: None)
    before = open(os.path.join(out, "train.tsv"), encoding="utf-8").read()
    data.prepare_sentiment(out, archive, sha256, force=True, log=lambda *a: None)
    assert open(os.path.join(out, "train.tsv"), encoding="utf-8").read() == before


def test_the_sentiment_plan_refuses_in_one_line_until_the_data_is_prepared(tmp_path, cli,
                                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)  # the plan reads runs/data/sentiment from here
    assert_clear_error(cli("experiments", "--plan", "sentiment", "--out", tmp_path / "e"),
                       "runs/data/sentiment/train.tsv: missing", "ptft.py data sentiment")
    assert not (tmp_path / "e").exists()


def test_the_sentiment_plan_scores_on_validation_and_reads_test_only_when_final(tmp_path,
                                                                              monkeypatch):
    archive, sha256 = fake_archive(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    data.prepare_sentiment(experiments.SENTIMENT_FOLDER, archive, sha256, log=lambda *a: None)
    plan = {**experiments.PLANS["sentiment"], "sentiment_extra_text": []}
    task = experiments.sentiment_task(plan)
    assert task["test"] == read_split(experiments.SENTIMENT_FOLDER, "valid")
    final = experiments.sentiment_task({**plan, "evaluate_on": "test"})
    assert final["test"] == read_split(experiments.SENTIMENT_FOLDER, "test")
    assert task["train"] == final["train"] == read_split(experiments.SENTIMENT_FOLDER, "train")
    assert experiments.PLANS["sentiment-final"] == {**experiments.PLANS["sentiment-text8"],
                                                    "evaluate_on": "test", "curve_labels_per_class": [],
                                                    "needs_data": "sentiment+text8"}  # no curve: no released encoder


def test_a_tiny_sentiment_plan_runs_to_its_verdicts_and_resumes_without_running_again(
        tmp_path, monkeypatch):
    archive, sha256 = fake_archive(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    data.prepare_sentiment(experiments.SENTIMENT_FOLDER, archive, sha256, log=lambda *a: None)
    plan = {**experiments.PLANS["sentiment"], "sentiment_extra_text": [], "seeds": 2,
            "pretrain_steps": {"sentiment": 8}, "snapshot_steps": {"sentiment": []},
            "eval_every": {"sentiment": 8}, "tables": {"sentiment": ["C1"]},
            "labels_per_class": [2, "all"],
            "c1_variants": {"sentiment": ["scratch", "head-mean", "full"]},
            "finetune_steps": 8, "max_epochs": 2, "min_epochs": 1, "forgetting_batches": 1}
    out = str(tmp_path / "out")
    results = experiments.run(out, "sentiment", plan=plan, log=lambda *a: None)
    settings = [row["setting"] for t in results["tables"] if t["claim"] == "C1" for row in t["rows"]]
    assert settings == [f"k={k}: {name}" for k in (2, "all") for name in (
        "from scratch", "pre-trained, head only, mean pooling", "pre-trained, full",
        experiments.TFIDF)]
    assert {v["setting"] for v in results["verdicts"] if v["claim"] == "C1"} == {
        "sentiment k=2", "sentiment k=all"}
    markdown = open(os.path.join(out, "results.md"), encoding="utf-8").read()
    assert "real text: movie-review sentiment" in markdown and "Scored on the valid split" in markdown
    runs = open(os.path.join(out, "runs.jsonl")).read()
    resumed = experiments.run(out, "sentiment", plan=plan, resume=True, log=lambda *a: None)
    assert open(os.path.join(out, "runs.jsonl")).read() == runs  # nothing ran again
    assert json.dumps(resumed["tables"]) == json.dumps(results["tables"])


def test_the_final_plan_resumed_in_the_validation_plans_folder_scores_every_run_again(tmp_path,
                                                                                    monkeypatch):
    archive, sha256 = fake_archive(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    data.prepare_sentiment(experiments.SENTIMENT_FOLDER, archive, sha256, log=lambda *a: None)
    task = experiments.sentiment_task({**experiments.PLANS["sentiment"], "sentiment_extra_text": []})
    keys = {}
    for name in ("sentiment-text8", "sentiment-final"):
        tables = experiments.tables_for("sentiment", experiments.PLANS[name], task, {"final": None},
                                        2, 2)
        keys[name] = {json.dumps(spec, sort_keys=True) for _, title, rows in tables for _, spec in rows
                      if not title.startswith(experiments.CURVE_TITLE)}  # the curve is validation's alone
    # the same runs, told apart by the split they are scored on: no valid score is reused as test
    assert len(keys["sentiment-text8"]) == len(keys["sentiment-final"])
    assert not keys["sentiment-text8"] & keys["sentiment-final"]
