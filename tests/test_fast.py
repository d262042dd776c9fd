"""fast.py as a specification: every speed device gives the reading path's numbers -- in outputs,
losses and gradients -- on random inputs: random lengths and padding, both attention paths."""

import math
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

import data
import experiments
import fast
import ptft
import schedule
import toyworld
import train
from common import IGNORE_INDEX, InputError
from conftest import pretraining_losses, quiet, random_batch, small_config
from model import Encoder, Layer, PreTrainingModel, make_config
from options import DemoOptions, PretrainOptions
from tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer


def test_explicit_and_fused_attention_agree_in_outputs_and_gradients(device):
    config = small_config(dropout=0.0, attention_dropout=0.0)
    for seed in range(3):
        torch.manual_seed(seed)
        explicit = PreTrainingModel(config).to(device)
        fused = PreTrainingModel(replace(config, attention="sdpa")).to(device)
        fused.load_state_dict(explicit.state_dict())
        batch = [tensor.to(device) for tensor in random_batch(config, seed=seed)]
        losses = [pretraining_losses(model, *batch)[0] for model in (explicit, fused)]
        assert torch.allclose(losses[0], losses[1], atol=1e-5)
        for loss in losses:
            loss.backward()
        for (name, a), (_, b) in zip(explicit.named_parameters(), fused.named_parameters()):
            assert torch.allclose(a.grad, b.grad, atol=1e-5), name


def test_dropout_keeps_one_minus_p_scales_the_rest_and_is_the_identity_in_eval():
    torch.manual_seed(0)
    for p in (0.1, 0.5, 0.9):
        dropout = fast.Dropout(p)
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


def test_the_fixed_shape_mlm_prediction_equals_the_boolean_index_in_loss_and_gradient():
    # fast.gather_fixed_predictions (the GPU's speed device) against mlm_scores' boolean index:
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
            speed = None if max_predictions is None else fast.Speed(max_predictions=max_predictions)
            loss = pretraining_losses(model, input_ids, None, mask, labels, num_masked_total=max(1, int(selected.sum())), speed=speed)[1]
            loss.backward()
            losses.append(loss.detach())
            gradients.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        for loss, gradient in zip(losses[1:], gradients[1:]):
            assert torch.allclose(loss, losses[0], atol=1e-6), trial
            assert torch.allclose(gradient, gradients[0], atol=1e-6), trial


def test_fused_qkv_projection_equals_the_three_projections_and_their_gradients():
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
    fused = fast.fused_projections(attention, x)
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
    # fast.Unpadded (the speed device that skips padding in the position-wise layers) against the
    # reading path: random lengths (one row unpadded, others down to 1 token), both attention
    # paths, with and without the fixed-shape MLM prediction and the padded vocabulary
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
        for unpadded in (None, fast.Unpadded(mask, device)):
            network.zero_grad()
            if unpadded is None:
                sequence_output, pooled = network.encoder(tensors[0], None, tensors[1])
                speed = None
            else:
                sequence_output, pooled = fast.encode_unpadded(network.encoder, tensors[0], None, tensors[1], unpadded)
                speed = fast.Speed(unpadded=unpadded, max_predictions=int(selected.sum(1).max()) if trial % 2 else None,
                                   padded_vocabulary=trial % 3 == 0)
            loss = pretraining_losses(network, tensors[0], None, tensors[1], tensors[2], tensors[3], speed=speed)[0]
            loss.backward()
            gradient = torch.cat([p.grad.flatten() for p in network.parameters() if p.grad is not None])
            results.append((sequence_output[tensors[1]], pooled, loss, gradient))
        for reading, unpadded in zip(*results):  # (a GPU may pick other matmul kernels for N rows than for B x T)
            assert torch.allclose(reading, unpadded, atol=1e-5, rtol=1e-4), trial


def test_computing_on_real_tokens_only_leaves_zeros_at_padding_and_pads_back_exactly():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    unpadded = fast.Unpadded(mask)
    x = torch.randn(3, 4, 5)
    flat = unpadded.unpad(x)                                   # (N, H): the 7 real tokens, in order
    assert flat.shape == (7, 5) and torch.equal(flat, x[mask])
    back = unpadded.pad(flat)
    assert torch.equal(back[mask], x[mask]) and torch.equal(back[~mask], torch.zeros(5, 5))


def test_unpadding_and_padding_back_are_gathers_with_index_select_and_index_copys_values_and_gradients():
    # fast.GatherRows in both directions (no scatter: deterministic without atomics) against torch's
    # index_select / index_copy, on random masks -- all real, all padding but one token, and between
    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        batch, length = int(torch.randint(1, 6, (1,), generator=generator)), int(torch.randint(1, 9, (1,), generator=generator))
        mask = torch.rand(batch, length, generator=generator) < [1.0, 0.5, 0.05][trial % 3]
        mask[0, 0] = True
        unpadded, index = fast.Unpadded(mask), mask.flatten().nonzero().squeeze(1)
        x = torch.randn(batch, length, 3, generator=generator, dtype=torch.float64, requires_grad=True)
        upstream = torch.randn(len(index), 3, generator=generator, dtype=torch.float64)
        (unpadded.unpad(x) * upstream).sum().backward()
        expected = torch.zeros_like(x).flatten(0, 1).index_add(0, index, upstream).view_as(x)
        assert torch.equal(x.grad, expected)
        flat = torch.randn(len(index), 3, generator=generator, dtype=torch.float64, requires_grad=True)
        upstream = torch.randn(batch, length, 3, generator=generator, dtype=torch.float64)
        padded = unpadded.pad(flat)
        assert torch.equal(padded.flatten(0, 1), torch.zeros(batch * length, 3, dtype=torch.float64).index_copy(0, index, flat))
        (padded * upstream).sum().backward()
        assert torch.equal(flat.grad, upstream.flatten(0, 1).index_select(0, index))
    assert torch.autograd.gradcheck(lambda v: unpadded.pad(unpadded.unpad(v)), (x.detach().requires_grad_(),))


def test_scores_over_a_padded_vocabulary_equal_the_plain_scores_and_gradients():
    # fast.scores_over_padded_vocabulary (on a GPU the MLM head's decoder rows are padded to a
    # multiple of 64 inside the call) against MLMHead's transformed E^T + b, for sizes on and off
    # the multiple
    from model import MLMHead
    generator = torch.Generator().manual_seed(0)
    for vocab_size in (1, 7, 63, 64, 65, 130, 30522 // 16):
        for multiple in (8, 64):
            torch.manual_seed(vocab_size)
            head = MLMHead(make_config("tiny", vocab_size=vocab_size, hidden_size=16, num_heads=2))
            torch.nn.init.normal_(head.bias)
            hidden = torch.randn(9, 16, generator=generator, requires_grad=True)
            embedding = torch.randn(vocab_size, 16, generator=generator, requires_grad=True)
            weights = torch.randn(9, vocab_size, generator=generator)
            results = []
            for scores in (head(hidden, embedding), fast.scores_over_padded_vocabulary(head, hidden, embedding, multiple)):
                gradients = torch.autograd.grad((weights * scores).sum(), (hidden, embedding, head.bias))
                results.append((scores, *gradients))
            assert results[1][0].shape == (9, vocab_size)
            for plain, padded in zip(*results):
                assert plain.shape == padded.shape and torch.allclose(plain, padded, atol=1e-5), (vocab_size, multiple)


def test_batches_built_in_the_background_are_the_batches_built_in_the_loop_with_their_data_states(small_world):
    # fast.StepBatches (train.step_batches): the GPU's background thread must hand the loop exactly what building each
    # step's batches in the loop would, with the data generator's state before each step's draw
    from types import SimpleNamespace
    tokenizer = Tokenizer.load(os.path.join(small_world["pre"], "vocab.txt"))
    encoded = data.encode_documents(tokenizer, data.read_corpus([small_world["corpus"]]))
    options = PretrainOptions(batch_size=4, accumulation=2, max_length=24)
    streams = []
    for background in (False, True):
        run = SimpleNamespace(options=options, tokenizer=tokenizer, data_rng=np.random.default_rng(3), device=torch.device("cpu"))
        batches, drawn = train.step_batches(run, encoded, background=background), []
        for step in range(5):
            if step == 2:
                peeked = batches.next_state()
            drawn.append(batches.next())
        batches.close()
        streams.append((drawn, peeked))
    (in_loop, peeked_in_loop), (in_background, peeked_in_background) = streams
    assert peeked_in_loop == peeked_in_background == in_loop[2][0]
    for (state, micro_batches), (state_b, micro_batches_b) in zip(in_loop, in_background):
        assert state == state_b and len(micro_batches) == len(micro_batches_b) == 2
        for a, b in zip(micro_batches, micro_batches_b):
            assert all(np.array_equal(a[key], np.asarray(b[key])) for key in a)
    # the state recorded for a step redraws that step's batches
    replay = SimpleNamespace(options=options, tokenizer=tokenizer, data_rng=np.random.default_rng(), device=torch.device("cpu"))
    replay.data_rng.bit_generator.state = in_loop[3][0]
    assert all(np.array_equal(a[key], b[key]) for a, b in zip(train.step_batches(replay, encoded, False).next()[1],
                                                                in_loop[3][1]) for key in a)


def test_throughput_counts_the_steady_rate_after_the_first_steps_apart(monkeypatch):
    # fast.Throughput with a fake clock: 3 warm-up steps of 10 s each (compilation), then 1 s a
    # step, and 20 s of evaluation between steps that the steady rate leaves out
    clock = [100.0]
    monkeypatch.setattr(fast.time, "time", lambda: clock[0])
    throughput = fast.Throughput(timing_warmup_steps=3)
    for step in range(8):
        seconds = 10.0 if step < 3 else 1.0
        clock[0] += seconds
        throughput.add(500, seconds)
        if step == 5:
            clock[0] += 20.0  # a held-out evaluation
    metrics = throughput.metrics()
    assert metrics["seconds"] == 55.0 and metrics["tokens_per_second"] == 8 * 500 / 55.0
    assert metrics["timing_warmup_seconds"] == 30.0 and metrics["steady_tokens_per_second"] == 500.0
    assert throughput.share(11.0) == 0.2
    assert metrics["tokens_per_step"] == 500.0  # every step counted, warm-up included
    assert "steady_tokens_per_second" not in fast.Throughput(timing_warmup_steps=3).metrics()  # nothing after the warm-up yet


def test_pretraining_computes_on_real_tokens_only_exactly_when_a_batch_has_padding(small_world, tmp_path, monkeypatch):
    # pretraining_step hands fast.Unpadded to the model for each padded micro-batch (and the
    # model uses it), never for one without padding
    built, used, seen = [], [], []

    class Recording(fast.Unpadded):
        def __init__(self, mask, device=None):
            super().__init__(mask, device)
            built.append(int(np.asarray(mask).sum()))

        def unpad(self, x):
            used.append(self)
            return super().unpad(x)

    step = train.pretraining_step

    def recording_step(run, training_model, micro_batches):
        seen.append([np.asarray(b["attention_mask"]) for b in micro_batches])
        return step(run, training_model, micro_batches)

    monkeypatch.setattr(fast, "Unpadded", Recording)
    monkeypatch.setattr(train, "pretraining_step", recording_step)
    recipe = PretrainOptions(corpus=[small_world["corpus"]], steps=4, batch_size=8, max_length=64, vocab_size=300,
                             accumulation=2, save_every=0, device="cpu")
    metrics = train.pretrain(str(tmp_path / "run"), recipe, log=quiet, progress=False)
    masks = [mask for step_masks in seen for mask in step_masks]
    padded = [int(mask.sum()) for mask in masks if not mask.all()]
    assert len(masks) == 8 and padded and built == padded and len(set(map(id, used))) == len(padded)
    assert metrics["tokens_per_second"] > 0


def test_cpu_training_in_bf16_takes_the_written_out_attention():
    # fast.fused_attention_applies: the CPU's SDPA backward is slow in bf16 (docs/performance.md)
    fused_attention_applies = fast.fused_attention_applies
    attention = Layer(make_config("tiny", vocab_size=50, max_positions=16, attention="sdpa", attention_dropout=0.0)).attention
    x = torch.zeros(2, 4, 128)
    assert fused_attention_applies(attention.train(), x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused_attention_applies(attention.train(), x)
        assert fused_attention_applies(attention.eval(), x)  # inference keeps the kernel
    attention.attention_dropout.p = 0.1
    assert not fused_attention_applies(attention.train(), x) and fused_attention_applies(attention.eval(), x)


# ----------------------------------------------------------------------------------------
# Packing: several pairs per row, the same losses and gradients
# ----------------------------------------------------------------------------------------


def random_pretraining_batches(seed, count, max_length=24):
    """data.pretraining_batch's own batches (B2 pairs, B1 masks) from random documents of random
    sentence lengths: pairs of every length from a few tokens to max_length."""
    generator = np.random.default_rng(seed)
    tokenizer = Tokenizer(SPECIAL_TOKENS + [f"w{i}" for i in range(55)])
    documents = [[generator.integers(5, 60, int(generator.integers(1, max_length))) for _ in range(generator.integers(1, 5))]
                 for _ in range(30)]
    return tokenizer, [data.pretraining_batch(documents, tokenizer, generator, int(generator.integers(1, 9)), max_length)
                       for _ in range(count)]


def test_packing_puts_each_pair_whole_in_one_row_with_its_own_positions_and_labels():
    for seed in range(20):
        tokenizer, batches = random_pretraining_batches(seed, 3, max_length=24)
        for batch in batches:
            packed = fast.pack_pairs(batch, 24, tokenizer.pad_id)
            real, lengths = batch["attention_mask"], batch["attention_mask"].sum(1)
            rows, width = packed["input_ids"].shape
            assert width <= 24 and rows <= len(lengths) and rows >= -(-lengths.sum() // 24)
            assert packed["attention_mask"].sum() == real.sum() and np.array_equal(packed["nsp_labels"], batch["nsp_labels"])
            for pair, (start, length) in enumerate(zip(packed["cls_positions"], lengths)):
                row, column = divmod(int(start), width)
                span = slice(column, column + length)
                for key in ("input_ids", "segment_ids", "mlm_labels"):
                    assert np.array_equal(packed[key][row, span], batch[key][pair, :length]), key
                assert np.array_equal(packed["position_ids"][row, span], np.arange(length))
                assert len(set(packed["pair_in_row"][row, span])) == 1 and packed["pair_in_row"][row, column] > 0
            # first-fit: no row has room for a pair placed in a later row
            room = 24 - packed["attention_mask"].sum(1)
            first_rows = packed["cls_positions"] // width
            for pair, row in enumerate(first_rows):
                assert not (room[:row] >= lengths[pair]).any()


@pytest.mark.parametrize("attention", ["explicit", "sdpa"])
def test_a_packed_step_computes_the_unpacked_steps_losses_and_gradients(attention, device):
    # many random steps (random pair lengths, hence random packings; 1 to 3 micro-batches
    # accumulated as pretraining_step does): the reading path on the pairs one per row against
    # fast.Speed on the same pairs packed -- MLM (E4 over all masked tokens), NSP (B2, each
    # pair's own [CLS]) and every gradient, to float tolerance
    config = make_config("tiny", vocab_size=60, max_positions=24, hidden_size=32, num_heads=2, intermediate_size=64,
                         dropout=0.0, attention_dropout=0.0, attention=attention)
    torch.manual_seed(0)
    network = PreTrainingModel(config).to(device)
    for trial in range(10):
        tokenizer, micro_batches = random_pretraining_batches(100 + trial, 1 + trial % 3)
        num_masked_total = sum(int((b["mlm_labels"] != IGNORE_INDEX).sum()) for b in micro_batches)
        results = []
        for packing in (False, True):
            network.zero_grad()
            losses = torch.zeros(2, device=device)
            for micro_batch in micro_batches:
                if packing:
                    micro_batch = fast.pack_pairs(micro_batch, 24, tokenizer.pad_id)
                    speed = fast.speed_for(micro_batch, device, max_predictions=11)
                else:
                    speed = None
                t = {key: torch.from_numpy(np.asarray(value)).to(device) for key, value in micro_batch.items()}
                loss, loss_mlm, loss_nsp = pretraining_losses(network, t["input_ids"], t["segment_ids"], t["attention_mask"], t["mlm_labels"],
                                                   t["nsp_labels"], nsp_weight=1 / len(micro_batches),
                                                   num_masked_total=num_masked_total, speed=speed)
                loss.backward()
                losses += torch.stack([loss_mlm, loss_nsp]).detach()
            gradient = torch.cat([p.grad.flatten() for p in network.parameters() if p.grad is not None])
            results.append((losses, gradient))
        (losses, gradient), (packed_losses, packed_gradient) = results
        assert torch.allclose(losses, packed_losses, atol=1e-5, rtol=1e-5), trial
        assert torch.allclose(gradient, packed_gradient, atol=1e-5, rtol=1e-4), trial


def test_packing_auto_packs_exactly_the_micro_batches_where_it_pays_on_the_cpu_too(tmp_path):
    # --packing auto follows fast.packing_pays on every micro-batch, on the CPU as on a GPU. One-sentence
    # documents (as task-adaptive MLM reads the labeled texts), ~20 tokens here: they fill a 16-token
    # row (never packed), leave a 128-token row mostly empty (always packed), and at 44 each batch decides
    world = toyworld.toy_world(seed=5, num_documents=200)
    corpus = str(tmp_path / "sentences.txt")
    data.write_corpus(corpus, [[sentence] for document in world["unlabeled"] for sentence in document])
    decided = {}
    for max_length in (16, 44, 128):
        streams = {}
        for packing in ("auto", "off"):
            recipe = PretrainOptions(corpus=[corpus], batch_size=8, max_length=max_length, nsp=False,
                                     vocab_size=300, device="cpu", steps=2, save_every=0, packing=packing)
            run, _, encoded, _ = train.start_pretraining(str(tmp_path / f"{packing}-{max_length}"), recipe,
                                                         False, False, quiet)
            stream = train.step_batches(run, encoded, background=False)
            streams[packing] = [micro for _ in range(40) for micro in stream.next()[1]]
        decided[max_length] = [("cls_positions" in auto, fast.packing_pays(off, max_length))
                               for auto, off in zip(streams["auto"], streams["off"])]
        assert all(packed == pays for packed, pays in decided[max_length]), max_length
    assert not any(packed for packed, _ in decided[16]) and all(packed for packed, _ in decided[128])
    assert 0 < sum(packed for packed, _ in decided[44]) < len(decided[44])


def test_the_main_job_and_the_plans_pretrain_unpacked_as_their_committed_numbers_were_made():
    # demo's rows (48 tokens of the toy world's sentences, pairs spanning several) are nearly full:
    # packing never pays there, so --packing auto leaves the main job's arithmetic as it was
    world = toyworld.toy_world(seed=0, num_documents=2000)
    tokenizer = train_tokenizer([s for d in world["unlabeled"] for s in d], vocab_size=1024)
    encoded = data.encode_documents(tokenizer, world["unlabeled"])
    recipe, rng = DemoOptions().pretraining(), np.random.default_rng(0)
    for _ in range(200):
        batch = data.pretraining_batch(encoded, tokenizer, rng, recipe.batch_size, recipe.max_length)
        assert not fast.packing_pays(batch, recipe.max_length)
    # the plans say "packing" where they pack (the GPU plans); the others pre-train and adapt unpacked
    assert experiments.PLAN_PACKING == "off"
    for name, plan in experiments.PLANS.items():
        assert plan.get("packing", "off") == ("auto" if plan.get("needs_gpu") else "off"), name


def test_packing_rearranges_the_data_stream_never_draws_from_it_and_resumes_bit_identical(small_world, tmp_path):
    # the same data generator states and pairs with --packing on and off (packing only rearranges);
    # a packed run stopped and resumed from its checkpoint ends with the uninterrupted run's weights
    common = dict(corpus=[small_world["corpus"]], batch_size=8, max_length=32, vocab_size=300, device="cpu")
    states = {}
    for packing in ("on", "off"):
        recipe = PretrainOptions(**common, steps=2, save_every=0, packing=packing)
        run, _, encoded, _ = train.start_pretraining(str(tmp_path / packing), recipe, False, False, quiet)
        batches = train.step_batches(run, encoded, background=False)
        states[packing] = [batches.next() for _ in range(3)]
    for (on_state, on_batches), (off_state, off_batches) in zip(states["on"], states["off"]):
        assert on_state == off_state
        for on, off in zip(on_batches, off_batches):
            assert "cls_positions" in on and "cls_positions" not in off
            assert np.array_equal(on["nsp_labels"], off["nsp_labels"])
            targets = [np.sort(b["mlm_labels"][b["mlm_labels"] != IGNORE_INDEX]) for b in (on, off)]
            assert np.array_equal(*targets) and on["attention_mask"].sum() == off["attention_mask"].sum()
    # killed in its 5th step (the checkpoint of step 2 written in the 3rd), resumed: the same weights
    recipe = PretrainOptions(**common, steps=6, save_every=2, eval_every=6, packing="on", dropout=0.1)
    train.pretrain(str(tmp_path / "whole"), recipe, log=quiet, progress=False)
    step, calls = train.pretraining_step, []

    def killed_in_the_fifth_step(*args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return step(*args)

    train.pretraining_step = killed_in_the_fifth_step
    try:
        with pytest.raises(KeyboardInterrupt):
            train.pretrain(str(tmp_path / "killed"), recipe, log=quiet, progress=False)
    finally:
        train.pretraining_step = step
    assert torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)["step"] == 2
    train.pretrain(str(tmp_path / "killed"), recipe, resume=True, log=quiet, progress=False)
    expected, found = (torch.load(tmp_path / name / "checkpoint.pt", weights_only=True) for name in ("whole", "killed"))
    assert found["step"] == expected["step"] == 6
    for name, value in expected["model"].items():
        assert torch.equal(found["model"][name], value), name


def compiled_and_eager_runs(how, backend, learning_rates, device="cpu"):
    """The same tiny model trained a few steps eagerly and with --compile `how` (fast.compiled_model
    + fast.Update): each run's losses and final weights."""
    config = make_config("tiny", vocab_size=100, max_positions=16, intermediate_size=32, dropout=0.0,
                         attention_dropout=0.0, attention="sdpa")
    runs = {}
    for name in ("off", how):
        torch.manual_seed(0)
        model = PreTrainingModel(config).to(device)
        optimizer = schedule.make_optimizer(model, 1e-3)
        training_model = fast.compiled_model(model, name, backend=backend)
        update = fast.Update(optimizer, torch.amp.GradScaler(device, enabled=False), name, backend=backend)
        generator = torch.Generator().manual_seed(1)
        losses, weights = [], []
        for lr in learning_rates:
            ids = torch.randint(5, 100, (4, 16), generator=generator)
            labels = torch.where(torch.rand(4, 16, generator=generator) < 0.3, ids, torch.full_like(ids, IGNORE_INDEX))
            labels[:, 1] = ids[:, 1]
            for group in optimizer.param_groups:
                group["lr"] = lr  # C4's schedule: a new float every step
            mask = torch.ones(4, 16, dtype=torch.bool, device=device)
            loss = pretraining_losses(training_model, ids.to(device), None, mask, labels.to(device))[0]
            loss.backward()
            update()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            weights.append([p.detach().clone() for p in model.parameters()])
        assert all(isinstance(group["lr"], float) for group in optimizer.param_groups)  # the loop's floats back
        runs[name] = losses, weights
    return runs["off"], runs[how]


def test_a_compiled_step_gives_the_eager_steps_losses_and_weights_and_reads_each_steps_learning_rate():
    # on the CPU the plumbing (torch.compile's graphs of the model and of AdamW's update, the learning rate
    # as a tensor) is run by eager kernels (aot_eager), compiling in seconds; on CUDA see the [cuda] test
    learning_rates = [1e-3, 3e-3, 0.0, 2e-3]
    (eager_losses, eager_weights), (losses, weights) = compiled_and_eager_runs("step", "aot_eager", learning_rates)
    assert np.allclose(losses, eager_losses, rtol=1e-5, atol=1e-6)
    for eager, compiled in zip(eager_weights[-1], weights[-1]):
        assert torch.allclose(eager, compiled, rtol=1e-4, atol=1e-5)
    # learning rate 0 at the third step: the compiled update changed nothing then (no rate baked in at compile)
    assert all(torch.equal(a, b) for a, b in zip(weights[1], weights[2]))
    assert not all(torch.equal(a, b) for a, b in zip(weights[2], weights[3]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor's compile of a step takes minutes on a CPU")
@pytest.mark.parametrize("how", ["step", "graphs"])
def test_a_step_compiled_by_inductor_gives_the_eager_steps_losses_and_weights_cuda(how):
    # the real compiler on CUDA (graphs: its kernels replayed as CUDA graphs), fp32: its fused kernels sum in
    # other orders than eager's, so a few steps of AdamW agree to float tolerance, not bit for bit
    (eager_losses, eager_weights), (losses, weights) = compiled_and_eager_runs(how, "inductor", [1e-3, 3e-3, 2e-3],
                                                                               device="cuda")
    assert np.allclose(losses, eager_losses, rtol=1e-4, atol=1e-5)
    for eager, compiled in zip(eager_weights[-1], weights[-1]):
        assert torch.allclose(eager, compiled, rtol=1e-3, atol=2e-4)


def test_the_compile_flag_alone_compiles_the_model_and_names_a_mode_otherwise():
    parser = ptft.build_parser()
    for argv, expected in (([], "off"), (["--compile"], "model"), (["--compile", "step"], "step"),
                           (["--compile", "graphs"], "graphs")):
        args = parser.parse_args(["pretrain", "--out", "x", *argv])
        assert args.compile == expected
    with pytest.raises(InputError, match="--compile: expected off, model, step or graphs"):
        PretrainOptions(compile="fast").check()
    assert fast.compiled_model(model := torch.nn.Linear(2, 2), "off") is model
