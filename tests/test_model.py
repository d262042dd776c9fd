"""model.py as a specification: E4 written out, BERT's encoder, its heads."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import fast
from common import IGNORE_INDEX
from conftest import pretraining_losses, random_batch, small_config
from model import Classifier, Config, Encoder, PreTrainingModel, make_config, mlm_loss
from tokenizer import SPECIAL_TOKENS, Tokenizer


@pytest.mark.parametrize("num_masked,vocab", [(1, 2), (7, 11), (64, 1000), (300, 8192)])
def test_written_out_e4_equals_cross_entropy(num_masked, vocab):
    for seed in range(5):
        generator = torch.Generator().manual_seed(seed)
        scores = torch.randn(num_masked, vocab, generator=generator, dtype=torch.float64) * 5
        targets = torch.randint(0, vocab, (num_masked,), generator=generator)
        assert torch.allclose(mlm_loss(scores, targets).double(), F.cross_entropy(scores, targets).double(), atol=1e-6)


def test_e4_normalised_by_all_masked_tokens_sums_to_the_big_batch_loss():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(50, 30, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 30, (50,), generator=generator)
    parts = [slice(0, 3), slice(3, 40), slice(40, 50)]  # very unequal masked counts
    summed = sum(mlm_loss(scores[p], targets[p], num_masked_total=50) for p in parts)
    assert torch.allclose(summed, F.cross_entropy(scores, targets), atol=1e-12)


def test_loss_at_initialisation_is_about_ln_vocab():
    torch.manual_seed(0)
    config = make_config("tiny", vocab_size=2048, max_positions=64)
    model = PreTrainingModel(config).eval()
    input_ids, segment_ids, attention_mask, mlm_labels, nsp_labels = random_batch(config, 8, 40)
    with torch.no_grad():
        _, loss_mlm, loss_nsp = pretraining_losses(model, input_ids, segment_ids, attention_mask, mlm_labels, nsp_labels)
    assert abs(loss_mlm.item() - math.log(2048)) < 0.3
    assert abs(loss_nsp.item() - math.log(2)) < 0.1


def test_padding_does_not_change_the_outputs_at_real_positions():
    config = small_config(dropout=0.0, attention_dropout=0.0)
    for attention in ("explicit", "sdpa"):
        torch.manual_seed(1)
        encoder = Encoder(replace(config, attention=attention)).double().eval()
        for seed in range(10):
            generator = torch.Generator().manual_seed(seed)
            length = int(torch.randint(2, 12, (1,), generator=generator))
            ids = torch.randint(5, config.vocab_size, (1, length), generator=generator)
            segments = torch.randint(0, 2, (1, length), generator=generator)
            alone, pooled_alone = encoder(ids, segments)
            extra = int(torch.randint(1, 10, (1,), generator=generator))
            padded_ids = torch.cat([ids, torch.randint(0, config.vocab_size, (1, extra), generator=generator)], 1)
            padded_segments = torch.cat([segments, torch.ones(1, extra, dtype=torch.long)], 1)
            mask = torch.arange(length + extra)[None] < length
            padded, pooled_padded = encoder(padded_ids, padded_segments, mask)
            assert torch.allclose(alone, padded[:, :length], atol=1e-10)
            assert torch.allclose(pooled_alone, pooled_padded, atol=1e-10)



def test_scoring_the_masked_positions_alone_equals_scoring_every_position_then_selecting():
    config = small_config(dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    model = PreTrainingModel(config).double()
    for seed in range(5):
        input_ids, segment_ids, attention_mask, mlm_labels, _ = random_batch(config, seed=seed)
        sequence_output, _ = model.encoder(input_ids, segment_ids, attention_mask)
        every_position = model.mlm_head(sequence_output, model.encoder.embeddings.token.weight)  # (B, T, V)
        sparse = model.mlm_scores(sequence_output, mlm_labels)                                    # (N, V)
        assert torch.allclose(sparse, every_position[mlm_labels != IGNORE_INDEX], atol=1e-12)


def test_post_layer_norm_every_layer_output_is_normalised():
    # post-LN (BERT): each layer ends with a LayerNorm, so with the initial LayerNorm weights
    # (1, 0) every position of the output has mean 0 and variance 1.
    config = small_config(dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    encoder = Encoder(config).eval()
    ids, segments, mask, _, _ = random_batch(config)
    output, _ = encoder(ids, segments, mask)
    assert torch.allclose(output.mean(-1), torch.zeros(output.shape[:2]), atol=1e-5)
    assert torch.allclose(output.var(-1, unbiased=False), torch.ones(output.shape[:2]), atol=1e-3)


def test_mlm_decoder_is_tied_to_the_token_embedding():
    config = small_config(dropout=0.0, attention_dropout=0.0)
    model = PreTrainingModel(config)
    names = [name for name, _ in model.named_parameters()]
    assert not any("decoder" in name for name in names)  # one matrix, used twice
    with torch.no_grad():
        model.encoder.embeddings.token.weight[7].add_(1.0)
    hidden = torch.randn(3, config.hidden_size)
    scores = model.mlm_head(hidden, model.encoder.embeddings.token.weight)
    transformed = model.mlm_head.layer_norm(F.gelu(model.mlm_head.dense(hidden)))
    assert torch.allclose(scores[:, 7], transformed @ model.encoder.embeddings.token.weight[7] + model.mlm_head.bias[7], atol=1e-5)


def test_configs_refuse_impossible_shapes():
    with pytest.raises(ValueError, match="divisible"):
        Config(hidden_size=100, num_heads=3)
    with pytest.raises(ValueError, match="unknown config"):
        make_config("huge")
    assert make_config("small").num_layers == 4 and make_config("base").hidden_size == 768


def test_classifier_scores_are_one_linear_map_of_the_pooled_vector_after_dropout(monkeypatch):
    # B4: f_phi(x) = W dropout(pooled) + b, one score per label; dropout made deterministic, x -> (1 - p) x
    monkeypatch.setattr(fast.Dropout, "forward", lambda self, x: x * (1 - self.p) if self.training else x)
    config = small_config(dropout=0.2)
    classifier = Classifier(config, num_labels=5).train()
    ids, segments, mask, _, _ = random_batch(config)
    scores = classifier(ids, segments, mask)
    assert scores.shape == (ids.shape[0], 5)
    _, pooled = classifier.encoder(ids, segments, mask)
    assert torch.allclose(scores, classifier.classifier(0.8 * pooled), atol=1e-6)


def test_accumulated_gradients_equal_one_big_batch_when_masked_counts_differ():
    config = small_config(dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    model = PreTrainingModel(config).double()
    input_ids, segment_ids, attention_mask, mlm_labels, nsp_labels = random_batch(config, batch=6, length=17)
    mlm_labels[:2, 2:] = IGNORE_INDEX  # the first micro-batch has far fewer masked tokens
    pretraining_losses(model, input_ids, segment_ids, attention_mask, mlm_labels, nsp_labels)[0].backward()
    big_batch = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    num_masked_total = int((mlm_labels != IGNORE_INDEX).sum())
    for part in (slice(0, 2), slice(2, 6)):  # unequal micro-batches; NSP weighted by its share of rows
        loss_mlm = pretraining_losses(model, input_ids[part], segment_ids[part], attention_mask[part], mlm_labels[part],
                         num_masked_total=num_masked_total)[1]
        _, _, loss_nsp = pretraining_losses(model, input_ids[part], segment_ids[part], attention_mask[part], mlm_labels[part], nsp_labels[part])
        (loss_mlm + loss_nsp * (part.stop - part.start) / 6).backward()
    for accumulated, reference in zip((p.grad for p in model.parameters()), big_batch):
        assert torch.allclose(accumulated, reference, atol=1e-10)



def test_training_with_attention_dropout_runs_on_every_device(device):
    # on a GPU, SDPA draws the attention dropout inside its kernel; on the CPU the written-out path does
    config = small_config(dropout=0.1, attention_dropout=0.1)
    torch.manual_seed(0)
    model = PreTrainingModel(replace(config, attention="sdpa")).to(device).train()
    batch = [tensor.to(device) for tensor in random_batch(config)]
    losses = [pretraining_losses(model, *batch)[0] for _ in range(2)]
    assert losses[0].item() != losses[1].item()  # dropout: two draws, two losses
    losses[0].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_mean_pooling_is_the_masked_mean_of_the_last_layer_and_padding_never_changes_it():
    config = small_config(dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    model = Classifier(config, num_labels=4, pool="mean").double().eval()
    assert not any(p.requires_grad for p in model.encoder.pooler.parameters())  # not on the path
    for seed in range(10):
        input_ids, segment_ids, attention_mask, _, _ = random_batch(config, seed=seed)
        with torch.no_grad():
            sequence_output, _ = model.encoder(input_ids, segment_ids, attention_mask)
            by_hand = torch.stack([sequence_output[i, attention_mask[i]].mean(0) for i in range(len(input_ids))])
            assert torch.allclose(model(input_ids, segment_ids, attention_mask), model.classifier(by_hand), atol=1e-10)
            # more padding, of any token, changes nothing
            extra = torch.randint(0, config.vocab_size, (len(input_ids), 5))
            padded = model(torch.cat([input_ids, extra], 1), torch.cat([segment_ids, torch.ones_like(extra)], 1),
                           torch.cat([attention_mask, torch.zeros_like(extra, dtype=torch.bool)], 1))
            assert torch.allclose(padded, model(input_ids, segment_ids, attention_mask), atol=1e-10)
    with pytest.raises(ValueError, match="pool"):
        Classifier(config, num_labels=2, pool="max")



def test_max_predictions_bounds_the_masked_count_of_every_sequence_b1_draws():
    tokenizer = Tokenizer(SPECIAL_TOKENS + [f"w{i}" for i in range(50)])
    rng = np.random.default_rng(0)
    for probability in (0.05, 0.15, 0.3, 0.5):
        rule = data.MaskingRule(probability)
        for length in (8, 13, 48, 128):
            ids = rng.integers(len(SPECIAL_TOKENS), len(tokenizer), (64, length))
            ids[:, 0], ids[:, -1] = tokenizer.cls_id, tokenizer.sep_id
            for row, real in enumerate(rng.integers(3, length + 1, 64)):  # padded rows of every length
                ids[row, real - 1], ids[row, real:] = tokenizer.sep_id, tokenizer.pad_id
            _, labels = data.mask_tokens(ids, tokenizer, rng, rule)
            counts = (labels != IGNORE_INDEX).sum(axis=1)
            assert counts.max() <= rule.max_predictions(length), (probability, length)
            full = (ids != tokenizer.pad_id).all(axis=1)
            if full.any():  # and it is reached by a full-length sequence: not a loose bound
                assert counts[full].max() == rule.max_predictions(length)



@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_a_sentences_class_scores_do_not_depend_on_the_padded_batch_it_is_in(pool, device):
    # a padded batch goes through model.Unpadded (real tokens only); each sentence alone, unpadded,
    # takes the reading path: the scores must agree
    generator = torch.Generator().manual_seed(2)
    config = make_config("tiny", vocab_size=60, max_positions=24, hidden_size=32, num_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    classifier = Classifier(config, num_labels=5, pool=pool).to(device).eval()
    for trial in range(8):
        batch, length = int(torch.randint(2, 7, (1,), generator=generator)), int(torch.randint(3, 24, (1,), generator=generator))
        input_ids = torch.randint(5, 60, (batch, length), generator=generator)
        lengths = torch.randint(2, length + 1, (batch,), generator=generator)
        mask = torch.arange(length)[None, :] < lengths[:, None]
        with torch.no_grad():
            together = classifier(input_ids.to(device), None, mask.to(device))
            alone = torch.cat([classifier(input_ids[i: i + 1, : int(lengths[i])].to(device)) for i in range(batch)])
        assert torch.allclose(together, alone, atol=1e-5, rtol=1e-4), trial
