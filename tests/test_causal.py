"""C8: the causal (GPT-style) objective on the same encoder -- the mask, the loss, perplexity,
generation, fine-tuning's pooling and what export refuses."""

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import evaluation
import fast
import toyworld
import train
from checkpoint import check_resume_settings, load_checkpoint, open_model
from common import IGNORE_INDEX, InputError
from conftest import assert_clear_error, pretraining_losses, quiet, random_batch, small_config
from model import Classifier, PreTrainingModel, causal_lm_loss
from options import GenerateOptions, PretrainOptions


@pytest.fixture(scope="module")
def causal_run(small_world, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("causal") / "run")
    metrics = train.pretrain(out, PretrainOptions(corpus=[small_world["corpus"]], objective="causal", steps=30,
                                                  batch_size=16, max_length=32, lr=2e-3, eval_every=15,
                                                  save_every=0, device="cpu"), log=quiet, progress=False)
    return out, metrics


def all_scores(model, input_ids, attention_mask):
    """The tied decoder's scores at every position: (B, T, V)."""
    sequence_output, _ = model.encoder(input_ids, None, attention_mask)
    return model.mlm_head(sequence_output, model.encoder.embeddings.token.weight)


@pytest.mark.parametrize("attention", ["explicit", "sdpa"])
def test_no_position_sees_a_later_one_perturbing_future_tokens_never_changes_earlier_outputs(attention):
    torch.manual_seed(0)
    model = PreTrainingModel(small_config(causal=True, attention=attention)).eval()
    for seed in range(20):
        input_ids, segment_ids, attention_mask, _, _ = random_batch(model.config, seed=seed)
        generator = torch.Generator().manual_seed(1000 + seed)
        cut = int(torch.randint(1, input_ids.shape[1], (1,), generator=generator))
        changed = input_ids.clone()
        changed[:, cut:] = torch.randint(5, model.config.vocab_size, changed[:, cut:].shape, generator=generator)
        with torch.no_grad():
            for mask in (None, attention_mask):  # without padding, and with it (the real tokens only, too)
                before = model.encoder(input_ids, segment_ids, mask)[0]
                after = model.encoder(changed, segment_ids, mask)[0]
                assert torch.allclose(before[:, :cut], after[:, :cut], atol=1e-5), (seed, cut)
                assert not torch.allclose(before[:, cut:], after[:, cut:], atol=1e-3)  # the test can fail
            unpadded = fast.encode_unpadded(model.encoder, changed, segment_ids, attention_mask,
                                            fast.Unpadded(attention_mask))[0]
            real = attention_mask[:, :cut]
            assert torch.allclose(unpadded[:, :cut][real], model.encoder(input_ids, segment_ids, attention_mask)[0][:, :cut][real],
                                  atol=1e-5)


def test_the_mlm_encoder_is_not_causal_a_later_token_changes_earlier_outputs():
    torch.manual_seed(0)
    model = PreTrainingModel(small_config()).eval()
    input_ids = random_batch(model.config)[0]
    changed = input_ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % model.config.vocab_size
    with torch.no_grad():
        assert not torch.allclose(model.encoder(input_ids)[0][:, 0], model.encoder(changed)[0][:, 0], atol=1e-4)


def test_the_causal_loss_is_cross_entropy_on_shifted_targets():
    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        batch, length, vocab = 4, int(torch.randint(2, 12, (1,), generator=generator)), 13
        scores = torch.randn(batch, length, vocab, generator=generator) * 3
        input_ids = torch.randint(0, vocab, (batch, length), generator=generator)
        lengths = torch.randint(1, length + 1, (batch,), generator=generator)
        attention_mask = torch.arange(length)[None, :] < lengths[:, None]
        # the row at t - 1 predicts x_t; a padding target is ignored
        targets = torch.where(attention_mask[:, 1:], input_ids[:, 1:], IGNORE_INDEX)
        if (targets == IGNORE_INDEX).all():
            continue
        reference = F.cross_entropy(scores[:, :-1].reshape(-1, vocab), targets.reshape(-1), ignore_index=IGNORE_INDEX)
        assert torch.allclose(causal_lm_loss(scores, input_ids, attention_mask), reference, atol=1e-6), trial


def test_the_training_batches_loss_is_the_written_out_causal_loss():
    """The loop trains through PreTrainingModel's labelled positions (data.next_token_labels):
    the same number as causal_lm_loss on every position's scores."""
    torch.manual_seed(0)
    model = PreTrainingModel(small_config(causal=True)).eval()
    for seed in range(5):
        input_ids, segment_ids, attention_mask, _, _ = random_batch(model.config, seed=seed)
        labels = torch.from_numpy(data.next_token_labels(input_ids.numpy(), attention_mask.numpy()))
        with torch.no_grad():
            loss, _, nsp = pretraining_losses(model, input_ids, None, attention_mask, labels)
            written_out = causal_lm_loss(all_scores(model, input_ids, attention_mask), input_ids, attention_mask)
        assert nsp is None
        assert torch.allclose(loss, written_out, atol=1e-5)


def test_a_causal_run_reports_exp_of_its_held_out_per_token_loss_as_perplexity(causal_run, small_world):
    out, metrics = causal_run
    with open(os.path.join(out, "metrics.json")) as f:
        written = json.load(f)
    assert written["objective"] == "causal" and written["held_out_perplexity"] == metrics["held_out_perplexity"]
    assert metrics["held_out_perplexity"] == pytest.approx(math.exp(metrics["held_out_mlm_loss"]), rel=1e-12)
    # the held-out loss is causal_lm_loss over the held-out rows, every real token weighted alike
    model, tokenizer, checkpoint = open_model(out, quiet)
    model.eval()
    _, held_out_documents = data.split_held_out(data.load_corpus([small_world["corpus"]])[1])
    batches = data.held_out_batches(data.encode_documents(tokenizer, held_out_documents), tokenizer, 32, False,
                                    causal=True)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            input_ids, attention_mask = torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["attention_mask"])
            predicted = int(attention_mask[:, 1:].sum())
            total += causal_lm_loss(all_scores(model, input_ids, attention_mask), input_ids, attention_mask).item() * predicted
            count += predicted
    assert metrics["held_out_mlm_loss"] == pytest.approx(total / count, rel=1e-4)
    assert metrics["held_out_mlm_loss"] < math.log(len(tokenizer))  # it learned something
    assert checkpoint["config"]["causal"] and checkpoint["run"]["objective"] == "causal"
    assert checkpoint["run"]["nsp"] is False  # no NSP under a causal mask


def test_greedy_generation_is_deterministic_and_takes_the_most_probable_token(causal_run):
    out, _ = causal_run
    first = evaluation.generate(out, "the", GenerateOptions(max_new_tokens=8, greedy=True, seed=1, device="cpu"), log=quiet)
    second = evaluation.generate(out, "the", GenerateOptions(max_new_tokens=8, greedy=True, seed=2, device="cpu"), log=quiet)
    assert first == second
    model, tokenizer, _ = open_model(out, quiet)
    model.eval()
    ids = [tokenizer.cls_id, *tokenizer.encode("the")]
    with torch.no_grad():
        for token in first[1]:
            scores = all_scores(model, torch.tensor([ids]), None)[0, -1]
            scores[tokenizer.pad_id] = float("-inf")
            assert token == int(scores.argmax())
            ids.append(token)


def test_sampling_repeats_with_its_seed_and_top_k_1_is_greedy(causal_run):
    out, _ = causal_run
    sample = [evaluation.generate(out, "the", GenerateOptions(max_new_tokens=10, seed=3, device="cpu"), log=quiet) for _ in range(2)]
    assert sample[0] == sample[1]
    greedy = evaluation.generate(out, "the", GenerateOptions(max_new_tokens=10, greedy=True, device="cpu"), log=quiet)
    assert evaluation.generate(out, "the", GenerateOptions(max_new_tokens=10, top_k=1, seed=5, device="cpu"), log=quiet) == greedy


def test_the_generate_command_prints_text_and_refuses_bad_input_in_one_line(cli, causal_run, small_world):
    out, _ = causal_run
    status, printed, _ = cli("generate", "--init", out, "the", "--greedy", "--max-new-tokens", 5, "--device", "cpu")
    assert status == 0 and printed.strip() == evaluation.generate(out, "the", GenerateOptions(max_new_tokens=5, greedy=True, device="cpu"), log=quiet)[0]
    assert_clear_error(cli("generate", "--init", small_world["pre"], "the"), "--objective causal")
    assert_clear_error(cli("generate", "--init", out, "the", "--temperature", 0), "--temperature")
    assert_clear_error(cli("generate", "--init", out, "the", "--top-k", 0), "--top-k")


def test_a_causal_encoder_classifies_from_the_mean_because_cls_sees_only_itself():
    torch.manual_seed(0)
    config = small_config(causal=True)
    model = Classifier(config, 3, pool="cls").eval()
    assert model.pool == "mean" and not any(p.requires_grad for p in model.encoder.pooler.parameters())
    input_ids, segment_ids, attention_mask, _, _ = random_batch(config)
    input_ids[:, 0] = 2  # every row starts with the same token ([CLS])
    with torch.no_grad():
        first = model.encoder(input_ids, None, attention_mask)[0][:, 0]
    assert torch.allclose(first, first[:1].expand_as(first), atol=1e-5)  # the same vector for every input
    assert Classifier(small_config(), 3, pool="cls").pool == "cls"


def test_fine_tuning_a_causal_run_keeps_the_causal_mask_and_saves_mean_pooling(causal_run, small_world, tmp_path, cli):
    out, _ = causal_run
    status, _, err = cli("finetune", "--init", out, "--train", small_world["train"], "--valid", small_world["valid"],
                         "--out", tmp_path / "ft", "--epochs", 1, "--device", "cpu")
    assert status == 0, err
    checkpoint = load_checkpoint(str(tmp_path / "ft"))
    assert checkpoint["pool"] == "mean" and checkpoint["config"]["causal"]


def test_export_refuses_a_causal_run_in_one_line(cli, causal_run, tmp_path):
    assert_clear_error(cli("export", "--init", causal_run[0], "--out", tmp_path / "hf"), "causal")
    assert not os.path.exists(tmp_path / "hf")


def test_objective_is_a_choice_causal_turns_nsp_off_and_resume_keeps_it(small_world, causal_run):
    options = PretrainOptions(objective="causal")
    options.check()
    assert options.nsp is False and options.model_config().causal
    assert not PretrainOptions().model_config().causal
    with pytest.raises(InputError, match="--objective"):
        PretrainOptions(objective="gpt").check()
    checkpoint = load_checkpoint(causal_run[0])
    mlm = PretrainOptions(corpus=[small_world["corpus"]], batch_size=16, max_length=32, device="cpu")
    mlm.check()
    with pytest.raises(InputError, match="objective"):
        check_resume_settings(checkpoint, mlm, mlm.model_config(), checkpoint["run"]["corpus"], "checkpoint.pt")


def test_causal_batches_predict_every_next_real_token_and_mask_nothing(small_world):
    _, tokenizer, _ = open_model(small_world["pre"], quiet)
    documents = data.encode_documents(tokenizer, data.load_corpus([small_world["corpus"]])[1])
    batch = data.causal_batch(documents, tokenizer, np.random.default_rng(0), 8, 32)
    ids, real, labels = batch["input_ids"], batch["attention_mask"], batch["mlm_labels"]
    assert (ids[:, 0] == tokenizer.cls_id).all() and tokenizer.mask_id not in ids
    for row in range(len(ids)):
        n = int(real[row].sum())
        assert (labels[row, : n - 1] == ids[row, 1:n]).all() and (labels[row, n - 1:] == IGNORE_INDEX).all()
        assert ids[row, n - 1] == tokenizer.sep_id


def test_the_c8_plan_writes_each_rows_per_seed_values_mean_and_sample_std_and_resumes(tmp_path):
    import experiments
    plan = {**experiments.PLANS["c8"], "seeds": 3, "toy_documents": 300, "toy_labeled": (4, 2, 8),
            "pretrain_steps": {"toy": 8, "stdlib": None}, "pretrain_batch_size": {"toy": 8, "stdlib": 8},
            "eval_every": {"toy": 4, "stdlib": 4}, "k": 2, "finetune_steps": 2, "max_epochs": 1,
            "c8_prompts_per_topic": 1, "image_data": []}  # the images: tests/test_images.py
    out = str(tmp_path / "c8")
    results = experiments.run(out, "c8", plan=plan, log=quiet)
    assert results["c8_pretraining"]["causal"]["held_out_perplexity"] == pytest.approx(
        math.exp(results["c8_pretraining"]["causal"]["held_out_mlm_loss"]))
    generation = results["c8_generation"]
    assert generation["prompts"] == len(toyworld.TOPICS) and 0 <= generation["on_topic_share"] <= 1
    (table,) = results["tables"]
    settings = [row["setting"] for row in table["rows"]]
    assert any(s.startswith("MLM") and s.endswith(", full") for s in settings)
    assert any(s.startswith("causal") and "full" in s for s in settings)
    for row in table["rows"]:
        accuracy = row["cells"]["accuracy"]
        assert len(accuracy["values"]) == 3
        assert accuracy["std"] == pytest.approx(np.std(accuracy["values"], ddof=1))  # the sample std
    assert load_checkpoint(os.path.join(out, "toy", "pretrain-causal", "checkpoint.pt"))["config"]["causal"]
    with open(os.path.join(out, "runs.jsonl")) as f:
        runs = f.read()
    assert experiments.run(out, "c8", plan=plan, resume=True, log=quiet)["tables"] == results["tables"]
    with open(os.path.join(out, "runs.jsonl")) as f:
        assert f.read() == runs  # nothing run twice


def test_the_c8_plan_on_real_text_compares_the_two_objectives_there_and_writes_greedy_samples(tmp_path):
    import experiments
    plan = {**experiments.PLANS["c8-real-text"], "seeds": 2, "stdlib_max_documents": 400,
            "pretrain_steps": {"toy": None, "stdlib": 6}, "pretrain_batch_size": {"toy": 8, "stdlib": 8},
            "eval_every": {"toy": 3, "stdlib": 3}, "k": 2, "finetune_steps": 2, "max_epochs": 1,
            "c8_prompts": ["Return the"]}
    results = experiments.run(str(tmp_path / "c8"), "c8-real-text", plan=plan, log=quiet)
    (table,) = results["tables"]
    assert table["corpus"] == "stdlib" and set(results["c8_pretraining"]) == {"mlm", "causal"}
    (sample,) = results["c8_generation"]["greedy"].values()
    assert isinstance(sample, str)
    assert {v["setting"] for v in results["verdicts"]} == {
        f"stdlib causal {how} vs {other}" for how in ("full", "head only") for other in ("scratch", "MLM within 1 point")}
    assert "real text: stdlib docstrings" in experiments.c8_markdown(results)
    assert "`Return the` →" in experiments.c8_markdown(results)
