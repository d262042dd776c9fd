"""experiments.py and the C5 remedies of train.py as a specification: every claim gets a table
row with mean ± std; the remedies do what their formulas say; forgetting is reported."""

import json
import os

import numpy as np
import pytest
import torch

import data
import experiments
import finetuning
import toyworld
import train
from common import InputError
from conftest import assert_clear_error, quiet
from model import Classifier, make_config
from options import FinetuneOptions, Remedies

CLAIMS = ["C1", "C2", "C3", "C4", "C5", "C6", "C7"]

# The quick plan shrunk to seconds: a small toy world, a few pre-training steps, 2 labels per class.
TINY_PLAN = {**experiments.PLANS["quick"], "seeds": 3, "toy_documents": 300, "toy_labeled": (4, 2, 8),
             "stdlib_max_documents": 300, "pretrain_steps": {"toy": 30, "stdlib": 20},
             "pretrain_batch_size": {"toy": 8, "stdlib": 8}, "snapshot_steps": {"toy": [10, 20], "stdlib": [10]},
             "eval_every": {"toy": 10, "stdlib": 10}, "task_choice_steps": {"toy": 20, "stdlib": None},
             "tables": {"toy": CLAIMS, "stdlib": ["C1"]}, "labels_per_class": [2], "k": 2,
             "finetune_steps": 2, "max_epochs": 2, "epoch_grid": [1, 2], "lr_grid": [1e-3], "forgetting_batches": 1,
             "c7_unlabeled": 50, "c7_recovery_epochs": 1, "c7_timing_seconds": 0.02, "adapt_steps": 3,
             "c1_variants": {"toy": ["scratch", "head", "head-mean", "top-2", "full", "adapt-full"],
                             "stdlib": ["scratch", "head", "head-mean", "full"]}}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("experiments"))
    results = experiments.run(out, plan=TINY_PLAN, log=quiet)
    return out, results


def test_every_claim_has_a_row_with_mean_and_std_over_seeds(tiny_run):
    out, results = tiny_run
    assert json.load(open(os.path.join(out, "results.json")))["tables"] == results["tables"]
    for claim in CLAIMS:
        rows = [row for table in results["tables"] if table["claim"] == claim for row in table["rows"]]
        assert rows, f"{claim} has no row"
        for row in rows:
            accuracy = row["cells"]["accuracy"]
            assert accuracy["n"] == 3 and len(accuracy["values"]) == 3
            assert accuracy["mean"] == pytest.approx(np.mean(accuracy["values"]))
            assert accuracy["std"] == pytest.approx(np.std(accuracy["values"]))
            assert 0.0 <= accuracy["mean"] <= 1.0


def test_every_table_carries_the_tfidf_baseline_and_real_text_has_its_own_table(tiny_run):
    _, results = tiny_run
    for table in results["tables"]:
        if table["claim"] != "C7":  # C7 compares models of one task with each other, not with counting words
            assert any(row["setting"].endswith("TF-IDF + logistic regression") for row in table["rows"]), table["title"]
    assert [t["claim"] for t in results["tables"] if t["corpus"] == "stdlib"] == ["C1"]


@pytest.mark.parametrize("name", sorted(experiments.PLANS))
def test_every_plan_can_run_to_its_end(name):
    """What would otherwise fail only after the pre-training: C6's reference encoder for the task
    choices must be a snapshot (or the end) of the main run; snapshots lie inside it."""
    plan = experiments.PLANS[name]
    assert plan["seeds"] >= 3  # mean ± std over at least 3 seeds
    for corpus in plan["corpora"]:
        steps, snapshots = plan["pretrain_steps"][corpus], plan["snapshot_steps"][corpus]
        assert all(0 < step < steps for step in snapshots)
        choice_steps = plan["task_choice_steps"][corpus]
        assert choice_steps is None or choice_steps == steps or choice_steps in snapshots
        assert plan["tables"][corpus] and set(plan["tables"][corpus]) <= set(CLAIMS)
        assert set(plan["c1_variants"][corpus]) <= {"scratch", "head", "head-mean", "top-2", "full", "adapt-head-mean", "adapt-full"}
        assert plan.get("adapt_steps") or not any(v.startswith("adapt-") for v in plan["c1_variants"][corpus])


def test_labels_per_class_picture_is_drawn_when_matplotlib_is_installed(tiny_run):
    pytest.importorskip("matplotlib")  # optional dependency: without it only the tables are written
    out, _ = tiny_run
    with open(os.path.join(out, "labels_per_class.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_markdown_runs_and_snapshots_are_written(tiny_run):
    out, results = tiny_run
    markdown = open(os.path.join(out, "results.md"), encoding="utf-8").read()
    assert "wall-clock" in markdown and "±" in markdown
    for claim in CLAIMS:
        assert f"### {claim} —" in markdown and f"| {claim} |" in markdown
    runs = [json.loads(line) for line in open(os.path.join(out, "runs.jsonl"))]
    assert len(runs) == len({run["key"] for run in runs})  # each distinct run once (shared rows are reused)
    assert all({"spec", "result"} <= set(run) for run in runs)
    # C6's budget sweep reads the snapshots of the single pre-training run
    assert os.path.exists(os.path.join(out, "toy", "pretrain", "snapshot-10.pt"))
    budget = [row["setting"] for t in results["tables"] if t["claim"] == "C6" for row in t["rows"]]
    assert {"10 steps", "20 steps", "30 steps", "20 steps, MLM only (no NSP)", "20 steps, 100% [MASK] (no 80/10/10)"} <= set(budget)


def test_resume_skips_the_finished_runs(tiny_run):
    out, results = tiny_run
    lines_before = open(os.path.join(out, "runs.jsonl")).read()
    resumed = experiments.run(out, plan=TINY_PLAN, resume=True, log=quiet)
    assert open(os.path.join(out, "runs.jsonl")).read() == lines_before  # nothing ran again
    assert resumed["tables"] == results["tables"]
    with pytest.raises(InputError, match="not empty"):
        experiments.run(out, plan=TINY_PLAN, log=quiet)  # never overwrites without --resume / --force


def test_stdlib_task_splits_by_file_and_keeps_test_text_out_of_pretraining():
    task = experiments.stdlib_task(max_documents=1000)
    assert len({label for _, label in task["train"]}) == len(experiments.STDLIB_AREAS)
    pretraining_text = {" ".join(lines[:3]) for lines in task["unlabeled"]}
    assert task["test"] and not any(text in pretraining_text for text, _ in task["test"])
    assert not {text for text, _ in task["test"]} & {text for text, _ in task["train"]}


def test_tfidf_baseline_beats_chance_on_a_separable_set():
    rng = np.random.default_rng(0)
    topics = [["apple", "banana", "cherry", "grape"], ["car", "truck", "bus", "train"], ["red", "blue", "green", "pink"]]

    def sentences(n):
        labels = rng.integers(0, 3, n)
        return [" ".join(rng.choice(topics[y], 3)) + " and the of" for y in labels], labels.tolist()

    train_texts, train_labels = sentences(30)
    test_texts, test_labels = sentences(60)
    predictions = experiments.tfidf_logistic_regression(train_texts, train_labels, test_texts, 3)
    assert np.mean(predictions == np.array(test_labels)) > 0.9  # chance: 1/3


def test_tfidf_keeps_words_that_are_in_every_text_and_counts_how_often():
    # both words are in every text, so only their counts tell the classes apart: idf = log(N / df) + 1 keeps them
    train_texts, test_texts = ["a a a b", "a b b b"] * 10, ["a a a a b", "a b b b b"]
    predictions = experiments.tfidf_logistic_regression(train_texts, [0, 1] * 10, test_texts, 2)
    assert list(predictions) == [0, 1]


def test_each_seed_draws_its_own_k_labeled_examples_per_class_and_the_same_seed_the_same():
    examples = [(f"text {i}", i % 3) for i in range(60)]
    draws = [experiments.draw_labeled(examples, 4, seed) for seed in range(5)]
    for draw in draws:
        assert sorted(y for _, y in draw) == [0] * 4 + [1] * 4 + [2] * 4 and len(set(draw)) == 12
        assert set(draw) <= set(examples)
    assert len({tuple(draw) for draw in draws}) == 5
    assert experiments.draw_labeled(examples, 4, 3) == draws[3]
    assert experiments.draw_labeled(examples, "all", 0) == examples


def test_a_summary_counts_every_measured_value_zeros_included():
    assert experiments.summarize([0.0, 0.5, None]) == {"mean": 0.25, "std": 0.25, "n": 2, "values": [0.0, 0.5]}
    assert experiments.summarize([None]) is None


# ----------------------------------------------------------------------------------------
# C5's remedies
# ----------------------------------------------------------------------------------------


def test_l2_sp_penalty_is_zero_at_theta_0_and_its_gradient_is_lambda_times_the_displacement():
    torch.manual_seed(0)
    model = Classifier(make_config("tiny", vocab_size=50, max_positions=16), num_labels=2)
    theta_0 = {name: p.detach().clone() for name, p in model.encoder.named_parameters() if not name.startswith("pooler.")}
    assert train.l2_sp_penalty(model, theta_0, 0.3).item() == 0.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    train.l2_sp_penalty(model, theta_0, 0.3).backward()
    for name, p in model.encoder.named_parameters():
        if name in theta_0:
            assert torch.allclose(p.grad, 0.3 * (p.detach() - theta_0[name]), atol=1e-7), name
        else:
            assert p.grad is None  # the pooler is head: no pull toward a pre-trained value
    assert model.classifier.weight.grad is None


def test_layer_lr_decay_gives_lower_layers_smaller_rates():
    model = Classifier(make_config("tiny", vocab_size=50, max_positions=16), num_labels=2)  # 2 layers
    optimizer = train.make_optimizer(model, 1e-3, lr_scales=train.layer_lr_scales(model, 0.5))
    rate = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    expected = {"classifier.": 1e-3, "encoder.pooler.": 1e-3, "encoder.layers.1.": 5e-4,
                "encoder.layers.0.": 2.5e-4, "encoder.embeddings.": 1.25e-4}
    for name, p in model.named_parameters():
        prefix = next(prefix for prefix in expected if name.startswith(prefix))
        assert rate[id(p)] == pytest.approx(expected[prefix]), name
    # without decay: one rate for all
    optimizer = train.make_optimizer(model, 1e-3)
    assert {group["lr"] for group in optimizer.param_groups} == {1e-3}


@pytest.fixture(scope="session")
def labeled(tiny_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("labeled")
    world = toyworld.toy_world(seed=3, num_documents=50, labeled_per_class=(2, 1, 1))
    data.write_tsv(str(folder / "train.tsv"), world["train"])
    data.write_tsv(str(folder / "valid.tsv"), world["valid"])
    return os.path.join(tiny_run[0], "toy", "pretrain"), str(folder / "train.tsv"), str(folder / "valid.tsv")


def finetune(out, init, train_tsv, valid, **flags):
    return finetuning.finetune(str(out), FinetuneOptions(init=init, train=train_tsv, valid=valid, **{"device": "cpu", **flags}),
                          log=quiet, progress=False)


def test_aux_mlm_is_refused_with_a_frozen_encoder_or_without_an_mlm_head(labeled, tmp_path, cli):
    pre, train_tsv, valid_tsv = labeled
    with pytest.raises(InputError, match="--aux-mlm with --freeze head"):
        finetune(tmp_path / "a", pre, train_tsv, valid_tsv, freeze="head", remedies=Remedies(aux_mlm=1.0))
    code, _, stderr = cli("finetune", "--init", pre, "--train", train_tsv, "--out", tmp_path / "c", "--freeze", "head",
                          "--aux-mlm", "1")
    assert code == 2 and stderr.count("\n") == 1 and "--aux-mlm" in stderr
    classifier = str(tmp_path / "classifier")
    finetune(classifier, pre, train_tsv, valid_tsv, epochs=1)
    with pytest.raises(InputError, match="no pre-trained MLM head"):
        finetune(tmp_path / "b", classifier, train_tsv, valid_tsv, remedies=Remedies(aux_mlm=1.0))


def test_finetune_reports_forgetting_when_the_init_has_an_mlm_head(labeled, tmp_path):
    pre, train_tsv, valid_tsv = labeled
    out = str(tmp_path / "ft")
    finetune(out, pre, train_tsv, valid_tsv, epochs=2, lr=1e-3, remedies=Remedies(l2_sp=0.01, aux_mlm=1.0, layer_lr_decay=0.5),
             schedule="constant", warmup_fraction=0.0)
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["forgetting"] == pytest.approx(metrics["mlm_loss_after"] - metrics["mlm_loss_before"])
    assert metrics["mlm_loss_after"] != metrics["mlm_loss_before"]  # the encoder did train
    scratch = str(tmp_path / "scratch")
    finetune(scratch, "scratch", train_tsv, valid_tsv, epochs=1)
    assert "forgetting" not in json.load(open(os.path.join(scratch, "metrics.json")))  # no MLM head, nothing to forget


def test_every_plan_has_a_reference_encoder_for_its_task_choices():
    # C6's task variants are compared with the standard recipe pre-trained exactly as long: the
    # final run or one of its snapshots must be that reference
    for name, plan in experiments.PLANS.items():
        for corpus in plan["corpora"]:
            steps = plan["task_choice_steps"][corpus]
            if steps and "C6" in plan["tables"][corpus]:
                assert steps == plan["pretrain_steps"][corpus] or steps in plan["snapshot_steps"][corpus], (name, corpus)


def test_c1_and_c3_compare_the_two_sentence_vectors(tiny_run):
    _, results = tiny_run
    for claim in ("C1", "C3"):
        settings = [row["setting"] for table in results["tables"] if table["claim"] == claim and table["corpus"] == "toy"
                    for row in table["rows"]]
        assert any("mean pooling" in setting for setting in settings), claim
        assert any("head only" in setting or "--freeze head)" in setting for setting in settings), claim


def test_c7_measures_every_remedy_made_from_one_teacher(tiny_run):
    _, results = tiny_run
    (table,) = [t for t in results["tables"] if t["claim"] == "C7"]
    rows = {row["setting"]: row["cells"] for row in table["rows"]}
    assert set(rows) == {experiments.C7_NAMES[name] for name in experiments.PLANS["c7"]["c7_remedies"]}
    teacher, names = rows[experiments.C7_NAMES["teacher"]], experiments.C7_NAMES
    for cells in rows.values():
        assert cells["accuracy"]["n"] == 3 and cells["sentences_per_second_32"]["mean"] > 0
    assert rows[names["int8"]]["bytes_on_disk"]["mean"] < 0.35 * teacher["bytes_on_disk"]["mean"]
    assert rows[names["distilled"]]["parameters"]["mean"] < teacher["parameters"]["mean"]
    assert rows[names["ffn-50"]]["parameters"]["mean"] < teacher["parameters"]["mean"]
    assert rows[names["head"]]["task_bytes"]["mean"] < rows[names["lora-4"]]["task_bytes"]["mean"] < teacher["task_bytes"]["mean"]
    # pruned weights are zeros: the same file size, but it compresses further
    assert rows[names["pruned-50"]]["bytes_zipped"]["mean"] < 0.9 * teacher["bytes_zipped"]["mean"]


def test_c1_has_a_task_adaptive_row_whose_encoders_continued_mlm_on_each_draw(tiny_run):
    out, results = tiny_run
    (table,) = [t for t in results["tables"] if t["claim"] == "C1" and t["corpus"] == "toy"]
    assert any(row["setting"].endswith("+ task-adaptive MLM, full") for row in table["rows"])
    for seed in range(3):  # one adapted encoder per draw of the labeled examples, 3 MLM steps on their texts
        metrics = json.load(open(os.path.join(out, "toy", "adapted", f"k-2-seed-{seed}", "run", "metrics.json")))
        assert metrics["step"] == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="refused only where there is no CUDA GPU")
def test_the_gpu_plan_refuses_to_start_on_a_machine_without_a_gpu(cli, tmp_path):
    assert_clear_error(cli("experiments", "--plan", "real-text-gpu", "--out", tmp_path / "gpu"), "real-text-gpu",
                       "no CUDA GPU", "--plan real-text")
    assert not (tmp_path / "gpu").exists()
