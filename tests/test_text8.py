"""General English to pre-train on (data.prepare_text8, `ptft.py data text8`) as a specification, on a
small fake of gensim 3.0.0's source distribution built here: no network in the tests."""

import hashlib
import io
import os
import zipfile

import pytest
from test_sentiment import tar_gz

import data
from common import InputError
from conftest import assert_clear_error

WORDS = [f"{word}" for word in "anarchism originated as a term of abuse first used against early working class".split()]


def fake_gensim(folder, words=2000, member=data.TEXT8_MEMBER):
    """A tar.gz shaped like gensim 3.0.0's sdist, text8.zip inside; -> (path, (its SHA-256, text8's))."""
    text = " " + " ".join(WORDS[i % len(WORDS)] for i in range(words))  # text8 starts with a space
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("text8", text)
    path = os.path.join(folder, "gensim-3.0.0.tar.gz")
    with open(path, "wb") as f:
        f.write(tar_gz({"gensim-3.0.0/setup.py": b"", member: zipped.getvalue()}))
    return path, (data.sha256_of(path), hashlib.sha256(text.encode()).hexdigest())


def test_text8_becomes_documents_of_fixed_sentences_every_word_once_in_order(tmp_path):
    archive, sha256s = fake_gensim(str(tmp_path), words=2000)
    counts = data.prepare_text8(str(tmp_path / "text8"), archive, sha256s=sha256s, log=lambda *a: None)
    assert counts == {"unlabeled.txt": 2000}
    documents = data.read_corpus([str(tmp_path / "text8" / "unlabeled.txt")])
    assert all(len(document) <= data.TEXT8_DOCUMENT_SENTENCES for document in documents)
    sentences = [sentence.split() for document in documents for sentence in document]
    assert all(len(words) == data.TEXT8_SENTENCE_WORDS for words in sentences[:-1])
    assert [w for words in sentences for w in words] == [WORDS[i % len(WORDS)] for i in range(2000)]
    source = (tmp_path / "text8" / "SOURCE.txt").read_text()
    assert sha256s[0] in source and "CC BY-SA" in source
    data.prepare_text8(str(tmp_path / "short"), archive, max_words=100, sha256s=sha256s, log=lambda *a: None)
    assert sum(len(s.split()) for d in data.read_corpus([str(tmp_path / "short" / "unlabeled.txt")]) for s in d) == 100


def test_a_different_archive_or_text_is_refused_in_one_line_and_nothing_is_written(tmp_path, cli):
    archive, sha256s = fake_gensim(str(tmp_path))
    # the real command pins the real file's SHA-256: this fake is another file
    assert_clear_error(cli("data", "text8", "--archive", archive, "--out", tmp_path / "a"), "SHA-256", "refused")
    assert not (tmp_path / "a").exists()
    with pytest.raises(InputError, match="not the expected text"):
        data.prepare_text8(str(tmp_path / "b"), archive, sha256s=(sha256s[0], "0" * 64), log=lambda *a: None)
    missing, missing_sha = fake_gensim(str(tmp_path / ".."), member="gensim-3.0.0/docs/other.zip")
    with pytest.raises(InputError, match="has no file"):
        data.prepare_text8(str(tmp_path / "c"), missing, sha256s=missing_sha, log=lambda *a: None)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    data.prepare_text8(str(tmp_path / "d"), archive, sha256s=sha256s, log=lambda *a: None)
    with pytest.raises(InputError, match="exists; pass --force"):
        data.prepare_text8(str(tmp_path / "d"), archive, sha256s=sha256s, log=lambda *a: None)


def test_the_text8_plan_refuses_in_one_line_until_text8_is_prepared_and_then_pretrains_on_it(tmp_path, cli,
                                                                                               monkeypatch):
    from test_sentiment import fake_archive

    import experiments

    monkeypatch.chdir(tmp_path)  # the plan reads runs/data/* from here
    sentiment, sentiment_sha = fake_archive(str(tmp_path))
    data.prepare_sentiment(experiments.SENTIMENT_FOLDER, sentiment, sentiment_sha, log=lambda *a: None)
    assert_clear_error(cli("experiments", "--plan", "sentiment-text8", "--out", tmp_path / "e"),
                       "runs/data/text8/unlabeled.txt: missing", "ptft.py data text8")
    assert not (tmp_path / "e").exists()
    archive, sha256s = fake_gensim(str(tmp_path), words=480)
    data.prepare_text8(os.path.join("runs", "data", "text8"), archive, sha256s=sha256s, log=lambda *a: None)
    task = experiments.sentiment_task(experiments.PLANS["sentiment-text8"])
    text8 = data.read_corpus([experiments.TEXT8_CORPUS])
    assert task["unlabeled"][-len(text8):] == text8  # the task's own snippets, then text8
