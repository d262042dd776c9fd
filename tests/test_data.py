"""data.py, tokenizer.py and toyworld.py as a specification: B1 masking, B2 next-sentence pairs,
WordPiece, the toy world."""

from collections import Counter

import numpy as np
import pytest

import data
import toyworld
from common import IGNORE_INDEX, IS_NEXT, NOT_NEXT, InputError
from tokenizer import SPECIAL_TOKENS, Tokenizer, split_words, train_tokenizer


def letters_tokenizer():
    return Tokenizer(SPECIAL_TOKENS + list("abcdefghijklmnopqrstuvwxyz"))


def test_masking_80_10_10_over_100000_draws_wherever_a_token_is():
    tokenizer = letters_tokenizer()
    rng = np.random.default_rng(0)
    # 2000 rows x 400 tokens = 800,000 tokens, 120,000 selected
    input_ids = rng.integers(5, len(tokenizer), size=(2000, 400))
    masked, labels = data.mask_tokens(input_ids, tokenizer, rng)
    selected = labels != IGNORE_INDEX
    n = selected.sum()
    assert n >= 100_000
    assert np.all(selected.sum(axis=1) == 60)  # exactly round(15%) of each sequence
    became_mask = (masked == tokenizer.mask_id) & selected
    unchanged = (masked == input_ids) & selected
    # a random replacement can draw the original token (prob 1/|non-special|): it then counts as unchanged
    replaced = selected & ~became_mask & ~unchanged
    p_same = 1 / (len(tokenizer) - len(SPECIAL_TOKENS))
    for observed, expected in [(became_mask.sum() / n, 0.8), (replaced.sum() / n, 0.1 * (1 - p_same)),
                               (unchanged.sum() / n, 0.1 + 0.1 * p_same)]:
        assert abs(observed - expected) < 4 * np.sqrt(expected * (1 - expected) / n)
    # nothing changes outside the selected set, and labels are the originals exactly there
    assert np.array_equal(masked[~selected], input_ids[~selected])
    assert np.array_equal(labels[selected], input_ids[selected])
    # M is a uniformly random subset: each block of 40 positions is selected 15% of the time (80,000 draws each)
    for block in np.split(selected, 10, axis=1):
        assert abs(block.mean() - 0.15) < 5 * np.sqrt(0.15 * 0.85 / block.size)
    # and what happens to a selected token does not depend on where it is
    for half in np.split(np.arange(400), 2):
        chosen = selected[:, half]
        assert abs((became_mask[:, half].sum() / chosen.sum()) - 0.8) < 5 * np.sqrt(0.16 / chosen.sum())


def test_a_pair_fills_its_budget_unless_its_second_segment_reaches_the_end_of_its_document():
    rng = np.random.default_rng(3)
    documents = unique_sentence_documents(num_documents=60, rng=rng)
    ends = {int(document[-1][-1]) for document in documents}  # the last token of every document
    for max_length in (12, 24, 40, 64):
        budget = max_length - 3  # [CLS] A [SEP] B [SEP]
        for _ in range(300):
            segment_a, segment_b, _ = data.pretraining_example(documents, rng, max_length)
            assert len(segment_a) >= 1 and len(segment_b) >= 1
            assert len(segment_a) + len(segment_b) == budget or int(segment_b[-1]) in ends, (max_length, segment_a, segment_b)
            for segment in (segment_a, segment_b):  # each a run of consecutive text from one document
                assert len({int(t) // 1000 for t in segment}) == 1
        batch = data.pretraining_batch(documents, Tokenizer(SPECIAL_TOKENS + [f"w{i}" for i in range(60000)]), rng, 64,
                                       max_length)
        assert batch["input_ids"].shape[1] <= max_length


def test_specials_and_padding_are_never_selected_and_random_tokens_are_never_special():
    tokenizer = letters_tokenizer()
    rng = np.random.default_rng(1)
    for _ in range(50):
        rows = [[tokenizer.cls_id, *rng.integers(5, len(tokenizer), size=rng.integers(1, 30)), tokenizer.sep_id,
                 *rng.integers(5, len(tokenizer), size=rng.integers(0, 10)), tokenizer.sep_id] for _ in range(16)]
        input_ids, real = data.pad(rows, tokenizer.pad_id)
        masked, labels = data.mask_tokens(input_ids, tokenizer, rng, data.MaskingRule(mask_token_fraction=0.0,
                                                                                      random_token_fraction=1.0))
        selected = labels != IGNORE_INDEX
        special = np.isin(input_ids, tokenizer.special_ids)
        assert not np.any(selected & special) and not np.any(selected & ~real)
        assert not np.any(np.isin(masked[selected], tokenizer.special_ids))
        assert np.all(selected.sum(1) == np.maximum(1, np.rint((~special).sum(1) * 0.15)))


def unique_sentence_documents(num_documents=40, rng=None):
    """Documents whose every sentence is distinguishable: sentence j of document d holds the
    ids 5 + 1000*d + 10*j + (0..len-1), so a segment tells where it came from."""
    rng = rng or np.random.default_rng(0)
    return [[np.arange(5 + 1000 * d + 10 * j, 5 + 1000 * d + 10 * j + rng.integers(2, 9))
             for j in range(rng.integers(1, 12))] for d in range(num_documents)]


def test_nsp_labels_balanced_negatives_never_the_true_next_and_segment_ids_right():
    rng = np.random.default_rng(0)
    documents = unique_sentence_documents(rng=rng)
    tokenizer = Tokenizer(SPECIAL_TOKENS + [f"w{i}" for i in range(60000)])
    labels = []
    for _ in range(200):
        batch = data.pretraining_batch(documents, tokenizer, rng, 32, 40, masking=data.MaskingRule(probability=0.0001))
        for i in range(32):
            row = batch["input_ids"][i][batch["attention_mask"][i]]
            segments = batch["segment_ids"][i][batch["attention_mask"][i]]
            # [CLS] A [SEP] B [SEP]: segment 0 up to and including the first [SEP], then 1
            first_sep = int(np.flatnonzero(row == tokenizer.sep_id)[0])
            assert row[0] == tokenizer.cls_id and row[-1] == tokenizer.sep_id
            assert np.all(segments[: first_sep + 1] == 0) and np.all(segments[first_sep + 1:] == 1)
            # recover A's last and B's first token from the unmasked batch
            original = np.where(batch["mlm_labels"][i] != IGNORE_INDEX, batch["mlm_labels"][i], batch["input_ids"][i])
            original = original[batch["attention_mask"][i]]
            a_last, b_first = original[first_sep - 1] - 5, original[first_sep + 1] - 5
            same_document = a_last // 1000 == b_first // 1000
            true_next = same_document and (b_first % 1000) // 10 == (a_last % 1000) // 10 + 1 and b_first % 10 == 0
            label = batch["nsp_labels"][i]
            assert (label == IS_NEXT) == true_next
            if label == NOT_NEXT:
                assert not same_document  # a negative comes from another document
            labels.append(label)
    assert abs(np.mean(labels) - 0.5) < 4 * np.sqrt(0.25 / len(labels))


def test_held_out_pairs_need_a_document_of_two_sentences_and_otherwise_are_mlm_only():
    # B2 draws A from a document of 2+ sentences; a corpus without one gets MLM-only batches
    rng = np.random.default_rng(0)
    for _ in range(20):
        documents = [[rng.integers(5, 30, size=int(rng.integers(1, 6)))] for _ in range(int(rng.integers(1, 8)))]
        assert not data.nsp_possible(documents)
        batches = data.held_out_batches(documents, letters_tokenizer(), 16, use_nsp=True, batch_size=4, num_batches=2)
        assert all((b["nsp_labels"] == IS_NEXT).all() and (b["segment_ids"] == 0).all() for b in batches)
        documents.append([np.array([5, 6]), np.array([7, 8])])
        assert data.nsp_possible(documents) == (len(documents) >= 2)


@pytest.mark.parametrize("text,expected", [
    ("Hello, World!", ["hello", ",", "world", "!"]),
    ("Café naïve résumé", ["cafe", "naive", "resume"]),
    ("don't $5^2", ["don", "'", "t", "$", "5", "^", "2"]),
    ("我爱ML模型", ["我", "爱", "ml", "模", "型"]),
    ("a\tb\u00a0c\x00d\u200b", ["a", "b", "cd"]),  # tab/nbsp are spaces; NUL and the zero-width space (Cf) go
    ("the [MASK] is here[SEP]", ["the", "[MASK]", "is", "here", "[SEP]"]),
])
def test_basic_tokenization_follows_bert(text, expected):
    assert split_words(text) == expected


def test_wordpiece_greedy_longest_match_with_continuations_and_unk():
    tokenizer = Tokenizer(SPECIAL_TOKENS + ["un", "##aff", "##able", "aff", "##a", "a", "b", "##b", ",", "!"])
    assert tokenizer.tokenize("unaffable") == ["un", "##aff", "##able"]
    assert tokenizer.tokenize("affa, ab!") == ["aff", "##a", ",", "a", "##b", "!"]
    assert tokenizer.tokenize("unx") == ["[UNK]"]  # one unmatchable piece: the whole word is [UNK]
    assert tokenizer.tokenize("a" * 101) == ["[UNK]"]  # over-long word
    assert tokenizer.tokenize("a [MASK] b") == ["a", "[MASK]", "b"]


def test_trained_vocabulary_round_trips_through_vocab_txt(tmp_path):
    texts = ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs!",
             "Voix ambiguë d'un cœur qui, au zéphyr, préfère les jattes de kiwis.", "机器学习 is fun"] * 5
    tokenizer = train_tokenizer(texts, vocab_size=120)
    assert tokenizer.vocab[:5] == SPECIAL_TOKENS and len(set(tokenizer.vocab)) == len(tokenizer.vocab)
    tokenizer.save(tmp_path / "vocab.txt")
    loaded = Tokenizer.load(str(tmp_path / "vocab.txt"))
    assert loaded.vocab == tokenizer.vocab
    for text in texts:
        assert loaded.encode(text) == tokenizer.encode(text)
        assert tokenizer.unk_id not in tokenizer.encode(text)  # every character was seen in training
        assert tokenizer.decode(tokenizer.encode(text)).replace(" ", "") == "".join(split_words(text))
    # a vocab.txt written with Windows line ends gives the same ids
    (tmp_path / "crlf.txt").write_bytes("\r\n".join(tokenizer.vocab).encode("utf-8") + b"\r\n")
    assert Tokenizer.load(str(tmp_path / "crlf.txt")).vocab == tokenizer.vocab


def test_trained_wordpieces_are_whole_words_or_word_pieces_and_frequent_words_become_one_token():
    rng, stopped_short = np.random.default_rng(0), 0
    for trial in range(20):
        letters = "abcdefgh"[: int(rng.integers(3, 9))]
        words = ["".join(rng.choice(list(letters), int(rng.integers(1, 7)))) for _ in range(30)]
        texts = [" ".join(rng.choice(words, 12)) for _ in range(40)]
        counts = Counter(word for text in texts for word in text.split())
        vocab_size = int(rng.integers(20, 200))
        tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
        for token in tokenizer.vocab[len(SPECIAL_TOKENS):]:
            piece = token.removeprefix("##")
            assert piece and "#" not in piece, token  # "##" marks a word-internal piece, only at the front
        if len(tokenizer.vocab) < vocab_size:  # merges ran out before the room did: every word seen twice is whole
            stopped_short += 1
            for word in (w for w, n in counts.items() if n >= 2):
                assert tokenizer.encode(word) == [tokenizer.vocab.index(word)], (trial, word)
    assert stopped_short >= 5


def test_toy_world_is_deterministic_and_its_parts_are_disjoint():
    first, second = toyworld.toy_world(seed=3, num_documents=300), toyworld.toy_world(seed=3, num_documents=300)
    assert first == second
    unlabeled = {s for d in first["unlabeled"] for s in d}
    labeled = [set(t for t, _ in first[split]) for split in ("train", "valid", "test")]
    assert not (labeled[0] & labeled[1]) and not (labeled[0] & labeled[2]) and not (labeled[1] & labeled[2])
    assert not any(part & unlabeled for part in labeled)
    assert sorted({y for _, y in first["test"]}) == sorted(toyworld.TOPICS)


def test_read_tsv_and_corpus_report_file_and_line(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("good text\tyes\nno tab here\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"d\.tsv:2: expected 'text<TAB>label'"):
        data.read_tsv(str(path))
    corpus = tmp_path / "c.txt"
    corpus.write_text(" \n\n\t\n", encoding="utf-8")
    with pytest.raises(InputError, match="empty corpus"):
        data.read_corpus([str(corpus)])
    corpus.write_bytes(b"fine\nbad \xff byte\n")
    with pytest.raises(InputError, match=r"c\.txt:2: byte 9 is not valid UTF-8"):
        data.read_corpus([str(corpus)])


def test_a_corpus_read_whole_and_read_line_by_line_gives_the_same_documents(tmp_path):
    # read_corpus (pretrain) and iter_documents (tokenize, larger than memory) share one rule
    rng = np.random.default_rng(0)
    pieces = ["the whale", "swims", " ", "", "\t", "\x0c", "a\u2028b", "c\x85d", "caf\u00e9"]
    breaks = ["\n", "\r\n", "\r", "\n\n", "\n \n"]
    for trial in range(30):
        text = "".join(pieces[rng.integers(len(pieces))] + breaks[rng.integers(len(breaks))] for _ in range(30))
        path = tmp_path / f"corpus{trial}.txt"
        path.write_bytes(("start\n" + text).encode("utf-8"))
        assert data.read_corpus([str(path)]) == list(data.iter_documents([str(path)])), repr(text)
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n\t\n", encoding="utf-8")
    for read in (data.read_corpus, lambda paths: list(data.iter_documents(paths))):
        with pytest.raises(InputError, match="empty corpus"):
            read([str(empty)])


def test_token_cache_returns_exactly_what_encoding_gives_and_is_keyed_by_text_and_vocab(tmp_path):
    world = toyworld.toy_world(seed=1, num_documents=120)
    documents = world["unlabeled"] + [["", "  "]]  # a document with no tokens is dropped either way
    tokenizer = train_tokenizer((s for d in documents for s in d), vocab_size=300)
    plain = data.encode_documents(tokenizer, documents)

    def same(a, b):
        return len(a) == len(b) and all(len(x) == len(y) and all(p.dtype == q.dtype and np.array_equal(p, q)
                                                                for p, q in zip(x, y)) for x, y in zip(a, b))

    written = data.encode_documents(tokenizer, documents, str(tmp_path))
    (cache_file,) = tmp_path.glob("tokens-*.npz")
    read_back = data.encode_documents(tokenizer, documents, str(tmp_path))
    assert same(plain, written) and same(plain, read_back)
    # another text or another vocabulary is another key, never a stale hit
    changed = [list(d) for d in documents]
    changed[0][0] = changed[0][0] + " extra"
    assert same(data.encode_documents(tokenizer, changed, str(tmp_path)), data.encode_documents(tokenizer, changed))
    other = train_tokenizer((s for d in documents for s in d), vocab_size=200)
    assert same(data.encode_documents(other, documents, str(tmp_path)), data.encode_documents(other, documents))
    assert len(list(tmp_path.glob("tokens-*.npz"))) == 3
    # a damaged cache file is rebuilt, not trusted
    cache_file.write_bytes(b"not a zip file")
    assert same(plain, data.encode_documents(tokenizer, documents, str(tmp_path)))
    assert same(plain, data.encode_documents(tokenizer, documents, str(tmp_path)))


@pytest.mark.parametrize("workers", [1, 2])
def test_a_token_file_gives_the_batches_of_the_corpus_in_memory(tmp_path, workers):
    # corpora larger than memory: written once (in `workers` processes), read through a memory map
    world = toyworld.toy_world(seed=3, num_documents=300)
    corpus = str(tmp_path / "corpus.txt")
    data.write_corpus(corpus, world["unlabeled"])
    tokenizer = train_tokenizer((s for d in world["unlabeled"] for s in d), 500)
    tokens = data.write_token_file([corpus], tokenizer, str(tmp_path / "corpus"), workers=workers, chunk=40)
    mapped, in_memory = data.TokenFile(str(tmp_path / "corpus")), data.encode_documents(tokenizer, data.read_corpus([corpus]))
    assert mapped.tokens.dtype == np.uint16 and tokens == mapped.num_tokens() == sum(len(s) for d in in_memory for s in d)
    assert len(mapped) == len(in_memory)
    for a, b in zip(mapped, in_memory):
        assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
    for use_nsp in (True, False):
        for seed in range(3):
            mine = data.pretraining_batch(mapped, tokenizer, np.random.default_rng(seed), 8, 32, use_nsp)
            theirs = data.pretraining_batch(in_memory, tokenizer, np.random.default_rng(seed), 8, 32, use_nsp)
            assert all(np.array_equal(mine[key], theirs[key]) for key in mine)
    training, held_out = data.split_held_out(mapped)  # views, split as the in-memory documents are
    expected = data.split_held_out(in_memory)
    assert len(training) == len(expected[0]) and training.num_tokens() == sum(len(s) for d in expected[0] for s in d)
    assert all(np.array_equal(x, y) for a, b in zip(held_out, expected[1]) for x, y in zip(a, b))


def test_pretrain_reads_a_token_file_written_by_the_tokenize_command(tmp_path, cli):
    corpus = tmp_path / "corpus.txt"
    data.write_corpus(str(corpus), toyworld.toy_world(seed=4, num_documents=200)["unlabeled"])
    code, stdout, stderr = cli("tokenize", "--corpus", corpus, "--out", tmp_path / "tokens", "--vocab-size", 400, "--workers", 2)
    assert code == 0, stderr
    code, _, stderr = cli("pretrain", "--corpus", tmp_path / "tokens.tokens", "--out", tmp_path / "pre", "--steps", 6,
                          "--batch-size", 8, "--max-length", 32, "--eval-every", 6, "--device", "cpu")
    assert code == 0, stderr
    assert (tmp_path / "pre" / "vocab.txt").read_text() == (tmp_path / "tokens.vocab.txt").read_text()
    assert cli("pretrain", "--corpus", tmp_path / "missing.tokens", "--out", tmp_path / "x")[0] == 2
