"""WordPiece, BERT's tokenizer: text -> words -> sub-word pieces -> ids.

    split_words(text)        BERT's "basic tokenizer": clean, lower-case, strip accents, split
                             at whitespace and punctuation, one word per CJK ideograph
    Tokenizer.wordpiece(w)   greedy longest match against the vocabulary; pieces inside a word
                             carry "##"; a word with no match is [UNK]
    train_tokenizer(texts)   learn a vocabulary: characters first, then the most frequent merges

The ids are BertTokenizer's exactly (tests/test_hf.py compares them on thousands of strings).

Run `python tokenizer.py` to see a toy-world vocabulary learned and a sentence split into pieces.
"""

import functools
import heapq
import re
import unicodedata
from collections import Counter

import numpy as np

from common import InputError, read_text_file, write_text_atomic

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
            or 0x2A700 <= code <= 0x2B73F or 0x2B740 <= code <= 0x2B81F
            or 0x2B820 <= code <= 0x2CEAF
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
            words.extend(w for raw in piece.translate(ASCII_CONTROL).split()
                         for w in split_word(raw, lowercase))
        else:
            # drop NUL, U+FFFD and control characters; every whitespace becomes a space;
            # every CJK ideograph becomes its own word
            cleaned = []
            # no Unicode normalisation here: BERT (and the Rust BertTokenizer) does none
            for ch in piece:
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


ASCII_PUNCTUATION = re.compile(r"([!-/:-@\[-`{-~])")  # is_punctuation's ASCII characters


def split_word(word, lowercase):
    """One whitespace-delimited word -> lower-cased, accent-stripped, split at punctuation.
    Words are remembered (most recur), except very long ones: a 5 MB "word" is split once and
    not kept."""
    if len(word) <= 4 * MAX_WORD_CHARACTERS:
        return split_word_remembered(word, lowercase)
    return split_word_once(word, lowercase)


def split_word_once(word, lowercase):
    # the same result, by a regular expression: no accents, and punctuation is ASCII_PUNCTUATION
    if word.isascii():
        return tuple(piece for piece in ASCII_PUNCTUATION.split(word.lower() if lowercase else word)
                     if piece)
    if lowercase:
        # lower-case, then strip accents: NFD splits "é" into "e" + a combining mark (Mn)
        word = "".join(c for c in unicodedata.normalize("NFD", word.lower())
                       if unicodedata.category(c) != "Mn")
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


split_word_remembered = functools.lru_cache(maxsize=1 << 20)(split_word_once)


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
        # BERT's rule; not remembered (a long word rarely recurs)
        if len(word) > MAX_WORD_CHARACTERS:
            return [UNK]
        if word in self._cache:
            return self._cache[word]
        if word in SPECIAL_TOKENS:
            pieces = [word]
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
        return [piece for word in split_words(text, self.lowercase)
                for piece in self.wordpiece(word)]

    def encode(self, text):
        """text -> token ids, without [CLS]/[SEP]."""
        return [self.token_to_id[piece] for piece in self.tokenize(text)]

    def decode(self, ids):
        return " ".join(self.vocab[i] for i in ids).replace(" ##", "")

    def save(self, path):
        """vocab.txt, BERT's format: one token per line, the line number is the id
        (written whole)."""
        write_text_atomic(path, "".join(token + "\n" for token in self.vocab))

    @classmethod
    def from_checkpoint(cls, checkpoint):
        """The tokenizer a checkpoint (or a Hugging Face folder read into one) was trained with."""
        return cls(checkpoint["vocab"], checkpoint.get("lowercase", True))

    @classmethod
    def load(cls, path, lowercase=True):
        # one token per line, its id the line number; a vocab.txt written on Windows ends lines
        # in \r\n
        tokens = [token.removesuffix("\r") for token in read_text_file(path).split("\n")]
        if tokens and tokens[-1] == "":
            tokens.pop()
        return cls(tokens, lowercase)


def train_tokenizer(texts, vocab_size, lowercase=True, min_frequency=2):
    """Learn a WordPiece vocabulary from text, the way `tokenizers`' WordPieceTrainer does:
    start from single characters (word-initial `a`, word-internal `##a`), then repeatedly add
    the merge of the most frequent adjacent pair (BPE merges), until vocab_size tokens. Words over
    MAX_WORD_CHARACTERS are left out: encoding makes each one [UNK] (BERT's rule), so they teach
    the vocabulary nothing -- and one 5 MB "word" would otherwise cost gigabytes of merges."""
    word_counts = Counter()
    for text in texts:
        word_counts.update(w for w in split_words(text, lowercase)
                           if w not in SPECIAL_TOKENS and len(w) <= MAX_WORD_CHARACTERS)
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
        raise InputError(f"vocab size {vocab_size} leaves no room beyond the "
                         f"{len(SPECIAL_TOKENS)} special tokens")
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
            symbols[index] = merge_pair(symbols[index], pair, merged)
            add_pairs(index, +1)
    return Tokenizer(vocab, lowercase)


def merge_pair(pieces, pair, merged):
    """One word's pieces with every occurrence of `pair`, left to right, replaced by `merged`."""
    merged_pieces, i = [], 0
    while i < len(pieces):
        if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == pair:
            merged_pieces.append(merged)
            i += 2
        else:
            merged_pieces.append(pieces[i])
            i += 1
    return merged_pieces


if __name__ == "__main__":
    import toyworld

    world = toyworld.toy_world(seed=0, num_documents=300)
    tokenizer = train_tokenizer((s for d in world["unlabeled"] for s in d), vocab_size=2048)
    print(f"a {len(tokenizer)}-token vocabulary from {len(world['unlabeled'])} "
          f"toy-world documents; "
          f"first entries: {' '.join(tokenizer.vocab[:12])}")
    for text in [world["train"][0][0], "The SALTY knives, naïvely re-stirred: [MASK] pots!"]:
        print(f"\ntext:   {text}")
        print(f"words:  {split_words(text)}")
        print(f"pieces: {tokenizer.tokenize(text)}")
        print(f"ids:    {tokenizer.encode(text)}")
