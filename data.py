"""Data: corpora (E1's unlabeled set U), labeled sets (E1's D), the tokenizer, and the two
pre-training tasks' inputs (B1 masking, B2 next-sentence pairs).

  * the embedded default: a generated "toy world" (no download) whose structure a tiny model
    learns in minutes -- see toy_world() and README.md;
  * `stdlib`: the docstrings of the running Python's standard library, real English;
  * your own files: plain-text corpora and `text<TAB>label` TSV files.

Run `python data.py` to see a real masked example from the embedded default.
"""

import ast
import functools
import hashlib
import os
import re
import sysconfig
import unicodedata
import zipfile
from collections import Counter
import heapq

import numpy as np

from model import IGNORE_INDEX, IS_NEXT, NOT_NEXT


class InputError(Exception):
    """Bad input from the user (a file, a flag, a checkpoint). The command line prints the
    message as one line and exits with status 2 -- never a traceback."""


# ----------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------


def read_text_file(path):
    """A whole UTF-8 file as a string. Undecodable bytes are an error naming the byte offset
    (we refuse rather than silently replace: a wrong encoding usually means a wrong file)."""
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    if os.path.isdir(path):
        raise InputError(f"{path}: is a folder, expected a file")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: byte {error.start} is not valid UTF-8 (expected UTF-8 text)") from None


def read_corpus(paths):
    """Plain-text corpora -> documents, each a list of sentences (non-empty lines).

    BERT's format: one sentence (or line) per line, a blank line between documents."""
    documents = []
    for path in paths:
        text = read_text_file(path)
        found = [
            [line.strip() for line in block.splitlines() if line.strip()]
            for block in re.split(r"\n\s*\n", text)
        ]
        found = [document for document in found if document]
        if not found:
            raise InputError(f"{path}: empty corpus (only whitespace); expected UTF-8 text, documents separated by blank lines")
        documents.extend(found)
    return documents


def read_tsv(path):
    """A labeled set `text<TAB>label`, one example per line -> (texts, labels)."""
    texts, labels = [], []
    for number, line in enumerate(read_text_file(path).splitlines(), start=1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise InputError(f"{path}:{number}: expected 'text<TAB>label', found no tab")
        text, label = line.rsplit("\t", 1)
        if not text.strip():
            raise InputError(f"{path}:{number}: empty text before the tab")
        if not label.strip():
            raise InputError(f"{path}:{number}: empty label after the tab")
        texts.append(text.strip())
        labels.append(label.strip())
    if not texts:
        raise InputError(f"{path}: no examples; expected lines 'text<TAB>label'")
    return texts, labels


def write_tsv(path, examples):
    with open(path, "w", encoding="utf-8") as f:
        for text, label in examples:
            f.write(f"{text}\t{label}\n")


def write_corpus(path, documents):
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n\n".join("\n".join(document) for document in documents) + "\n")


def stdlib_corpus():
    """Real English that needs no download: every docstring of the running Python's standard
    library (modules, classes, functions), extracted with `ast`. ~1.6 MB on Python 3.11.

    Each docstring is a document; its non-empty lines are its sentences."""
    return [document for _, document in stdlib_docstrings()]


def stdlib_docstrings():
    """(module path relative to the stdlib, docstring lines) for every docstring, sorted."""
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "test", "tests", "idlelib", "__pycache__", "lib2to3", "turtledemo"}
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in skip)
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            try:
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    docstring = ast.get_docstring(node)
                    lines = [line.strip() for line in (docstring or "").splitlines() if line.strip()]
                    if lines:
                        found.append((os.path.relpath(path, root), lines))
    return found


# ----------------------------------------------------------------------------------------
# The tokenizer: BERT's WordPiece
# ----------------------------------------------------------------------------------------

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = [PAD, UNK, CLS, SEP, MASK]
MAX_WORD_CHARACTERS = 100  # longer "words" become [UNK], as in BERT


def is_whitespace(ch):
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def is_control(ch):
    return ch not in "\t\n\r" and unicodedata.category(ch).startswith("C")


def is_punctuation(ch):
    # BERT counts every non-alphanumeric ASCII symbol ($, ^, `, ...) as punctuation too.
    code = ord(ch)
    if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def is_cjk(ch):
    code = ord(ch)
    return (0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0x20000 <= code <= 0x2A6DF
            or 0x2A700 <= code <= 0x2B73F or 0x2B740 <= code <= 0x2B81F or 0x2B820 <= code <= 0x2CEAF
            or 0xF900 <= code <= 0xFAFF or 0x2F800 <= code <= 0x2FA1F)


ASCII_CONTROL = {code: None for code in [*range(0, 9), 11, 12, *range(14, 32), 127]}
SPECIAL_PATTERN = re.compile("(" + "|".join(re.escape(token) for token in SPECIAL_TOKENS) + ")")


def split_words(text, lowercase=True):
    """BERT's "basic tokenizer": text -> words, before WordPiece. Special tokens stay whole."""
    words = []
    for piece in SPECIAL_PATTERN.split(text):
        if piece in SPECIAL_TOKENS:
            words.append(piece)
        elif piece.isascii():  # fast path, same result: no accents, no CJK, no Unicode spaces
            words.extend(w for raw in piece.translate(ASCII_CONTROL).split() for w in split_word(raw, lowercase))
        else:
            # drop NUL, U+FFFD and control characters; every whitespace becomes a space;
            # every CJK ideograph becomes its own word
            cleaned = []
            for ch in piece:  # no Unicode normalisation here: BERT (and the Rust BertTokenizer) does none
                if ord(ch) == 0 or ord(ch) == 0xFFFD or is_control(ch):
                    continue
                if is_whitespace(ch):
                    cleaned.append(" ")
                elif is_cjk(ch):
                    cleaned.append(f" {ch} ")
                else:
                    cleaned.append(ch)
            words.extend(w for raw in "".join(cleaned).split() for w in split_word(raw, lowercase))
    return words


@functools.lru_cache(maxsize=1 << 20)
def split_word(word, lowercase):
    """One whitespace-delimited word -> lower-cased, accent-stripped, split at punctuation."""
    if lowercase:
        # lower-case, then strip accents: NFD splits "é" into "e" + a combining mark (Mn)
        word = "".join(c for c in unicodedata.normalize("NFD", word.lower()) if unicodedata.category(c) != "Mn")
    pieces, current = [], []
    for ch in word:
        if is_punctuation(ch):  # every punctuation character becomes its own word
            if current:
                pieces.append("".join(current))
                current = []
            pieces.append(ch)
        else:
            current.append(ch)
    if current:
        pieces.append("".join(current))
    return tuple(pieces)


class Tokenizer:
    """WordPiece: words are split greedily, longest vocabulary match first; pieces that do not
    start a word carry the prefix `##`. A word that cannot be matched becomes [UNK]."""

    def __init__(self, vocab, lowercase=True):
        missing = [token for token in SPECIAL_TOKENS if token not in vocab]
        if missing:
            raise InputError(f"vocabulary lacks the special tokens {', '.join(missing)}")
        self.vocab = list(vocab)
        self.lowercase = lowercase
        self.token_to_id = {token: index for index, token in enumerate(self.vocab)}
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
            self.token_to_id[token] for token in SPECIAL_TOKENS)
        self.special_ids = np.array(sorted(self.token_to_id[token] for token in SPECIAL_TOKENS))
        self._cache = {}

    def __len__(self):
        return len(self.vocab)

    def wordpiece(self, word):
        if word in self._cache:
            return self._cache[word]
        if word in SPECIAL_TOKENS:
            pieces = [word]
        elif len(word) > MAX_WORD_CHARACTERS:
            pieces = [UNK]
        else:
            pieces, start = [], 0
            while start < len(word):
                end = len(word)
                while end > start:
                    candidate = word[start:end] if start == 0 else "##" + word[start:end]
                    if candidate in self.token_to_id:
                        break
                    end -= 1
                if end == start:  # nothing matched: the whole word is unknown
                    pieces = [UNK]
                    break
                pieces.append(candidate)
                start = end
        self._cache[word] = pieces
        return pieces

    def tokenize(self, text):
        return [piece for word in split_words(text, self.lowercase) for piece in self.wordpiece(word)]

    def encode(self, text):
        """text -> token ids, without [CLS]/[SEP]."""
        return [self.token_to_id[piece] for piece in self.tokenize(text)]

    def decode(self, ids):
        return " ".join(self.vocab[i] for i in ids).replace(" ##", "")

    def save(self, path):
        """vocab.txt, BERT's format: one token per line, the line number is the id."""
        with open(path, "w", encoding="utf-8") as f:
            f.write("".join(token + "\n" for token in self.vocab))

    @classmethod
    def load(cls, path, lowercase=True):
        tokens = read_text_file(path).split("\n")
        if tokens and tokens[-1] == "":
            tokens.pop()
        return cls(tokens, lowercase)


def train_tokenizer(texts, vocab_size, lowercase=True, min_frequency=2):
    """Learn a WordPiece vocabulary from text, the way `tokenizers`' WordPieceTrainer does:
    start from single characters (word-initial `a`, word-internal `##a`), then repeatedly add
    the merge of the most frequent adjacent pair (BPE merges), until vocab_size tokens."""
    word_counts = Counter()
    for text in texts:
        word_counts.update(w for w in split_words(text, lowercase) if w not in SPECIAL_TOKENS)
    if not word_counts:
        raise InputError("cannot build a vocabulary: the text has no words")
    words = sorted(word_counts)  # sorted: the same vocabulary on every run
    counts = [word_counts[w] for w in words]
    symbols = [[w[0]] + ["##" + c for c in w[1:]] for w in words]
    alphabet = Counter()
    for pieces, count in zip(symbols, counts):
        alphabet.update({piece: count for piece in pieces})
    room = vocab_size - len(SPECIAL_TOKENS)
    if room <= 0:
        raise InputError(f"vocab size {vocab_size} leaves no room beyond the {len(SPECIAL_TOKENS)} special tokens")
    # keep the most frequent characters if the alphabet alone would not fit; the rest -> [UNK]
    vocab = SPECIAL_TOKENS + sorted(sorted(alphabet, key=lambda s: (-alphabet[s], s))[:room])
    known = set(vocab)

    pair_counts, pair_words = Counter(), {}

    def add_pairs(index, sign):
        pieces = symbols[index]
        for pair in zip(pieces, pieces[1:]):
            pair_counts[pair] += sign * counts[index]
            pair_words.setdefault(pair, set()).add(index)
            heapq.heappush(heap, (-pair_counts[pair], pair))

    heap = []
    for index in range(len(words)):
        if all(piece in known for piece in symbols[index]):
            add_pairs(index, +1)
    while len(vocab) < vocab_size and heap:
        negative_count, pair = heapq.heappop(heap)
        if -negative_count != pair_counts[pair]:
            continue  # a stale heap entry: this pair's count has changed since it was pushed
        if -negative_count < min_frequency:
            break
        merged = pair[0] + pair[1][2:]  # "th" + "##e" -> "the"; "##t" + "##h" -> "##th"
        if merged not in known:
            vocab.append(merged)
            known.add(merged)
        for index in list(pair_words.pop(pair, ())):
            add_pairs(index, -1)
            pieces, merged_pieces, i = symbols[index], [], 0
            while i < len(pieces):
                if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == pair:
                    merged_pieces.append(merged)
                    i += 2
                else:
                    merged_pieces.append(pieces[i])
                    i += 1
            symbols[index] = merged_pieces
            add_pairs(index, +1)
    return Tokenizer(vocab, lowercase)


# ----------------------------------------------------------------------------------------
# The embedded default: a generated "toy world"
# ----------------------------------------------------------------------------------------
# Words belong to latent topics; sentences come from a few grammatical templates that share
# function words (so MLM has syntax to learn: agreement, word order); documents are runs of
# sentences mostly on one topic (so NSP is learnable: a random B usually changes topic); the
# labeled task is the topic of one sentence. 8 topics x (40 nouns, 16 verbs, 16 adjectives),
# ~140 word forms per topic: a handful of labeled sentences per topic sees only a fraction of
# them, so a sentence of unseen words can only be classified by a model that learned from the
# unlabeled text which words keep company -- the point of pre-training (C1).

# TOPICS (at the end of this file): topic -> {"nouns": [(singular, plural)], "verbs": [(base, third, past)], "adjectives": [...]}

# {sg}/{pl}: a noun, singular/plural; {base}/{third}/{past}: a verb; {adj}: an adjective.
TEMPLATES = [
    "the {adj} {sg} {third} the {sg} .",
    "yesterday we {past} the {pl} with a {adj} {sg} .",
    "many {pl} are {adj} because the {sg} {third} them .",
    "they will {base} the {adj} {pl} near the {sg} .",
]


def toy_sentence(rng, topic, word_noise):
    """One sentence on `topic`; each content word is from another topic with prob word_noise."""
    names = list(TOPICS)

    def words_of(kind):
        source = topic if rng.random() >= word_noise else names[rng.integers(len(names))]
        entries = TOPICS[source][kind]
        return entries[rng.integers(len(entries))]

    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    fills = {"sg": lambda: words_of("nouns")[0], "pl": lambda: words_of("nouns")[1],
             "base": lambda: words_of("verbs")[0], "third": lambda: words_of("verbs")[1],
             "past": lambda: words_of("verbs")[2], "adj": lambda: words_of("adjectives")}
    return re.sub(r"\{(\w+)\}", lambda slot: fills[slot.group(1)](), template)


def toy_word_topics():
    """Every content word form of the toy world -> its topic."""
    return {form: topic for topic, words in TOPICS.items()
            for kind in ("nouns", "verbs", "adjectives") for entry in words[kind]
            for form in ((entry,) if isinstance(entry, str) else entry)}


def toy_world(seed=0, num_documents=20000, labeled_per_class=(64, 32, 100), sentence_noise=0.1,
              word_noise=0.05):
    """Generate the embedded default deterministically from `seed` (a few seconds).

    Returns {"unlabeled": documents, "train": [(sentence, topic)], "valid": ..., "test": ...}.
    The four parts are disjoint: a labeled sentence never appears in the unlabeled corpus nor
    in another labeled split."""
    rng = np.random.default_rng(seed)
    names = list(TOPICS)
    documents, seen = [], set()
    for _ in range(num_documents):
        topic = names[rng.integers(len(names))]
        document = []
        for _ in range(rng.integers(3, 9)):
            # a document is mostly on its topic; some sentences wander off (noise)
            sentence_topic = topic if rng.random() >= sentence_noise else names[rng.integers(len(names))]
            document.append(toy_sentence(rng, sentence_topic, word_noise))
        documents.append(document)
        seen.update(document)
    splits = {"unlabeled": documents}
    for split, per_class in zip(("train", "valid", "test"), labeled_per_class):
        examples = []
        for topic in names:
            found = 0
            while found < per_class:
                sentence = toy_sentence(rng, topic, 0.0)  # labeled sentences are clean
                if sentence not in seen:
                    seen.add(sentence)
                    examples.append((sentence, topic))
                    found += 1
        order = rng.permutation(len(examples))
        splits[split] = [examples[i] for i in order]
    return splits


# ----------------------------------------------------------------------------------------
# B2: next-sentence pairs, and B1: masking
# ----------------------------------------------------------------------------------------


def encode_documents(tokenizer, documents, cache_dir=None):
    """documents (lists of sentences) -> lists of token-id arrays; empty sentences dropped.

    Tokenising is pure Python (about 10^6 tokens/s here), so with `cache_dir` the result is kept
    on disk as one flat array, CACHE_DIR/tokens-<hash>.npz, keyed by the documents' text and the
    vocabulary: a --resume, a second run or an experiment sweep on the same corpus reads it back
    instead. (numpy arrays only, read without pickle; a damaged file is simply rebuilt.)"""
    if cache_dir:
        key = hashlib.sha256(repr((tokenizer.lowercase, tokenizer.vocab)).encode())
        for document in documents:
            key.update(("\x1e" + "\x1f".join(document)).encode("utf-8", "surrogatepass"))
        path = os.path.join(cache_dir, f"tokens-{key.hexdigest()[:24]}.npz")
        try:
            with np.load(path) as cached:
                return unflatten_documents(cached["tokens"], cached["sentence_lengths"], cached["document_sizes"])
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # not cached yet (or unreadable): encode and (re)write it below
    encoded = []
    for document in documents:
        sentences = [np.array(ids, dtype=np.int64) for ids in map(tokenizer.encode, document) if ids]
        if sentences:
            encoded.append(sentences)
    if cache_dir:
        sentence_lengths = np.array([len(s) for d in encoded for s in d], dtype=np.int64)
        tokens = np.concatenate([s for d in encoded for s in d]) if len(sentence_lengths) else np.zeros(0, np.int64)
        os.makedirs(cache_dir, exist_ok=True)
        partial = f"{path}.{os.getpid()}.partial.npz"  # written whole, then renamed: never half a cache
        np.savez(partial, tokens=tokens.astype(np.int32), sentence_lengths=sentence_lengths,
                 document_sizes=np.array([len(d) for d in encoded], dtype=np.int64))
        os.replace(partial, path)
    return encoded


def unflatten_documents(tokens, sentence_lengths, document_sizes):
    """One flat token array -> documents -> sentences (views into one int64 array)."""
    sentences = np.split(tokens.astype(np.int64), np.cumsum(sentence_lengths)[:-1]) if len(sentence_lengths) else []
    ends = np.cumsum(document_sizes)
    return [sentences[end - size: end] for size, end in zip(document_sizes.tolist(), ends.tolist())]


def pretraining_example(documents, rng, max_length, use_nsp=True):
    """One input `[CLS] A [SEP] B [SEP]` (B2) or, without NSP, `[CLS] A [SEP]`.

    A is a run of consecutive sentences from a random document. With probability 1/2, B is what
    really follows A in that document (IS_NEXT); otherwise B is a run of sentences from a
    different document (NOT_NEXT) -- so a negative is never the true next segment.
    Returns (segment_a, segment_b or None, nsp_label), token-id arrays without specials."""
    budget = max_length - 3 if use_nsp else max_length - 2
    index = rng.integers(len(documents))
    if not use_nsp:
        document = documents[index]
        start = rng.integers(len(document))
        return np.concatenate(document[start:])[:budget], None, None
    while len(documents[index]) < 2:  # a true next needs two sentences (pretrain checks one exists)
        index = rng.integers(len(documents))
    document = documents[index]
    # take sentences from a random start until the budget is full (at least two sentences)
    start = rng.integers(len(document) - 1)
    chunk, length = [], 0
    for sentence in document[start:]:
        chunk.append(sentence)
        length += len(sentence)
        if length >= budget and len(chunk) >= 2:
            break
    split = rng.integers(1, len(chunk))  # A = chunk[:split], and the true next is chunk[split:]
    segment_a = np.concatenate(chunk[:split])
    if rng.random() < 0.5:
        label, segment_b = IS_NEXT, np.concatenate(chunk[split:])
    else:
        other = rng.integers(len(documents) - 1)
        other += other >= index  # any document but this one
        other_document = documents[other]
        other_start = rng.integers(len(other_document))
        label, segment_b = NOT_NEXT, np.concatenate(other_document[other_start:])
    # trim the longer segment until the pair fits: A from its front, B from its end, so that
    # for IS_NEXT the last token of A and the first of B stay neighbours in the document
    while len(segment_a) + len(segment_b) > budget:
        if len(segment_a) > len(segment_b):
            segment_a = segment_a[1:]
        else:
            segment_b = segment_b[:-1]
    return segment_a, segment_b, label


def pretraining_batch(documents, tokenizer, rng, batch_size, max_length, use_nsp=True,
                      mask_probability=0.15, mask_token_fraction=0.8, random_token_fraction=0.1):
    """A batch of pre-training inputs as numpy arrays: input_ids, segment_ids, attention_mask,
    mlm_labels (IGNORE_INDEX where nothing is predicted) and nsp_labels."""
    rows, segments, nsp_labels = [], [], []
    for _ in range(batch_size):
        segment_a, segment_b, label = pretraining_example(documents, rng, max_length, use_nsp)
        row = [tokenizer.cls_id, *segment_a, tokenizer.sep_id]
        segment = [0] * len(row)
        if segment_b is not None:
            row += [*segment_b, tokenizer.sep_id]
            segment += [1] * (len(segment_b) + 1)
        rows.append(row)
        segments.append(segment)
        nsp_labels.append(IS_NEXT if label is None else label)
    input_ids, attention_mask = pad(rows, tokenizer.pad_id)
    segment_ids, _ = pad(segments, 0)
    masked_ids, mlm_labels = mask_tokens(input_ids, tokenizer, rng, mask_probability,
                                         mask_token_fraction, random_token_fraction)
    return dict(input_ids=masked_ids, segment_ids=segment_ids, attention_mask=attention_mask,
                mlm_labels=mlm_labels, nsp_labels=np.array(nsp_labels, dtype=np.int64))


def pad(rows, value):
    """Ragged rows -> (B, T) array padded with `value`, and the (B, T) mask of real entries."""
    length = max(len(row) for row in rows)
    out = np.full((len(rows), length), value, dtype=np.int64)
    real = np.zeros((len(rows), length), dtype=bool)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
        real[i, : len(row)] = True
    return out, real


def mask_tokens(input_ids, tokenizer, rng, mask_probability=0.15, mask_token_fraction=0.8,
                random_token_fraction=0.1):
    """B1, BERT's rule, vectorised over the batch.

    In each sequence, round(15%) of the non-special tokens (at least one) are selected: the set
    M of E4. Of the selected, 80% become [MASK], 10% a random non-special token, 10% stay as
    they are (so the model cannot learn that only [MASK] positions matter). Labels hold the
    original token at selected positions and IGNORE_INDEX everywhere else.
    Returns (masked input_ids, mlm_labels)."""
    candidates = ~np.isin(input_ids, tokenizer.special_ids)  # never [CLS], [SEP], [PAD], ...
    num_candidates = candidates.sum(axis=1)
    num_selected = np.where(num_candidates > 0,
                            np.maximum(1, np.rint(num_candidates * mask_probability)), 0).astype(np.int64)
    # a uniformly random subset of exactly num_selected candidates per row: give every candidate
    # a random key, non-candidates +inf, and select the num_selected smallest keys
    keys = np.where(candidates, rng.random(input_ids.shape), np.inf)
    ranks = np.argsort(np.argsort(keys, axis=1), axis=1)
    selected = ranks < num_selected[:, None]

    mlm_labels = np.where(selected, input_ids, IGNORE_INDEX)
    action = rng.random(input_ids.shape)
    to_mask = selected & (action < mask_token_fraction)
    to_random = selected & (action >= mask_token_fraction) & (action < mask_token_fraction + random_token_fraction)
    non_special = np.setdiff1d(np.arange(len(tokenizer)), tokenizer.special_ids)
    masked_ids = input_ids.copy()
    masked_ids[to_mask] = tokenizer.mask_id
    masked_ids[to_random] = non_special[rng.integers(len(non_special), size=int(to_random.sum()))]
    return masked_ids, mlm_labels


def classification_inputs(tokenizer, texts, max_length, warn=print, path="input"):
    """texts (read from `path`) -> lists of ids `[CLS] text [SEP]`, truncated to max_length:
    the position table has no row beyond it. Said once per file, naming it."""
    rows, truncated = [], 0
    for text in texts:
        ids = tokenizer.encode(text)
        if len(ids) > max_length - 2:
            truncated += 1
            ids = ids[: max_length - 2]
        rows.append([tokenizer.cls_id, *ids, tokenizer.sep_id])
    if truncated:
        warn(f"{path}: note: {truncated} of {len(texts)} texts were longer than the position table "
             f"({max_length} tokens) and were truncated")
    return rows


# ----------------------------------------------------------------------------------------
# The toy world's words: 8 topics, each 40 nouns, 16 verbs, 16 adjectives; no word form is in two topics.
# ----------------------------------------------------------------------------------------

TOPICS = {
    "kitchen": {
        "nouns": [
            ("knife", "knives"), ("pot", "pots"), ("pan", "pans"), ("spoon", "spoons"), ("fork", "forks"),
            ("plate", "plates"), ("bowl", "bowls"), ("cup", "cups"), ("oven", "ovens"), ("stove", "stoves"),
            ("kettle", "kettles"), ("sink", "sinks"), ("fridge", "fridges"), ("ladle", "ladles"), ("whisk", "whisks"),
            ("apron", "aprons"), ("jar", "jars"), ("lid", "lids"), ("napkin", "napkins"), ("teapot", "teapots"),
            ("mug", "mugs"), ("tray", "trays"), ("toaster", "toasters"), ("blender", "blenders"),
            ("grater", "graters"), ("sieve", "sieves"), ("peeler", "peelers"), ("skillet", "skillets"),
            ("saucer", "saucers"), ("colander", "colanders"), ("cupboard", "cupboards"), ("drawer", "drawers"),
            ("spatula", "spatulas"), ("recipe", "recipes"), ("sandwich", "sandwiches"), ("pancake", "pancakes"),
            ("onion", "onions"), ("cookie", "cookies"), ("muffin", "muffins"), ("dumpling", "dumplings"),
        ],
        "verbs": [
            ("stir", "stirs", "stirred"), ("chop", "chops", "chopped"), ("bake", "bakes", "baked"),
            ("boil", "boils", "boiled"), ("fry", "fries", "fried"), ("slice", "slices", "sliced"),
            ("peel", "peels", "peeled"), ("roast", "roasts", "roasted"), ("rinse", "rinses", "rinsed"),
            ("mash", "mashes", "mashed"), ("dice", "dices", "diced"), ("grill", "grills", "grilled"),
            ("simmer", "simmers", "simmered"), ("toast", "toasts", "toasted"), ("knead", "kneads", "kneaded"),
            ("scramble", "scrambles", "scrambled"),
        ],
        "adjectives": [
            "salty", "crispy", "spicy", "sweet", "sour", "greasy", "juicy", "tasty", "delicious", "creamy", "crunchy",
            "bitter", "savory", "buttery", "fluffy", "soggy",
        ],
    },
    "sea": {
        "nouns": [
            ("wave", "waves"), ("ship", "ships"), ("boat", "boats"), ("shell", "shells"), ("crab", "crabs"),
            ("whale", "whales"), ("dolphin", "dolphins"), ("shark", "sharks"), ("octopus", "octopuses"),
            ("seagull", "seagulls"), ("anchor", "anchors"), ("sail", "sails"), ("harbor", "harbors"),
            ("island", "islands"), ("beach", "beaches"), ("reef", "reefs"), ("tide", "tides"),
            ("lighthouse", "lighthouses"), ("sailor", "sailors"), ("pirate", "pirates"), ("oyster", "oysters"),
            ("lobster", "lobsters"), ("seal", "seals"), ("buoy", "buoys"), ("dock", "docks"), ("pier", "piers"),
            ("yacht", "yachts"), ("canoe", "canoes"), ("mast", "masts"), ("oar", "oars"), ("penguin", "penguins"),
            ("turtle", "turtles"), ("clam", "clams"), ("shore", "shores"), ("bay", "bays"), ("cove", "coves"),
            ("submarine", "submarines"), ("raft", "rafts"), ("ferry", "ferries"), ("walrus", "walruses"),
        ],
        "verbs": [
            ("steer", "steers", "steered"), ("row", "rows", "rowed"), ("moor", "moors", "moored"),
            ("navigate", "navigates", "navigated"), ("capsize", "capsizes", "capsized"),
            ("hoist", "hoists", "hoisted"), ("paddle", "paddles", "paddled"), ("tow", "tows", "towed"),
            ("board", "boards", "boarded"), ("rescue", "rescues", "rescued"), ("harpoon", "harpoons", "harpooned"),
            ("salvage", "salvages", "salvaged"), ("wreck", "wrecks", "wrecked"), ("charter", "charters", "chartered"),
            ("float", "floats", "floated"), ("spear", "spears", "speared"),
        ],
        "adjectives": [
            "sandy", "stormy", "choppy", "briny", "foamy", "coastal", "tidal", "marine", "nautical", "breezy",
            "seasick", "turquoise", "misty", "oceanic", "underwater", "windy",
        ],
    },
    "music": {
        "nouns": [
            ("song", "songs"), ("guitar", "guitars"), ("piano", "pianos"), ("drum", "drums"), ("violin", "violins"),
            ("flute", "flutes"), ("trumpet", "trumpets"), ("singer", "singers"), ("band", "bands"),
            ("concert", "concerts"), ("melody", "melodies"), ("chord", "chords"), ("lyric", "lyrics"),
            ("album", "albums"), ("microphone", "microphones"), ("choir", "choirs"), ("orchestra", "orchestras"),
            ("tune", "tunes"), ("rhythm", "rhythms"), ("harp", "harps"), ("cello", "cellos"),
            ("saxophone", "saxophones"), ("clarinet", "clarinets"), ("trombone", "trombones"), ("banjo", "banjos"),
            ("ukulele", "ukuleles"), ("tuba", "tubas"), ("drummer", "drummers"), ("guitarist", "guitarists"),
            ("pianist", "pianists"), ("composer", "composers"), ("conductor", "conductors"),
            ("symphony", "symphonies"), ("ballad", "ballads"), ("chorus", "choruses"), ("verse", "verses"),
            ("opera", "operas"), ("harmonica", "harmonicas"), ("keyboard", "keyboards"), ("metronome", "metronomes"),
        ],
        "verbs": [
            ("play", "plays", "played"), ("sing", "sings", "sang"), ("strum", "strums", "strummed"),
            ("hum", "hums", "hummed"), ("compose", "composes", "composed"), ("record", "records", "recorded"),
            ("perform", "performs", "performed"), ("rehearse", "rehearses", "rehearsed"),
            ("whistle", "whistles", "whistled"), ("conduct", "conducts", "conducted"), ("pluck", "plucks", "plucked"),
            ("amplify", "amplifies", "amplified"), ("remix", "remixes", "remixed"),
            ("harmonize", "harmonizes", "harmonized"), ("transpose", "transposes", "transposed"),
            ("applaud", "applauds", "applauded"),
        ],
        "adjectives": [
            "melodic", "musical", "loud", "harmonious", "rhythmic", "catchy", "acoustic", "classical", "jazzy",
            "upbeat", "soulful", "tuneful", "lyrical", "orchestral", "operatic", "choral",
        ],
    },
    "law": {
        "nouns": [
            ("judge", "judges"), ("lawyer", "lawyers"), ("court", "courts"), ("jury", "juries"),
            ("witness", "witnesses"), ("trial", "trials"), ("verdict", "verdicts"), ("crime", "crimes"),
            ("criminal", "criminals"), ("prisoner", "prisoners"), ("prison", "prisons"), ("officer", "officers"),
            ("detective", "detectives"), ("thief", "thieves"), ("contract", "contracts"), ("lawsuit", "lawsuits"),
            ("courtroom", "courtrooms"), ("sentence", "sentences"), ("suspect", "suspects"),
            ("defendant", "defendants"), ("prosecutor", "prosecutors"), ("attorney", "attorneys"), ("law", "laws"),
            ("statute", "statutes"), ("warrant", "warrants"), ("alibi", "alibis"), ("clue", "clues"),
            ("handcuff", "handcuffs"), ("jail", "jails"), ("gavel", "gavels"), ("appeal", "appeals"),
            ("testimony", "testimonies"), ("confession", "confessions"), ("burglar", "burglars"),
            ("robbery", "robberies"), ("fingerprint", "fingerprints"), ("courthouse", "courthouses"),
            ("penalty", "penalties"), ("subpoena", "subpoenas"), ("inmate", "inmates"),
        ],
        "verbs": [
            ("arrest", "arrests", "arrested"), ("sue", "sues", "sued"), ("convict", "convicts", "convicted"),
            ("acquit", "acquits", "acquitted"), ("prosecute", "prosecutes", "prosecuted"),
            ("accuse", "accuses", "accused"), ("interrogate", "interrogates", "interrogated"),
            ("investigate", "investigates", "investigated"), ("enforce", "enforces", "enforced"),
            ("pardon", "pardons", "pardoned"), ("indict", "indicts", "indicted"),
            ("overrule", "overrules", "overruled"), ("imprison", "imprisons", "imprisoned"),
            ("detain", "detains", "detained"), ("summon", "summons", "summoned"),
            ("overturn", "overturns", "overturned"),
        ],
        "adjectives": [
            "legal", "illegal", "guilty", "innocent", "lawful", "unlawful", "judicial", "unfair", "corrupt", "sworn",
            "binding", "liable", "forensic", "constitutional", "lenient", "legitimate",
        ],
    },
    "farm": {
        "nouns": [
            ("cow", "cows"), ("pig", "pigs"), ("horse", "horses"), ("goat", "goats"), ("chicken", "chickens"),
            ("hen", "hens"), ("rooster", "roosters"), ("duck", "ducks"), ("goose", "geese"), ("barn", "barns"),
            ("tractor", "tractors"), ("field", "fields"), ("fence", "fences"), ("farmer", "farmers"),
            ("crop", "crops"), ("seed", "seeds"), ("plow", "plows"), ("haystack", "haystacks"),
            ("scarecrow", "scarecrows"), ("pitchfork", "pitchforks"), ("bucket", "buckets"), ("stable", "stables"),
            ("pasture", "pastures"), ("orchard", "orchards"), ("pumpkin", "pumpkins"), ("carrot", "carrots"),
            ("potato", "potatoes"), ("tomato", "tomatoes"), ("turnip", "turnips"), ("calf", "calves"),
            ("lamb", "lambs"), ("piglet", "piglets"), ("pony", "ponies"), ("donkey", "donkeys"), ("mule", "mules"),
            ("silo", "silos"), ("trough", "troughs"), ("wagon", "wagons"), ("beehive", "beehives"),
            ("windmill", "windmills"),
        ],
        "verbs": [
            ("feed", "feeds", "fed"), ("milk", "milks", "milked"), ("harvest", "harvests", "harvested"),
            ("plant", "plants", "planted"), ("water", "waters", "watered"), ("herd", "herds", "herded"),
            ("shear", "shears", "sheared"), ("saddle", "saddles", "saddled"), ("sow", "sows", "sowed"),
            ("reap", "reaps", "reaped"), ("fertilize", "fertilizes", "fertilized"),
            ("irrigate", "irrigates", "irrigated"), ("bale", "bales", "baled"), ("breed", "breeds", "bred"),
            ("weed", "weeds", "weeded"), ("hatch", "hatches", "hatched"),
        ],
        "adjectives": [
            "muddy", "rural", "rustic", "fertile", "ripe", "organic", "grassy", "dusty", "leafy", "woolly", "plump",
            "fresh", "golden", "dairy", "pastoral", "agricultural",
        ],
    },
    "space": {
        "nouns": [
            ("planet", "planets"), ("star", "stars"), ("moon", "moons"), ("rocket", "rockets"),
            ("astronaut", "astronauts"), ("comet", "comets"), ("galaxy", "galaxies"), ("asteroid", "asteroids"),
            ("satellite", "satellites"), ("telescope", "telescopes"), ("orbit", "orbits"),
            ("spaceship", "spaceships"), ("meteor", "meteors"), ("meteorite", "meteorites"), ("alien", "aliens"),
            ("nebula", "nebulae"), ("crater", "craters"), ("cosmonaut", "cosmonauts"), ("shuttle", "shuttles"),
            ("spacesuit", "spacesuits"), ("helmet", "helmets"), ("launchpad", "launchpads"),
            ("observatory", "observatories"), ("constellation", "constellations"), ("quasar", "quasars"),
            ("pulsar", "pulsars"), ("supernova", "supernovae"), ("rover", "rovers"), ("module", "modules"),
            ("antenna", "antennas"), ("lander", "landers"), ("thruster", "thrusters"), ("starship", "starships"),
            ("sun", "suns"), ("universe", "universes"), ("eclipse", "eclipses"), ("orbiter", "orbiters"),
            ("wormhole", "wormholes"), ("spacewalk", "spacewalks"), ("booster", "boosters"),
        ],
        "verbs": [
            ("launch", "launches", "launched"), ("explore", "explores", "explored"), ("land", "lands", "landed"),
            ("pilot", "pilots", "piloted"), ("detect", "detects", "detected"), ("observe", "observes", "observed"),
            ("deploy", "deploys", "deployed"), ("propel", "propels", "propelled"), ("refuel", "refuels", "refueled"),
            ("eject", "ejects", "ejected"), ("transmit", "transmits", "transmitted"),
            ("colonize", "colonizes", "colonized"), ("terraform", "terraforms", "terraformed"),
            ("photograph", "photographs", "photographed"), ("magnify", "magnifies", "magnified"),
            ("jettison", "jettisons", "jettisoned"),
        ],
        "adjectives": [
            "cosmic", "lunar", "solar", "stellar", "orbital", "galactic", "interstellar", "celestial", "weightless",
            "gravitational", "planetary", "starry", "extraterrestrial", "astronomical", "airless", "interplanetary",
        ],
    },
    "medicine": {
        "nouns": [
            ("doctor", "doctors"), ("nurse", "nurses"), ("patient", "patients"), ("hospital", "hospitals"),
            ("pill", "pills"), ("capsule", "capsules"), ("syringe", "syringes"), ("needle", "needles"),
            ("bandage", "bandages"), ("clinic", "clinics"), ("surgeon", "surgeons"), ("vaccine", "vaccines"),
            ("injection", "injections"), ("prescription", "prescriptions"), ("fever", "fevers"), ("wound", "wounds"),
            ("ambulance", "ambulances"), ("stethoscope", "stethoscopes"), ("thermometer", "thermometers"),
            ("disease", "diseases"), ("infection", "infections"), ("symptom", "symptoms"), ("virus", "viruses"),
            ("germ", "germs"), ("tumor", "tumors"), ("fracture", "fractures"), ("scalpel", "scalpels"),
            ("pharmacy", "pharmacies"), ("pharmacist", "pharmacists"), ("dentist", "dentists"),
            ("ointment", "ointments"), ("stretcher", "stretchers"), ("wheelchair", "wheelchairs"),
            ("crutch", "crutches"), ("vitamin", "vitamins"), ("antibiotic", "antibiotics"), ("rash", "rashes"),
            ("headache", "headaches"), ("allergy", "allergies"), ("diagnosis", "diagnoses"),
        ],
        "verbs": [
            ("treat", "treats", "treated"), ("cure", "cures", "cured"), ("heal", "heals", "healed"),
            ("examine", "examines", "examined"), ("prescribe", "prescribes", "prescribed"),
            ("vaccinate", "vaccinates", "vaccinated"), ("inject", "injects", "injected"),
            ("sterilize", "sterilizes", "sterilized"), ("disinfect", "disinfects", "disinfected"),
            ("stitch", "stitches", "stitched"), ("immunize", "immunizes", "immunized"),
            ("infect", "infects", "infected"), ("sedate", "sedates", "sedated"),
            ("hospitalize", "hospitalizes", "hospitalized"), ("medicate", "medicates", "medicated"),
            ("swab", "swabs", "swabbed"),
        ],
        "adjectives": [
            "sick", "healthy", "feverish", "contagious", "infectious", "medical", "clinical", "surgical", "chronic",
            "sterile", "painful", "swollen", "dizzy", "nauseous", "itchy", "allergic",
        ],
    },
    "sport": {
        "nouns": [
            ("ball", "balls"), ("bat", "bats"), ("goal", "goals"), ("team", "teams"), ("player", "players"),
            ("coach", "coaches"), ("referee", "referees"), ("stadium", "stadiums"), ("trophy", "trophies"),
            ("medal", "medals"), ("racket", "rackets"), ("glove", "gloves"), ("net", "nets"), ("captain", "captains"),
            ("goalkeeper", "goalkeepers"), ("athlete", "athletes"), ("champion", "champions"),
            ("tournament", "tournaments"), ("match", "matches"), ("race", "races"), ("runner", "runners"),
            ("sprinter", "sprinters"), ("jersey", "jerseys"), ("sneaker", "sneakers"), ("skateboard", "skateboards"),
            ("marathon", "marathons"), ("league", "leagues"), ("fan", "fans"), ("scoreboard", "scoreboards"),
            ("puck", "pucks"), ("hoop", "hoops"), ("mitt", "mitts"), ("hurdle", "hurdles"), ("javelin", "javelins"),
            ("dumbbell", "dumbbells"), ("gym", "gyms"), ("locker", "lockers"), ("umpire", "umpires"),
            ("opponent", "opponents"), ("teammate", "teammates"),
        ],
        "verbs": [
            ("kick", "kicks", "kicked"), ("throw", "throws", "threw"), ("catch", "catches", "caught"),
            ("score", "scores", "scored"), ("pass", "passes", "passed"), ("tackle", "tackles", "tackled"),
            ("dribble", "dribbles", "dribbled"), ("win", "wins", "won"), ("defend", "defends", "defended"),
            ("block", "blocks", "blocked"), ("serve", "serves", "served"), ("shoot", "shoots", "shot"),
            ("bounce", "bounces", "bounced"), ("swing", "swings", "swung"), ("pitch", "pitches", "pitched"),
            ("punt", "punts", "punted"),
        ],
        "adjectives": [
            "athletic", "competitive", "sporty", "undefeated", "victorious", "sweaty", "energetic", "muscular",
            "agile", "speedy", "defensive", "offensive", "unbeaten", "professional", "fit", "nimble",
        ],
    },
}


if __name__ == "__main__":
    world = toy_world(seed=0, num_documents=200)
    tokenizer = train_tokenizer((s for d in world["unlabeled"] for s in d), vocab_size=2048)
    rng = np.random.default_rng(0)
    print(f"toy world: {len(world['unlabeled'])} documents (sample), topics: {', '.join(TOPICS)}")
    print("a document:\n  " + "\n  ".join(world["unlabeled"][0]))
    print("labeled examples:\n  " + "\n  ".join(f"{t}\t{y}" for t, y in world["train"][:3]))
    batch = pretraining_batch(encode_documents(tokenizer, world["unlabeled"]), tokenizer, rng, 2, 48)
    for i in range(2):
        real = batch["attention_mask"][i]
        print(f"\nNSP label: {'IsNext' if batch['nsp_labels'][i] == IS_NEXT else 'NotNext'}")
        print("segment ids: " + "".join(map(str, batch["segment_ids"][i][real])))
        print("masked input: " + " ".join(tokenizer.vocab[t] for t in batch["input_ids"][i][real]))
        labels = batch["mlm_labels"][i]
        print("labels:       " + ", ".join(f"{p}:{tokenizer.vocab[labels[p]]}" for p in np.flatnonzero(labels != IGNORE_INDEX)))
