"""ptft is BERT, not BERT-shaped: a Hugging Face BERT folder loads into ptft and computes the
same numbers as `transformers`; ptft's models export back; BertTokenizer's ids are reproduced."""

import json
import os
import random

import pytest
import torch
import torch.nn.functional as F
import transformers

import data
import fast
import hf
import toyworld
from checkpoint import load_checkpoint, open_model
from common import IGNORE_INDEX
from conftest import pretraining_losses
from model import Classifier, Config, PreTrainingModel
from tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer

# odd sizes on purpose: 6 heads x 16, intermediate not 4 x hidden, one head, 3 layers
SHAPES = [dict(hidden_size=96, num_heads=6, intermediate_size=200, num_layers=2),
          dict(hidden_size=40, num_heads=5, intermediate_size=72, num_layers=3),
          dict(hidden_size=64, num_heads=1, intermediate_size=64, num_layers=1)]


def hf_config(config, **extra):
    return transformers.BertConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_positions, type_vocab_size=config.type_vocab_size,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=config.layer_norm_eps, **extra)


def perturb(model, seed, scale=0.1):
    """Non-trivial LayerNorms and biases, so that a swapped name cannot pass by accident."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return model


def write_vocab(folder, size):
    vocab = SPECIAL_TOKENS + [f"w{i}" for i in range(size - len(SPECIAL_TOKENS))]
    Tokenizer(vocab).save(os.path.join(folder, "vocab.txt"))


def save_hf(model, folder):
    model.save_pretrained(folder)
    write_vocab(folder, model.config.vocab_size)
    return str(folder)


def make_batch(config, seed, batch_size=4, length=30):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, config.vocab_size, (batch_size, length), generator=generator)
    attention_mask = torch.ones(batch_size, length, dtype=torch.long)
    attention_mask[1, 17:] = 0
    attention_mask[3, 5:] = 0
    segment_ids = (torch.arange(length) >= 12).long().expand(batch_size, -1) * attention_mask
    mlm_labels = torch.full_like(input_ids, IGNORE_INDEX)
    mlm_labels[:, 2:5] = input_ids[:, 2:5]
    mlm_labels[0, 20:24] = input_ids[0, 20:24]
    return dict(input_ids=input_ids, attention_mask=attention_mask, segment_ids=segment_ids,
                mlm_labels=mlm_labels, nsp_labels=torch.tensor([0, 1, 1, 0]))


def ours_outputs(model, batch):
    real = batch["attention_mask"].bool()
    sequence, pooled = model.encoder(batch["input_ids"], batch["segment_ids"], real)
    scores = model.mlm_scores(sequence, batch["mlm_labels"])
    _, loss_mlm, loss_nsp = pretraining_losses(model, batch["input_ids"], batch["segment_ids"], real, batch["mlm_labels"], batch["nsp_labels"])
    return dict(sequence=sequence[real], pooled=pooled, mlm_logits=scores, nsp_logits=model.nsp_head(pooled),
                mlm_loss=loss_mlm, nsp_loss=loss_nsp)


def hf_outputs(model, batch):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                token_type_ids=batch["segment_ids"], output_hidden_states=True)
    labels = batch["mlm_labels"]
    mlm_logits = out.prediction_logits[labels != IGNORE_INDEX]
    pooled = model.bert.pooler(out.hidden_states[-1])
    return dict(sequence=out.hidden_states[-1][batch["attention_mask"].bool()], pooled=pooled, mlm_logits=mlm_logits,
                nsp_logits=out.seq_relationship_logits,
                mlm_loss=F.cross_entropy(out.prediction_logits.flatten(0, 1), labels.flatten()),
                nsp_loss=F.cross_entropy(out.seq_relationship_logits, batch["nsp_labels"]))


# float32 agreement with transformers: on a GPU the kernels sum in other orders
FP32 = {"cpu": 1e-5, "cuda": 1e-4}


def assert_same(ours, theirs, tolerance=1e-5):
    for name in theirs:
        assert torch.allclose(ours[name], theirs[name], atol=tolerance, rtol=0), \
            f"{name}: max difference {(ours[name] - theirs[name]).abs().max().item():.2e}"


def load_ours(folder):
    model, _, checkpoint = open_model(folder, log=lambda message: None)
    return model.eval(), checkpoint


@torch.no_grad()
def test_a_saved_bert_for_pretraining_loads_and_computes_the_same_numbers(tmp_path, device):
    for seed, shape in enumerate(SHAPES):
        config = Config(vocab_size=211, max_positions=64, **shape)
        torch.manual_seed(seed)
        theirs = perturb(transformers.BertForPreTraining(hf_config(config)), seed).eval()
        ours, checkpoint = load_ours(save_hf(theirs, tmp_path / f"bert{seed}"))
        assert checkpoint["kind"] == "pretraining" and checkpoint["fresh"] == []
        batch = {name: value.to(device) for name, value in make_batch(config, seed).items()}
        # sequence output, pooled output, MLM logits, NSP logits and both losses (float32, eval)
        assert_same(ours_outputs(ours.to(device), batch), hf_outputs(theirs.to(device), batch), tolerance=FP32[device])


def test_every_config_round_trips_through_a_config_json_and_a_headless_folder_cannot_fill_masks(tmp_path, cli):
    rng = random.Random(0)
    for _ in range(50):
        heads = rng.randint(1, 6)
        config = Config(vocab_size=rng.randint(8, 40000), hidden_size=heads * rng.randint(1, 40), num_layers=rng.randint(1, 12),
                        num_heads=heads, intermediate_size=rng.randint(1, 4000), max_positions=rng.randint(8, 1024),
                        type_vocab_size=rng.randint(1, 4), dropout=rng.random() / 2, attention_dropout=rng.random() / 2,
                        layer_norm_eps=10 ** -rng.uniform(5, 12), initializer_range=rng.uniform(0.001, 0.1), attention="sdpa")
        assert hf.config_from_hf(json.loads(json.dumps(hf.config_to_hf(config, "BertModel"))), "config.json") == config
    labels = hf.config_to_hf(Config(), "BertForSequenceClassification", labels=["b", "a", "c"])
    assert labels["label2id"] == {label: int(i) for i, label in labels["id2label"].items()} == {"b": 0, "a": 1, "c": 2}
    # a BertModel folder has no MLM head: fill-mask refuses rather than predict from random weights
    folder = save_hf(transformers.BertModel(hf_config(Config(vocab_size=60, max_positions=32, **SHAPES[2]))), tmp_path / "bare")
    code, _, stderr = cli("fill-mask", "--init", folder, "a [MASK]")
    assert code == 2 and "no MLM head weights" in stderr and stderr.count("\n") == 1, stderr


@pytest.mark.parametrize("change, needle", [
    ({"tokenizer_config.json": {"do_lower_case": True, "strip_accents": False}}, "strip_accents = False"),
    ({"tokenizer_config.json": {"tokenize_chinese_chars": False}}, "tokenize_chinese_chars = False is not supported"),
    ({"tokenizer_config.json": {"do_basic_tokenize": False}}, "do_basic_tokenize = False is not supported"),
    ("vocab one token short", "vocab.txt has 59 tokens but config.json says vocab_size 60"),
    ("untied decoder", "the MLM decoder is not tied to the word embeddings"),
])
def test_a_folder_ptft_would_read_differently_from_transformers_is_refused_in_one_line(tmp_path, cli, change, needle):
    config = Config(vocab_size=60, max_positions=32, **SHAPES[2])
    torch.manual_seed(0)
    folder = save_hf(transformers.BertForPreTraining(hf_config(config)), tmp_path / "bert")
    if isinstance(change, dict):
        for name, settings in change.items():
            (tmp_path / "bert" / name).write_text(json.dumps(settings))
    elif change == "vocab one token short":
        write_vocab(folder, 59)
    else:  # a decoder of its own, in the old file format that can carry one
        state = transformers.BertForPreTraining(hf_config(config)).state_dict()
        state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"] + 1.0
        os.remove(tmp_path / "bert" / "model.safetensors")
        torch.save(state, tmp_path / "bert" / "pytorch_model.bin")
    code, _, stderr = cli("fill-mask", "--init", folder, "a [MASK]")
    assert code == 2 and needle in stderr and stderr.count("\n") == 1, stderr


def test_the_default_config_has_berts_constants():
    bert = transformers.BertConfig()
    config = Config()
    assert (config.layer_norm_eps, config.initializer_range, config.type_vocab_size) == \
        (bert.layer_norm_eps, bert.initializer_range, bert.type_vocab_size)
    assert (config.dropout, config.attention_dropout) == (bert.hidden_dropout_prob, bert.attention_probs_dropout_prob)


@torch.no_grad()
def test_dropout_acts_where_berts_does_with_its_two_rates(tmp_path, monkeypatch):
    """In training, with dropout made deterministic (x -> (1 - p) x, on both sides), ptft computes
    what transformers computes: dropout after the embeddings' LayerNorm, on the attention
    probabilities (their own rate), on the attention and feed-forward outputs before each residual
    add -- and nowhere else."""
    monkeypatch.setattr(F, "dropout", lambda x, p=0.5, training=True, inplace=False: x * (1 - p) if training else x)
    monkeypatch.setattr(fast.Dropout, "forward", lambda self, x: x * (1 - self.p) if self.training else x)
    config = Config(vocab_size=150, max_positions=64, **SHAPES[1])
    torch.manual_seed(0)
    theirs = perturb(transformers.BertForPreTraining(hf_config(config, attn_implementation="eager")), 0)
    theirs.config.hidden_dropout_prob, theirs.config.attention_probs_dropout_prob = 0.1, 0.3
    folder = tmp_path / "bert"
    save_hf(theirs, folder)
    theirs = transformers.BertForPreTraining.from_pretrained(folder, attn_implementation="eager").train()
    ours, _ = load_ours(str(folder))
    assert (ours.config.dropout, ours.config.attention_dropout) == (0.1, 0.3)
    batch = make_batch(config, 0)
    assert_same(ours_outputs(ours.train(), batch), hf_outputs(theirs, batch))
    assert not torch.allclose(ours_outputs(ours.eval(), batch)["sequence"], hf_outputs(theirs, batch)["sequence"])  # it acts


@torch.no_grad()
def test_old_pytorch_model_bin_layouts_load_too(tmp_path):
    """pytorch_model.bin (read with weights_only=True), Google-converted gamma/beta names, the
    tied decoder's copy and position_ids buffers in the file, with and without `bert.`."""
    config = Config(vocab_size=150, max_positions=64, **SHAPES[0])
    torch.manual_seed(0)
    theirs = perturb(transformers.BertForPreTraining(hf_config(config)), 0).eval()
    state = theirs.state_dict()
    state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]
    state["bert.embeddings.position_ids"] = torch.arange(config.max_positions)[None]
    old_names = {name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): value
                 for name, value in state.items()}
    folder = tmp_path / "old"
    folder.mkdir()
    theirs.config.save_pretrained(folder)
    write_vocab(folder, config.vocab_size)
    torch.save(old_names, folder / "pytorch_model.bin")
    ours, _ = load_ours(str(folder))
    batch = make_batch(config, 0)
    assert_same(ours_outputs(ours, batch), hf_outputs(theirs, batch))


@torch.no_grad()
def test_other_layouts_load_and_missing_heads_are_initialised_fresh(tmp_path):
    config = Config(vocab_size=120, max_positions=64, **SHAPES[1])
    batch = make_batch(config, 1)
    real = batch["attention_mask"].bool()
    torch.manual_seed(1)
    # BertModel: no "bert." prefix, no heads (a sentence-embedding checkpoint looks like this)
    encoder_only = perturb(transformers.BertModel(hf_config(config)), 1).eval()
    messages = []
    checkpoint = load_checkpoint(save_hf(encoder_only, tmp_path / "bare"), log=messages.append)
    assert checkpoint["fresh"] == ["mlm_head", "nsp_head"]
    assert len(messages) == 1 and "initialised fresh" in messages[0] and "mlm_head" in messages[0]
    ours = PreTrainingModel(Config(**checkpoint["config"])).eval()
    ours.load_state_dict(checkpoint["model"])
    expected = encoder_only(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            token_type_ids=batch["segment_ids"])
    sequence, pooled = ours.encoder(batch["input_ids"], batch["segment_ids"], real)
    assert torch.allclose(sequence[real], expected.last_hidden_state[real], atol=1e-5)
    assert torch.allclose(pooled, expected.pooler_output, atol=1e-5)
    # BertForMaskedLM: no pooler, no NSP head
    masked_lm = perturb(transformers.BertForMaskedLM(hf_config(config)), 2).eval()
    ours, checkpoint = load_ours(save_hf(masked_lm, tmp_path / "mlm"))
    assert checkpoint["fresh"] == ["encoder.pooler", "nsp_head"]
    logits = masked_lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       token_type_ids=batch["segment_ids"]).logits
    sequence, _ = ours.encoder(batch["input_ids"], batch["segment_ids"], real)
    assert torch.allclose(ours.mlm_scores(sequence, batch["mlm_labels"]), logits[batch["mlm_labels"] != IGNORE_INDEX], atol=1e-5)
    # BertForSequenceClassification: encoder + pooler + classifier; label names from id2label
    classifier = perturb(transformers.BertForSequenceClassification(
        hf_config(config, num_labels=3, id2label={0: "neg", 1: "neu", 2: "pos"})), 3).eval()
    ours, checkpoint = load_ours(save_hf(classifier, tmp_path / "classifier"))
    assert checkpoint["kind"] == "classifier" and checkpoint["labels"] == ["neg", "neu", "pos"]
    expected = classifier(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          token_type_ids=batch["segment_ids"]).logits
    assert torch.allclose(ours(batch["input_ids"], batch["segment_ids"], real), expected, atol=1e-5)


@torch.no_grad()
def test_export_opens_in_transformers_with_the_same_numbers_and_round_trips_exactly(tmp_path):
    for seed, shape in enumerate(SHAPES):
        config = Config(vocab_size=97, max_positions=64, dropout=0.0, attention_dropout=0.0, **shape)
        torch.manual_seed(seed)
        ours = perturb(PreTrainingModel(config), seed).eval()
        checkpoint = {"kind": "pretraining", "model": ours.state_dict(), "config": config.to_dict(),
                      "vocab": SPECIAL_TOKENS + [f"w{i}" for i in range(92)], "lowercase": True}
        folder = str(tmp_path / f"export{seed}")
        hf.export(checkpoint, folder)
        assert sorted(os.listdir(folder)) == sorted([".ptft-run", "config.json", "model.safetensors", hf.CHECKSUMS,
                                                     "tokenizer_config.json", "vocab.txt"])
        theirs = transformers.BertForPreTraining.from_pretrained(folder).eval()
        batch = make_batch(config, seed)
        assert_same(ours_outputs(ours, batch), hf_outputs(theirs, batch))
        reloaded = load_checkpoint(folder)  # and back: every tensor bit-identical
        assert reloaded["fresh"] == [] and reloaded["vocab"] == checkpoint["vocab"]
        assert all(torch.equal(reloaded["model"][name], value) for name, value in checkpoint["model"].items())
    classifier = perturb(Classifier(config, 4), 7).eval()
    folder = str(tmp_path / "classifier")
    hf.export({"kind": "classifier", "model": classifier.state_dict(), "config": config.to_dict(),
               "vocab": checkpoint["vocab"], "labels": ["a", "b", "c", "d"]}, folder)
    theirs = transformers.BertForSequenceClassification.from_pretrained(folder).eval()
    assert theirs.config.id2label == {0: "a", 1: "b", 2: "c", 3: "d"}
    batch = make_batch(config, 9)
    expected = theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      token_type_ids=batch["segment_ids"]).logits
    assert torch.allclose(classifier(batch["input_ids"], batch["segment_ids"], batch["attention_mask"].bool()),
                          expected, atol=1e-5)


def test_one_training_step_gives_the_same_loss_and_gradients(tmp_path, device):
    config = Config(vocab_size=150, max_positions=64, dropout=0.0, attention_dropout=0.0, **SHAPES[0])
    torch.manual_seed(0)
    theirs = perturb(transformers.BertForPreTraining(hf_config(config)), 0)
    ours, _ = load_ours(save_hf(theirs, tmp_path / "bert"))
    ours.to(device).train()
    theirs.to(device).train()
    batch = {name: value.to(device) for name, value in make_batch(config, 0).items()}
    loss_ours = pretraining_losses(ours, batch["input_ids"], batch["segment_ids"], batch["attention_mask"].bool(),
                                   batch["mlm_labels"], batch["nsp_labels"])[0]
    loss_theirs = theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         token_type_ids=batch["segment_ids"], labels=batch["mlm_labels"],
                         next_sentence_label=batch["nsp_labels"]).loss
    loss_ours.backward()
    loss_theirs.backward()
    assert abs(loss_ours.item() - loss_theirs.item()) < FP32[device]
    their_parameters = dict(theirs.named_parameters())
    for name, parameter in ours.named_parameters():
        expected = their_parameters[hf.to_hf_name(name)].grad
        assert torch.allclose(parameter.grad, expected, atol=FP32[device], rtol=1e-4), f"gradient of {name}"


# ----------------------------------------------------------------------------------------
# The tokenizer: BertTokenizer's ids, exactly
# ----------------------------------------------------------------------------------------

# characters from every class BERT's basic tokenizer treats differently
ALPHABET = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") * 3
            + list(" \t\n\r  ,.;:!?'\"-()[]{}$^`~|<>@#%&*_+=/\\")
            + list("éñÅüçøÆßİǅﬁ") + ["e\u0301", "A\u030a"]  # accents, precomposed and combining
            + list("中文字符我爱日本語") + ["\u3400", "\u4db5", "\U00020000", "\U0002a700", "\uf900", "\U0002f800"]  # every CJK block
            + list("ひらがなカタカナ") + list("Ελληνικάкириллица") + list("عربي")
            + ["\x00", "\x07", "\x1b", "\u200b", "\ufeff", "\ue000", "\ufffd", "\u00a0", "\u3000", "Ａ", "😀"]
            + [" [MASK] ", "[MASK]", "[CLS]", "[mask]", " [SEP]"])
SENTENCES = ["Héllo wörld, naïve café — résumé!", "我爱自然语言处理。", "日本語とEnglish混在テキスト",
             "don't can't won't y'all", "$100 ^ `tick` ~tilde~ |pipe| <html> {brace}", "ＦＵＬＬ　ＷＩＤＴＨ",
             "pre[MASK]post and [MASK] alone [MASK][MASK]", "x" * 150 + " short", "e\u0301 combining", "a\x00b\x07c\u200bd\ufeffe"]


def random_text(rng):
    pieces = rng.choices(ALPHABET, k=rng.randint(1, 40))
    if rng.random() < 0.1:
        pieces.append("y" * rng.randint(90, 120))  # around the 100-character [UNK] limit
    return "".join(pieces)


def test_tokenizer_reproduces_bert_tokenizer_ids(tmp_path):
    rng = random.Random(0)
    training_text = SENTENCES + [random_text(rng) for _ in range(3000)] + [s for d in data.stdlib_corpus()[:300] for s in d]
    samples = SENTENCES + [random_text(rng) for _ in range(1500)]
    for lowercase in (True, False):
        vocab = train_tokenizer(training_text, 2000, lowercase)  # room for every character seen
        # transformers >= 5 keeps the Python tokenizer as BertTokenizerLegacy. It alone composes
        # accents first (NFC), which changes cased ids of decomposed text ("e" + U+0301); uncased
        # text is decomposed anyway, so there it must agree too.
        classes = [transformers.BertTokenizer] + ([transformers.BertTokenizerLegacy]
                                                  if lowercase and hasattr(transformers, "BertTokenizerLegacy") else [])
        folder = tmp_path / f"lower{lowercase}"
        folder.mkdir()
        vocab.save(folder / "vocab.txt")
        (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": lowercase}))
        ours = hf.read_tokenizer(str(folder))
        for tokenizer_class in classes:
            theirs = tokenizer_class.from_pretrained(str(folder))
            for text in samples:
                assert ours.encode(text) == theirs.encode(text, add_special_tokens=False), \
                    f"{tokenizer_class.__name__} lowercase={lowercase} {text!r}: {ours.tokenize(text)}"


# ----------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------


def test_fill_mask_prints_the_same_probabilities_as_transformers(tmp_path, cli, device):
    tokenizer = train_tokenizer(SENTENCES + [s for d in data.stdlib_corpus()[:400] for s in d], 700)
    config = Config(vocab_size=len(tokenizer), max_positions=64, **SHAPES[0])
    torch.manual_seed(0)
    theirs = perturb(transformers.BertForMaskedLM(hf_config(config)), 0).eval()
    with torch.no_grad():
        theirs.cls.predictions.bias.normal_(0, 3.0)  # a peaked distribution: top-k probabilities far from 1/|V|
    folder = tmp_path / "mlm"
    theirs.save_pretrained(folder)
    tokenizer.save(folder / "vocab.txt")
    text = "Return the [MASK] of the list, or None."
    code, stdout, stderr = cli("fill-mask", "--init", folder, text, "--top-k", 5, "--device", device)
    assert code == 0, stderr
    printed = [line.split("\t") for line in stdout.splitlines()]
    bert_tokenizer = transformers.BertTokenizer.from_pretrained(str(folder))
    encoded = bert_tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        logits = theirs(**encoded).logits[encoded["input_ids"] == bert_tokenizer.mask_token_id][0]
    best = logits.softmax(-1).topk(5)
    assert [token for token, _ in printed] == bert_tokenizer.convert_ids_to_tokens(best.indices.tolist())
    assert max(abs(float(p) - q) for (_, p), q in zip(printed, best.values.tolist())) < 1e-4
    assert best.values[0] > 0.05  # the check above is not trivially met by near-uniform probabilities


def test_finetune_starts_from_a_bert_folder_without_heads_and_export_round_trips(tmp_path, cli, device):
    config = Config(vocab_size=80, max_positions=64, **SHAPES[2])
    torch.manual_seed(0)
    folder = save_hf(transformers.BertModel(hf_config(config)), tmp_path / "bare")
    train_file = tmp_path / "train.tsv"
    train_file.write_text("".join(f"w{i} w{i + 1}\t{'ab'[i % 2]}\n" for i in range(20)))
    code, stdout, stderr = cli("finetune", "--init", folder, "--train", train_file, "--out", tmp_path / "run",
                               "--freeze", "head", "--epochs", 2, "--device", device)
    assert code == 0, stderr
    assert (stdout + stderr).count("initialised fresh") == 1
    code, _, stderr = cli("export", "--init", tmp_path / "run", "--out", tmp_path / "exported")
    assert code == 0, stderr
    exported = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path / "exported"))
    assert exported.config.id2label == {0: "a", 1: "b"}
    code, _, stderr = cli("export", "--init", tmp_path / "run", "--out", tmp_path / "exported")
    assert code == 2 and "not empty" in stderr  # nothing overwritten


@pytest.mark.parametrize("key, value", [("hidden_act", "gelu_new"), ("position_embedding_type", "relative_key"),
                                        ("is_decoder", True), ("tie_word_embeddings", False), ("model_type", "roberta")])
def test_configurations_ptft_cannot_compute_exactly_are_refused_in_one_line(tmp_path, key, value, cli):
    config = Config(vocab_size=60, max_positions=32, **SHAPES[2])
    folder = save_hf(transformers.BertModel(hf_config(config)), tmp_path / "bert")
    settings = json.loads((tmp_path / "bert" / "config.json").read_text())
    settings[key] = value
    (tmp_path / "bert" / "config.json").write_text(json.dumps(settings))
    code, _, stderr = cli("fill-mask", "--init", folder, "a [MASK]")
    assert code == 2
    assert stderr.count("\n") == 1 and key in stderr and "not supported" in stderr


def test_a_released_bert_tokenizes_and_fine_tunes_from_the_command_line(tmp_path, cli):
    """Opt-in (needs a download): PTFT_RELEASED_BERT=folder of a released BERT-architecture
    checkpoint, e.g. sentence-transformers' all-MiniLM-L6-v2 (no MLM head; BERT's uncased
    vocabulary); README says how to get it."""
    folder = os.environ.get("PTFT_RELEASED_BERT")
    if not folder:
        pytest.skip("set PTFT_RELEASED_BERT to a released BERT folder to run this check")
    # 1. its released vocabulary: our ids are BertTokenizer's
    ours, theirs = hf.read_tokenizer(folder), transformers.BertTokenizer.from_pretrained(folder)
    rng = random.Random(0)
    for text in SENTENCES + [random_text(rng) for _ in range(1000)] + [s for d in data.stdlib_corpus()[:2000] for s in d]:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False), text
    # 2. fill-mask on that vocabulary agrees with transformers (a random MLM head: the file has none)
    config = Config(vocab_size=len(ours), max_positions=64, **SHAPES[0])
    masked_lm = perturb(transformers.BertForMaskedLM(hf_config(config)), 0).eval()
    with torch.no_grad():
        masked_lm.cls.predictions.bias.normal_(0, 3.0)
    masked_lm.save_pretrained(tmp_path / "mlm")
    ours.save(tmp_path / "mlm" / "vocab.txt")
    text = "The capital of France is [MASK]."
    code, stdout, stderr = cli("fill-mask", "--init", tmp_path / "mlm", text, "--top-k", 5)
    assert code == 0, stderr
    encoded = theirs(text, return_tensors="pt")
    with torch.no_grad():
        best = masked_lm(**encoded).logits[encoded["input_ids"] == theirs.mask_token_id][0].softmax(-1).topk(5)
    printed = [line.split("\t") for line in stdout.splitlines()]
    assert [token for token, _ in printed] == theirs.convert_ids_to_tokens(best.indices.tolist())
    assert max(abs(float(p) - q) for (_, p), q in zip(printed, best.values.tolist())) < 1e-4
    # 3. the released weights fine-tune with a frozen encoder from the command line
    world = toyworld.toy_world(seed=0, num_documents=10)
    data.write_tsv(tmp_path / "train.tsv", world["train"][:64])
    data.write_tsv(tmp_path / "valid.tsv", world["valid"][:64])
    code, _, stderr = cli("finetune", "--init", folder, "--train", tmp_path / "train.tsv", "--valid", tmp_path / "valid.tsv",
                          "--out", tmp_path / "run", "--freeze", "head", "--epochs", 3)
    assert code == 0, stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["n"] == 64 and 0.0 <= metrics["accuracy"] <= 1.0


def test_pretraining_continues_from_a_bert_folder_with_its_weights_and_vocabulary(tmp_path, cli, device):
    config = Config(vocab_size=90, max_positions=64, **SHAPES[2])
    torch.manual_seed(0)
    folder = save_hf(transformers.BertForMaskedLM(hf_config(config)), tmp_path / "mlm")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join("\n".join(f"w{(d * 7 + s) % 80} w{s} w{d}" for s in range(4)) for d in range(30)) + "\n")
    code, _, stderr = cli("pretrain", "--init", folder, "--corpus", corpus, "--out", tmp_path / "more",
                          "--steps", 2, "--batch-size", 4, "--max-length", 32, "--lr", 1e-12, "--dropout", 0, "--device", device)
    assert code == 0, stderr
    continued = torch.load(tmp_path / "more" / "checkpoint.pt", weights_only=True)
    initial = load_checkpoint(folder)
    assert continued["vocab"] == initial["vocab"] and continued["config"]["hidden_size"] == config.hidden_size
    # at a learning rate of 1e-12, two steps leave every weight where the BERT folder put it
    for name, value in initial["model"].items():
        assert torch.allclose(continued["model"][name], value, atol=1e-6), name
