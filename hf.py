"""Hugging Face BERT folders in and out: start from a released BERT, hand a model back.

A `transformers` BERT folder holds config.json, the weights (model.safetensors, or
pytorch_model.bin from older releases), vocab.txt and usually tokenizer_config.json. Our
encoder is BERT's computation exactly (tests/test_hf.py checks every output against
`transformers`), so reading such a folder is only a matter of names:

    read_folder(folder)       -> the parts of a checkpoint (checkpoint.load_checkpoint makes
                                 the dict)
    export(checkpoint, out)   -> the same layout back, readable by `from_pretrained`

Everything else stays BERT's: the tied MLM decoder (it IS the token-embedding matrix, so the
file's copy is checked and dropped), the exact GELU, post-LN layers, absolute positions.
A config this code cannot compute exactly (another activation, relative positions, a
decoder, ...) is refused with one line -- never loaded silently wrong.

Run `python hf.py FOLDER` to see what a folder holds and how it maps onto ours.
"""

import contextlib
import hashlib
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile

import torch

from common import (
    MARKER,
    TEMPORARY_SUFFIX,
    UMASK,
    InputError,
    read_text_file,
    verify_records,
    write_atomic,
)
from model import Classifier, Config, PreTrainingModel
from tokenizer import CLS, MASK, PAD, SEP, UNK, Tokenizer

# ----------------------------------------------------------------------------------------
# Names: a `transformers` BERT state dict maps onto ours by this plain renaming table
# ----------------------------------------------------------------------------------------

# (our name, Hugging Face's name) as regular expressions; \1 is a layer index.
HF_NAMES = [
    (r"encoder\.embeddings\.token\.", "bert.embeddings.word_embeddings."),
    (r"encoder\.embeddings\.position\.", "bert.embeddings.position_embeddings."),
    (r"encoder\.embeddings\.segment\.", "bert.embeddings.token_type_embeddings."),
    (r"encoder\.embeddings\.layer_norm\.", "bert.embeddings.LayerNorm."),
    (r"encoder\.layers\.(\d+)\.attention\.(query|key|value)\.",
     r"bert.encoder.layer.\1.attention.self.\2."),
    (r"encoder\.layers\.(\d+)\.attention\.output\.",
     r"bert.encoder.layer.\1.attention.output.dense."),
    (r"encoder\.layers\.(\d+)\.attention_norm\.",
     r"bert.encoder.layer.\1.attention.output.LayerNorm."),
    (r"encoder\.layers\.(\d+)\.feed_forward_in\.", r"bert.encoder.layer.\1.intermediate.dense."),
    (r"encoder\.layers\.(\d+)\.feed_forward_out\.", r"bert.encoder.layer.\1.output.dense."),
    (r"encoder\.layers\.(\d+)\.output_norm\.", r"bert.encoder.layer.\1.output.LayerNorm."),
    (r"encoder\.pooler\.", "bert.pooler.dense."),
    (r"mlm_head\.dense\.", "cls.predictions.transform.dense."),
    (r"mlm_head\.layer_norm\.", "cls.predictions.transform.LayerNorm."),
    (r"mlm_head\.bias$", "cls.predictions.bias"),
    (r"nsp_head\.", "cls.seq_relationship."),
    (r"classifier\.", "classifier."),
]


def to_hf_name(name):
    """Our parameter name -> the `transformers` BertForPreTraining/-SequenceClassification name."""
    for ours, theirs in HF_NAMES:
        renamed, count = re.subn("^" + ours, theirs, name)
        if count:
            return renamed
    raise KeyError(f"no Hugging Face name for {name}")


def normalise_hf_name(name):
    """Any BERT layout -> BertForPreTraining's names. BertModel files have no "bert." prefix;
    checkpoints converted from Google's TensorFlow release call LayerNorm's parameters
    gamma/beta."""
    name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name)
    name = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)
    if not name.startswith(("bert.", "cls.", "classifier.")):
        name = "bert." + name
    return name


# ----------------------------------------------------------------------------------------
# config.json <-> Config
# ----------------------------------------------------------------------------------------

# config.json entries that change the computation, and the only value we compute exactly.
# (Entries not listed -- use_cache, pad_token_id, architectures, ... -- do not change it.)
REQUIRED_VALUES = {
    "model_type": "bert",
    "hidden_act": "gelu",  # exact GELU; "gelu_new"/"gelu_pytorch_tanh" are the tanh approximation
    "position_embedding_type": "absolute",  # learned absolute positions, not relative_key(_query)
    "is_decoder": False,  # BERT is an encoder: no causal mask
    "add_cross_attention": False,
    "tie_word_embeddings": True,  # the MLM decoder is the token-embedding matrix
}


# The largest sizes a config may give (BERT-large is 1024 wide, 24 layers, 16 heads, 4096 inner,
# 512 positions, a 30522-token vocabulary): far beyond any BERT, and each refused before a byte
# is allocated. A model within them must still fit the memory there is (check_memory).
SIZE_LIMITS = {"vocab_size": 1_000_000, "hidden_size": 16_384, "num_layers": 256, "num_heads": 256,
               "intermediate_size": 65_536, "max_positions": 65_536, "type_vocab_size": 1_024,
               "head_size": 16_384}  # head_size may also be None: H / h


def check_config_values(values, path):
    """A config (our field names) checked before any model is built from it: every size a whole
    number in [1, SIZE_LIMITS], dropouts in [0, 1), the epsilon and the init range finite and
    positive, and the weights' float32 bytes within the memory there is. One line if not."""
    for name, limit in SIZE_LIMITS.items():
        value = values.get(name)
        if name == "head_size" and value is None:
            continue
        if name in values and not (isinstance(value, int) and not isinstance(value, bool)
                                   and 1 <= value <= limit):
            raise InputError(f"{path}: the config is not valid ({name} = {value!r}; "
                             f"expected a whole number from 1 to {limit:,})")
    for name in ("dropout", "attention_dropout"):
        value = values.get(name, 0.0)
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1):
            raise InputError(f"{path}: the config is not valid ({name} = {value!r}; "
                             f"expected a probability in [0, 1))")
    for name in ("layer_norm_eps", "initializer_range"):
        value = values.get(name, 0.02)
        if not (isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value) and value > 0):
            raise InputError(f"{path}: the config is not valid ({name} = {value!r}; "
                             f"expected a positive number)")
    check_memory(values, path)


def parameter_count(values):
    """The weights a config implies (BERT's layout: embeddings, L layers, pooler and heads)."""
    v, h, i, p, t, n = (values.get(k, 1) for k in ("vocab_size", "hidden_size",
                                                     "intermediate_size", "max_positions",
                                                     "type_vocab_size", "num_layers"))
    # attention's projections are h * d wide: H, unless heads were removed (config head_size)
    a = values.get("num_heads", 1) * values["head_size"] if values.get("head_size") else h
    embeddings = (v + p + t) * h + 2 * h
    layer = 3 * (h * a + a) + (a * h + h) + 2 * h * i + i + h + 4 * h
    return embeddings + n * layer + (h * h + h) + (h * h + 3 * h + v) + 2 * h + 2


def check_memory(values, path):
    """Building the model needs its float32 weights in memory; a config asking more than the
    memory available now is refused with the numbers, before the allocation fails or swaps."""
    needed = 4 * parameter_count(values)
    available = available_memory()
    if available is not None and needed > available:
        raise InputError(f"{path}: the config's {parameter_count(values):,} weights need "
                         f"{needed / 2 ** 30:.1f} GiB; "
                         f"{available / 2 ** 30:.1f} GiB of memory is available")


def available_memory():
    """Bytes of memory available now (Linux: MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def config_from_hf(hf, path):
    """A parsed config.json -> our Config, or a one-line refusal (checked before anything is
    allocated)."""
    for key, required in REQUIRED_VALUES.items():
        if key in hf and hf[key] != required:
            raise InputError(f"{path}: {key} = {hf[key]!r} is not supported "
                             f"(ptft computes BERT with {key} = {required!r})")
    if hf.get("embedding_size", hf.get("hidden_size")) != hf.get("hidden_size"):
        raise InputError(f"{path}: embedding_size {hf['embedding_size']} differs from hidden_size "
                         f"(an ALBERT-style "
                         "factorised embedding); not supported")
    missing = [key for key in ("vocab_size", "hidden_size", "num_hidden_layers",
                               "num_attention_heads", "intermediate_size",
                               "max_position_embeddings")
               if key not in hf]
    if missing:
        raise InputError(f"{path}: missing {', '.join(missing)}; expected a BERT config.json")
    values = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"], max_positions=hf["max_position_embeddings"],
        type_vocab_size=hf.get("type_vocab_size", 2),
        dropout=hf.get("hidden_dropout_prob", 0.1),
        attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        initializer_range=hf.get("initializer_range", 0.02))
    check_config_values(values, path)
    try:
        return Config(**values, attention="sdpa")
    except (TypeError, ValueError) as error:
        raise InputError(f"{path}: {error}") from None


def config_to_hf(config, architecture, labels=None):
    hf = {
        "architectures": [architecture], "model_type": "bert", "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_positions, "type_vocab_size": config.type_vocab_size,
        "hidden_dropout_prob": config.dropout,
        "attention_probs_dropout_prob": config.attention_dropout,
        "layer_norm_eps": config.layer_norm_eps, "initializer_range": config.initializer_range,
        "pad_token_id": 0, **REQUIRED_VALUES,
    }
    if labels is not None:
        hf["id2label"] = {str(i): label for i, label in enumerate(labels)}
        hf["label2id"] = {label: i for i, label in enumerate(labels)}
    return hf


# ----------------------------------------------------------------------------------------
# Reading a folder
# ----------------------------------------------------------------------------------------


def is_hf_folder(path):
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json"))


def read_json(path):
    try:
        value = json.loads(read_text_file(path))
    except json.JSONDecodeError as error:
        raise InputError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}: expected a JSON object")
    return value


def read_weights(folder):
    """The state dict in model.safetensors or pytorch_model.bin, on the CPU. A .bin file is a
    pickle: weights_only=True reads tensors only and refuses anything that would run code."""
    safetensors_path = os.path.join(folder, "model.safetensors")
    bin_path = os.path.join(folder, "pytorch_model.bin")
    if os.path.exists(safetensors_path):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise InputError(f"{safetensors_path}: reading safetensors needs "
                             f"`pip install safetensors`") from None
        try:
            return load_file(safetensors_path, device="cpu")
        except Exception as error:
            raise InputError(f"{safetensors_path}: not a readable safetensors file "
                             f"({str(error)[:120]})") from None
    if os.path.exists(bin_path):
        verify_records(bin_path, required=False)  # the zip's CRC-32s, where the file is a zip
        try:
            return torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as error:
            reason = (str(error).strip().splitlines()[0] if str(error).strip()
                      else type(error).__name__)
            raise InputError(f"{bin_path}: not a weights file we can trust "
                             f"({reason[:120]})") from None
    if any(name.endswith(".index.json") for name in os.listdir(folder)):
        raise InputError(f"{folder}: sharded weights are not supported "
                         f"(a BERT-size model fits in one file)")
    raise InputError(f"{folder}: no model.safetensors or pytorch_model.bin")


def read_tokenizer(folder):
    """vocab.txt + tokenizer_config.json -> our Tokenizer, which reproduces BertTokenizer's ids."""
    vocab_path = os.path.join(folder, "vocab.txt")
    if not os.path.exists(vocab_path):
        raise InputError(f"{folder}: no vocab.txt (ptft reads WordPiece vocabularies only)")
    settings_path = os.path.join(folder, "tokenizer_config.json")
    settings = read_json(settings_path) if os.path.exists(settings_path) else {}
    lowercase = settings.get("do_lower_case", True)
    # BertTokenizer options we do not implement: refuse rather than tokenise differently
    if settings.get("strip_accents") not in (None, lowercase):
        raise InputError(f"{settings_path}: strip_accents = {settings['strip_accents']} "
                         f"with do_lower_case = {lowercase} is not supported "
                         f"(ptft strips accents exactly when it lower-cases)")
    for key in ("tokenize_chinese_chars", "do_basic_tokenize"):
        if settings.get(key, True) is not True:
            raise InputError(f"{settings_path}: {key} = {settings[key]} is not supported")
    return Tokenizer.load(vocab_path, lowercase)


def hf_weights(folder):
    """The folder's weights under normalised Hugging Face names, without the copies BERT's layout
    may carry: position_ids (a buffer holding 0..T-1) and the MLM decoder, which is tied to the
    token embedding (a decoder that differs from it is refused)."""
    state = {normalise_hf_name(name): value for name, value in read_weights(folder).items()
             if not name.endswith("position_ids")}
    decoder = state.pop("cls.predictions.decoder.weight", None)
    embedding = state.get("bert.embeddings.word_embeddings.weight")
    if decoder is not None and embedding is not None and not torch.equal(decoder, embedding):
        raise InputError(f"{folder}: the MLM decoder is not tied to the word embeddings; "
                         f"not supported")
    # the same tensor as cls.predictions.bias
    decoder_bias = state.pop("cls.predictions.decoder.bias", None)
    if decoder_bias is not None:
        state.setdefault("cls.predictions.bias", decoder_bias)
    return state


def read_folder(folder, seed=0):
    """A Hugging Face BERT folder -> (kind, state dict in our names, Config, Tokenizer, extra):
    kind is "pretraining" or "classifier"; extra holds labels (a classifier's), source, and
    `fresh`: the parts the file had no weights for, initialised the way BERT initialises them
    (seeded) -- e.g. the MLM and NSP heads of a sentence-embedding model."""
    verify_checksums(folder)
    config_path = os.path.join(folder, "config.json")
    hf_config = read_json(config_path)
    config = config_from_hf(hf_config, config_path)
    tokenizer = read_tokenizer(folder)
    if len(tokenizer) != config.vocab_size:
        raise InputError(f"{folder}: vocab.txt has {len(tokenizer)} tokens but config.json "
                         f"says vocab_size {config.vocab_size}")
    weights_path = folder  # for messages
    state = hf_weights(folder)
    classifier_weight = state.get("classifier.weight")
    with torch.random.fork_rng():  # fresh parts are seeded without touching the caller's RNG
        torch.manual_seed(seed)
        if classifier_weight is not None:
            labels = [hf_config.get("id2label", {}).get(str(i), f"LABEL_{i}")
                      for i in range(classifier_weight.shape[0])]
            model = Classifier(config, len(labels))
        else:
            labels, model = None, PreTrainingModel(config)
    ours = model.state_dict()
    hf_to_ours = {to_hf_name(name): name for name in ours}
    unexpected = [name for name in state if name not in hf_to_ours]
    if unexpected:
        raise InputError(f"{weights_path}: unexpected weight {unexpected[0]!r}"
                         f"{f' (and {len(unexpected) - 1} more)' if len(unexpected) > 1 else ''}; "
                         f"not a BERT layout ptft knows")
    for hf_name, value in state.items():
        name = hf_to_ours[hf_name]
        if value.shape != ours[name].shape:
            raise InputError(f"{weights_path}: {hf_name} has shape {tuple(value.shape)}, "
                             f"config.json implies {tuple(ours[name].shape)}")
        ours[name] = value.float()
    absent = [name for hf_name, name in hf_to_ours.items() if hf_name not in state]
    fresh = sorted({"encoder.pooler" if name.startswith("encoder.pooler") else name.split(".")[0]
                    for name in absent})
    if any(part.startswith("encoder") and part != "encoder.pooler" for part in fresh):
        first = next(name for name in absent if not name.startswith("encoder.pooler"))
        raise InputError(f"{weights_path}: no weights for {to_hf_name(first)}; "
                         f"the encoder must be complete")
    extra = {"source": f"huggingface:{os.path.abspath(folder)}", "fresh": fresh,
             **({"labels": labels} if labels else {})}
    return ("classifier" if labels else "pretraining"), ours, config, tokenizer, extra


# ----------------------------------------------------------------------------------------
# Writing a folder
# ----------------------------------------------------------------------------------------


def check_exportable(checkpoint):
    """What a Hugging Face BERT folder cannot say is refused before anything is written."""
    config = checkpoint.get("config", {})
    if config.get("causal"):  # C8: docs/huggingface.md says why
        raise InputError("a causal (--objective causal) run cannot be exported: the BERT folders "
                         "written here attend both ways (docs/huggingface.md: causal runs)")
    if config.get("head_size") is not None:  # C7's prune --unit heads
        raise InputError("a classifier with heads removed (prune --unit heads) cannot be "
                         "exported: a BERT folder's heads are hidden_size / num_attention_heads "
                         "wide")
    if checkpoint.get("kind") == "classifier" and checkpoint.get("pool", "cls") != "cls":
        raise InputError(f"a classifier with --pool {checkpoint['pool']} cannot be exported: "
                         "transformers' "
                         "BertForSequenceClassification reads the pooler's [CLS] vector")


# written last in an exported folder: `sha256sum -c` reads it too
CHECKSUMS = "ptft-checksums.sha256"


def verify_checksums(folder):
    """Integrity: a folder with CHECKSUMS (every folder export writes) has each listed file
    checked against its SHA-256 before anything is read; one changed bit is refused. A folder
    without one (downloaded, written by transformers) is read as it is."""
    path = os.path.join(folder, CHECKSUMS)
    if not os.path.exists(path):
        return
    for number, line in enumerate(read_text_file(path).splitlines(), start=1):
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name or os.sep in name or name.startswith("."):
            raise InputError(f"{path}:{number}: expected 'SHA256  FILE'; "
                             f"the checksum file is damaged")
        if file_sha256(os.path.join(folder, name)) != digest:
            raise InputError(f"{folder}/{name}: does not match its SHA-256 in {CHECKSUMS}: "
                             f"damaged, or changed after it "
                             f"was written (if on purpose, delete {CHECKSUMS})")


def file_sha256(path):
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    except OSError as error:
        raise InputError(f"{path}: cannot be read ({error.strerror})") from None
    return digest.hexdigest()


def export(checkpoint, out):
    """A ptft checkpoint -> a Hugging Face folder: config.json, model.safetensors, vocab.txt,
    tokenizer_config.json and, last, CHECKSUMS (each file's SHA-256). A pre-training checkpoint
    opens as BertForPreTraining, a classifier as BertForSequenceClassification. The folder
    appears whole or not at all: it is written under a new, unique temporary name beside `out`
    (through a symbolic link to a folder: beside its target) and renamed at the end; a failure
    removes it, and nothing else is touched."""
    check_exportable(checkpoint)
    config = Config(**checkpoint["config"])
    classifier = checkpoint.get("kind") == "classifier"
    architecture = "BertForSequenceClassification" if classifier else "BertForPreTraining"
    state = {to_hf_name(name): value.detach().float().contiguous()
             for name, value in checkpoint["model"].items()}
    if not classifier:
        # the tied decoder: transformers re-ties it from the word embeddings; its bias is
        # cls.predictions.bias
        state.pop("cls.predictions.decoder.weight", None)
    target = os.path.realpath(out)
    labels = checkpoint.get("labels") if classifier else None
    files = {"config.json": json.dumps(config_to_hf(config, architecture, labels),
                                       indent=2).encode()}
    try:
        from safetensors.torch import save
        files["model.safetensors"] = save(state, metadata={"format": "pt"})
    except ImportError:  # safetensors is in requirements.txt; without it, the older .bin layout
        buffer = io.BytesIO()
        torch.save(state, buffer)
        files["pytorch_model.bin"] = buffer.getvalue()
    files["vocab.txt"] = "".join(token + "\n" for token in checkpoint["vocab"]).encode("utf-8")
    files["tokenizer_config.json"] = json.dumps({
        "tokenizer_class": "BertTokenizer", "do_lower_case": checkpoint.get("lowercase", True),
        "model_max_length": config.max_positions, "unk_token": UNK, "sep_token": SEP,
        "pad_token": PAD, "cls_token": CLS, "mask_token": MASK}, indent=2).encode()
    files[CHECKSUMS] = "".join(f"{hashlib.sha256(content).hexdigest()}  {name}\n"
                               for name, content in files.items()).encode()
    partial = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=f".{os.path.basename(target)}.",
                               suffix=TEMPORARY_SUFFIX)
    try:
        # mkdtemp makes it 0700; the folder gets what os.makedirs would give
        os.chmod(partial, 0o777 & ~UMASK)
        # the marker: a folder ptft made (checkpoint.remove_made_folder)
        for name, content in {**files, MARKER: b""}.items():
            write_atomic(os.path.join(partial, name), lambda f, content=content: f.write(content))
        # prepare_out_folder left it empty but for the marker (or it did not exist)
        if os.path.isdir(target):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(target, MARKER))
            os.rmdir(target)
        os.replace(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python hf.py HF_FOLDER   "
                 "(shows how a Hugging Face BERT folder maps onto ptft)")
    try:
        kind, state, config, tokenizer, extra = read_folder(sys.argv[1])
    except InputError as error:
        sys.exit(f"error: {error}")
    print(f"kind: {kind}  vocab: {len(tokenizer)}  lowercase: {tokenizer.lowercase}")
    print(f"config: {config}")
    print(f"initialised fresh (no weights in the file): {', '.join(extra['fresh']) or 'nothing'}")
    for name, value in list(state.items())[:8]:
        print(f"  {to_hf_name(name):55s} -> {name} {tuple(value.shape)}")
    print(f"  ... {len(state)} tensors in all")
