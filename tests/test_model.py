"""model.py as a specification: E4 written out, BERT's encoder, its heads."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import model
from common import IGNORE_INDEX
from model import Classifier, Config, Encoder, Layer, PreTrainingModel, make_config, mlm_loss
from tokenizer import SPECIAL_TOKENS, Tokenizer


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
        _, loss_mlm, loss_nsp = model(input_ids, segment_ids, attention_mask, mlm_labels, nsp_labels)
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


def test_explicit_and_fused_attention_agree_in_outputs_and_gradients(device):
    config = small_config(dropout=0.0, attention_dropout=0.0)
    for seed in range(3):
        torch.manual_seed(seed)
        explicit = PreTrainingModel(config).to(device)
        fused = PreTrainingModel(replace(config, attention="sdpa")).to(device)
        fused.load_state_dict(explicit.state_dict())
        batch = [tensor.to(device) for tensor in random_batch(config, seed=seed)]
        losses = [model(*batch)[0] for model in (explicit, fused)]
        assert torch.allclose(losses[0], losses[1], atol=1e-5)
        for loss in losses:
            loss.backward()
        for (name, a), (_, b) in zip(explicit.named_parameters(), fused.named_parameters()):
            assert torch.allclose(a.grad, b.grad, atol=1e-5), name


def test_sparse_prediction_equals_dense_prediction():
    config = small_config(dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    model = PreTrainingModel(config).double()
    for seed in range(5):
        batch = random_batch(config, seed=seed)
        sparse = model(*batch, sparse=True)[0]
        dense = model(*batch, sparse=False)[0]
        assert torch.allclose(sparse, dense, atol=1e-12)


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
    monkeypatch.setattr(model.Dropout, "forward", lambda self, x: x * (1 - self.p) if self.training else x)
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
    model(input_ids, segment_ids, attention_mask, mlm_labels, nsp_labels)[0].backward()
    big_batch = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    num_masked_total = int((mlm_labels != IGNORE_INDEX).sum())
    for part in (slice(0, 2), slice(2, 6)):  # unequal micro-batches; NSP weighted by its share of rows
        loss_mlm = model(input_ids[part], segment_ids[part], attention_mask[part], mlm_labels[part],
                         num_masked_total=num_masked_total)[1]
        _, _, loss_nsp = model(input_ids[part], segment_ids[part], attention_mask[part], mlm_labels[part], nsp_labels[part])
        (loss_mlm + loss_nsp * (part.stop - part.start) / 6).backward()
    for accumulated, reference in zip((p.grad for p in model.parameters()), big_batch):
        assert torch.allclose(accumulated, reference, atol=1e-10)


def test_dropout_keeps_one_minus_p_scales_the_rest_and_is_the_identity_in_eval():
    torch.manual_seed(0)
    for p in (0.1, 0.5, 0.9):
        dropout = model.Dropout(p)
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.ones(1001, 999, dtype=dtype, requires_grad=True)  # an odd count: the last 64-bit draw is partial
            y = dropout(x)
            kept = y != 0
            count = x.numel()
            # the kept fraction is 1 - p within 5 standard deviations of a binomial
            assert abs(kept.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / count)
            assert torch.allclose(y[kept].float(), torch.tensor(1 / (1 - p)), rtol=1e-2)
            y.sum().backward()  # the gradient flows through the kept entries only, scaled alike
            assert torch.equal(x.grad != 0, kept)
            # masks of neighbouring entries are independent: pairs (i, i+1) both kept ~ (1-p)^2
            flat = kept.flatten().float()
            assert abs((flat[:-1] * flat[1:]).mean().item() - (1 - p) ** 2) < 5 * math.sqrt((1 - p) ** 2 / count)
        dropout.eval()
        x = torch.randn(7, 5)
        assert dropout(x) is x


def test_training_with_attention_dropout_runs_on_every_device(device):
    # on a GPU, SDPA draws the attention dropout inside its kernel; on the CPU the written-out path does
    config = small_config(dropout=0.1, attention_dropout=0.1)
    torch.manual_seed(0)
    model = PreTrainingModel(replace(config, attention="sdpa")).to(device).train()
    batch = [tensor.to(device) for tensor in random_batch(config)]
    losses = [model(*batch)[0] for _ in range(2)]
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


def test_a_low_rank_update_starts_as_the_frozen_layer_and_merges_into_it_exactly():
    config = small_config(dropout=0.0, attention_dropout=0.0)
    for seed in range(3):
        torch.manual_seed(seed)
        model = Classifier(config, num_labels=3).eval()
        batch = random_batch(config, seed=seed)[:3]
        with torch.no_grad():
            before = model.encoder(*batch)[0]
            model.add_low_rank_updates(rank=4)
            assert torch.equal(model.encoder(*batch)[0], before)  # B = 0: nothing changes
            for layer in model.encoder.layers:  # as after training: B A != 0
                layer.attention.query.B.normal_(0, 0.1)
                layer.attention.value.B.normal_(0, 0.1)
            updated = model.encoder(*batch)[0], model(*batch)
            model.merge_low_rank_updates()
            merged = model.encoder(*batch)[0], model(*batch)
        assert not torch.allclose(updated[0], before, atol=1e-2)
        assert torch.allclose(merged[0], updated[0], atol=1e-5) and torch.allclose(merged[1], updated[1], atol=1e-6)
        assert set(model.state_dict()) == set(Classifier(config, num_labels=3).state_dict())  # BERT's names again


def test_the_fixed_shape_mlm_prediction_equals_the_boolean_index_in_loss_and_gradient():
    # model.gather_fixed_predictions (the GPU's speed device) against mlm_scores' boolean index:
    # random masks, padded rows, rows with nothing masked, P from exactly-full to generous
    generator = torch.Generator().manual_seed(0)
    config = make_config("tiny", vocab_size=60, max_positions=24, hidden_size=32, num_heads=2, intermediate_size=64,
                         dropout=0.0, attention_dropout=0.0)
    model = PreTrainingModel(config)
    for trial in range(20):
        batch, length = int(torch.randint(1, 6, (1,), generator=generator)), int(torch.randint(4, 24, (1,), generator=generator))
        input_ids = torch.randint(5, 60, (batch, length), generator=generator)
        selected = torch.rand(batch, length, generator=generator) < 0.3
        selected[0] = False if trial % 4 == 0 else selected[0]  # sometimes a row with no masked token
        labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        mask = torch.arange(length)[None, :] < torch.randint(1, length + 1, (batch, 1), generator=generator)
        largest = int(selected.sum(dim=1).max())
        losses, gradients = [], []
        for max_predictions in (None, max(1, largest), largest + 3):
            model.zero_grad()
            loss = model(input_ids, None, mask, labels, num_masked_total=max(1, int(selected.sum())),
                         max_predictions=max_predictions)[1]
            loss.backward()
            losses.append(loss.detach())
            gradients.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        for loss, gradient in zip(losses[1:], gradients[1:]):
            assert torch.allclose(loss, losses[0], atol=1e-6), trial
            assert torch.allclose(gradient, gradients[0], atol=1e-6), trial


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


def test_fused_qkv_projection_equals_the_three_projections_and_their_gradients():
    from model import fused_projections
    torch.manual_seed(0)
    attention = Layer(make_config("tiny", vocab_size=50, max_positions=16, hidden_size=48, num_heads=3)).attention
    x = torch.randn(3, 7, 48, requires_grad=True)
    separate = [attention.query(x), attention.key(x), attention.value(x)]
    weights = torch.randn(3, 3, 7, 48)
    (sum((w * t).sum() for w, t in zip(weights, separate))).backward()
    projections = [p for m in (attention.query, attention.key, attention.value) for p in m.parameters()]
    expected = [p.grad.clone() for p in projections] + [x.grad.clone()]
    attention.zero_grad()
    x.grad = None
    fused = fused_projections(attention, x)
    for a, b in zip(fused, separate):
        assert torch.allclose(a, b, atol=1e-6)
    (sum((w * t).sum() for w, t in zip(weights, fused))).backward()
    for a, b in zip([p.grad for p in projections] + [x.grad], expected):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("attention", ["explicit", "sdpa"])
def test_no_mask_is_the_same_as_a_mask_of_all_real_tokens(attention):
    # on a GPU pretrain drops the mask of a batch without padding (SDPA may then use FlashAttention)
    torch.manual_seed(0)
    encoder = Encoder(make_config("tiny", vocab_size=50, max_positions=16, attention=attention)).eval()
    input_ids = torch.randint(0, 50, (3, 16))
    with torch.no_grad():
        without = encoder(input_ids, None, None)
        with_mask = encoder(input_ids, None, torch.ones(3, 16, dtype=torch.bool))
    for a, b in zip(without, with_mask):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("attention", ["explicit", "sdpa"])
def test_computing_on_real_tokens_only_gives_the_reading_paths_outputs_loss_and_gradients(attention, device):
    # model.Unpadded (the speed device that skips padding in the position-wise layers) against the
    # reading path: random lengths (one row unpadded, others down to 1 token), both attention
    # paths, with and without the fixed-shape MLM prediction
    generator = torch.Generator().manual_seed(1)
    config = make_config("tiny", vocab_size=60, max_positions=24, hidden_size=32, num_heads=2, intermediate_size=64,
                         dropout=0.0, attention_dropout=0.0, attention=attention)
    torch.manual_seed(0)
    network = PreTrainingModel(config).to(device)
    for trial in range(12):
        batch, length = int(torch.randint(2, 7, (1,), generator=generator)), int(torch.randint(4, 24, (1,), generator=generator))
        input_ids = torch.randint(5, 60, (batch, length), generator=generator)
        lengths = torch.randint(1, length + 1, (batch,), generator=generator)
        lengths[0] = length
        mask = torch.arange(length)[None, :] < lengths[:, None]
        selected = (torch.rand(batch, length, generator=generator) < 0.3) & mask
        selected[:, 0] = True
        labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        nsp = torch.randint(0, 2, (batch,), generator=generator)
        tensors = [t.to(device) for t in (input_ids, mask, labels, nsp)]
        results = []
        for unpadded in (None, model.Unpadded(mask, device)):
            network.zero_grad()
            sequence_output, pooled = network.encoder(tensors[0], None, tensors[1], unpadded)
            loss = network(tensors[0], None, tensors[1], tensors[2], tensors[3], unpadded=unpadded,
                           max_predictions=int(selected.sum(1).max()) if trial % 2 else None)[0]
            loss.backward()
            gradient = torch.cat([p.grad.flatten() for p in network.parameters() if p.grad is not None])
            results.append((sequence_output[tensors[1]], pooled, loss, gradient))
        for reading, unpadded in zip(*results):  # (a GPU may pick other matmul kernels for N rows than for B x T)
            assert torch.allclose(reading, unpadded, atol=1e-5, rtol=1e-4), trial


def test_computing_on_real_tokens_only_leaves_zeros_at_padding_and_pads_back_exactly():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    unpadded = model.Unpadded(mask)
    x = torch.randn(3, 4, 5)
    flat = unpadded.unpad(x)                                   # (N, H): the 7 real tokens, in order
    assert flat.shape == (7, 5) and torch.equal(flat, x[mask])
    back = unpadded.pad(flat)
    assert torch.equal(back[mask], x[mask]) and torch.equal(back[~mask], torch.zeros(5, 5))


def test_scores_over_a_padded_vocabulary_equal_the_plain_scores_and_gradients():
    # model.scores_over_padded_vocabulary (on a GPU the MLM head's decoder rows are padded to a
    # multiple of 64 inside the call) against transformed E^T + b, for sizes on and off the multiple
    from model import scores_over_padded_vocabulary
    generator = torch.Generator().manual_seed(0)
    for vocab_size in (1, 7, 63, 64, 65, 130, 30522 // 16):
        for multiple in (8, 64):
            transformed = torch.randn(9, 16, generator=generator, requires_grad=True)
            embedding = torch.randn(vocab_size, 16, generator=generator, requires_grad=True)
            bias = torch.randn(vocab_size, generator=generator, requires_grad=True)
            weights = torch.randn(9, vocab_size, generator=generator)
            results = []
            for scores in (transformed @ embedding.t() + bias,
                           scores_over_padded_vocabulary(transformed, embedding, bias, multiple)):
                gradients = torch.autograd.grad((weights * scores).sum(), (transformed, embedding, bias))
                results.append((scores, *gradients))
            assert results[1][0].shape == (9, vocab_size)
            for plain, padded in zip(*results):
                assert plain.shape == padded.shape and torch.allclose(plain, padded, atol=1e-5), (vocab_size, multiple)


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
