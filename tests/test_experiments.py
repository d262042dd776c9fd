"""experiments.py and the C5 remedies of train.py as a specification: every claim gets a table
row with mean ± sample std and a verdict by rule; every results file says what made it; the
remedies do what their formulas say; forgetting is reported as a loss and as lost capability."""

import json
import os
import re

import numpy as np
import pytest
import torch

import data
import experiments
import finetuning
import schedule
import toyworld
import train
import verdicts
from common import InputError
from conftest import ROOT, assert_clear_error, quiet
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
             "c7_remedies": experiments.PLANS["c7"]["c7_remedies"], "c7_unlabeled": 50, "c7_recovery_epochs": 1, "c7_timing_seconds": 0.02, "adapt_steps": 3, "min_epochs": 1,
             "pretrain_lr_grid": [1e-4, 3e-3], "pretrain_lr_steps": 3, "pretrain_lr_batch_size": 4,
             "c1_variants": {"toy": ["scratch", "head", "head-mean", "top-2", "full", "adapt-full"],
                             "stdlib": ["scratch", "head", "head-mean", "full"]},
             "curve_labels_per_class": [2], "curve_variants": ["head-mean", "full", "adapt-full"]}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, small_world):
    # the curve's far end: another run stands in for the released encoder (any encoder folder)
    TINY_PLAN.update(released_encoder={"name": "another-run", "folder": small_world["pre"]},
                     released_variants={"2": ["head-mean", "full"]})
    out = str(tmp_path_factory.mktemp("experiments"))
    results_folder = str(tmp_path_factory.mktemp("results"))
    results = experiments.run(out, "tiny", plan=TINY_PLAN, log=quiet, results_folder=results_folder)
    return out, results, results_folder


def test_every_claim_has_a_row_with_mean_and_std_over_seeds(tiny_run):
    out, results, _ = tiny_run
    assert json.load(open(os.path.join(out, "results.json")))["tables"] == results["tables"]
    for claim in CLAIMS:
        rows = [row for table in results["tables"] if table["claim"] == claim for row in table["rows"]]
        assert rows, f"{claim} has no row"
        for row in rows:
            if row["setting"].startswith("pre-training lr"):  # C4's pre-training half: a loss, no accuracy
                assert row["cells"]["max_grad_norm"]["n"] == 3 and row["cells"]["diverged"]["n"] == 3
                continue
            accuracy = row["cells"]["accuracy"]
            assert accuracy["n"] == 3 and len(accuracy["values"]) == 3
            assert accuracy["mean"] == pytest.approx(np.mean(accuracy["values"]))
            assert accuracy["std"] == pytest.approx(np.std(accuracy["values"], ddof=1))  # the sample std
            assert accuracy["seeds"] == [0, 1, 2]
            assert 0.0 <= accuracy["mean"] <= 1.0


def test_every_table_carries_the_tfidf_baseline_and_real_text_has_its_own_table(tiny_run):
    _, results, _ = tiny_run
    for table in results["tables"]:
        # C7 compares models of one task with each other, C4's pre-training rates pre-trainings: not with counting words
        if table["claim"] != "C7" and not table["title"].startswith("pre-training"):
            assert any(row["setting"].endswith("TF-IDF + logistic regression") for row in table["rows"]), table["title"]
    assert [t["claim"] for t in results["tables"] if t["corpus"] == "stdlib"] == ["C1", "C1"]  # its table, its curve


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
    out, _, _ = tiny_run
    with open(os.path.join(out, "labels_per_class.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_markdown_runs_and_snapshots_are_written(tiny_run):
    out, results, _ = tiny_run
    markdown = open(os.path.join(out, "results.md"), encoding="utf-8").read()
    assert "minutes" in markdown and "±" in markdown
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
    out, results, _ = tiny_run
    lines_before = open(os.path.join(out, "runs.jsonl")).read()
    resumed = experiments.run(out, "tiny", plan=TINY_PLAN, resume=True, log=quiet)
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


def test_a_summary_counts_every_measured_value_zeros_included_and_keeps_each_seed():
    summary = experiments.summarize([0.0, 0.5, None], [0, 1, 2])
    assert summary == {"mean": 0.25, "std": pytest.approx(0.5 / 2 ** 0.5), "n": 2, "values": [0.0, 0.5], "seeds": [0, 1]}
    assert experiments.summarize([0.7], [4])["std"] is None  # one seed: no spread, not a spread of 0
    assert experiments.summarize([None], [0]) is None


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
    optimizer = schedule.make_optimizer(model, 1e-3, lr_scales=schedule.layer_lr_scales(model, 0.5))
    rate = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    expected = {"classifier.": 1e-3, "encoder.pooler.": 1e-3, "encoder.layers.1.": 5e-4,
                "encoder.layers.0.": 2.5e-4, "encoder.embeddings.": 1.25e-4}
    for name, p in model.named_parameters():
        prefix = next(prefix for prefix in expected if name.startswith(prefix))
        assert rate[id(p)] == pytest.approx(expected[prefix]), name
    # without decay: one rate for all
    optimizer = schedule.make_optimizer(model, 1e-3)
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
    unlabeled = [os.path.join(os.path.dirname(pre), "unlabeled.txt")]  # what the plan pre-trained on, named
    finetune(out, pre, train_tsv, valid_tsv, epochs=2, lr=1e-3, remedies=Remedies(l2_sp=0.01, aux_mlm=1.0, layer_lr_decay=0.5),
             schedule="constant", warmup_fraction=0.0, unlabeled=unlabeled)
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
    _, results, _ = tiny_run
    for claim in ("C1", "C3"):
        settings = [row["setting"] for table in results["tables"] if table["claim"] == claim and table["corpus"] == "toy"
                    for row in table["rows"]]
        assert any("mean pooling" in setting for setting in settings), claim
        assert any("head only" in setting or "--freeze head)" in setting for setting in settings), claim


def test_c7_measures_every_remedy_made_from_one_teacher(tiny_run):
    _, results, _ = tiny_run
    (table,) = [t for t in results["tables"] if t["claim"] == "C7"]
    rows = {row["setting"]: row["cells"] for row in table["rows"]}
    assert set(rows) == {experiments.C7_NAMES[name] for name in experiments.PLANS["c7"]["c7_remedies"]}
    teacher, names = rows[experiments.C7_NAMES["teacher"]], experiments.C7_NAMES
    for cells in rows.values():
        assert cells["accuracy"]["n"] == 3 and cells["sentences_per_second_32"]["mean"] > 0
        assert cells["speed_range_1"]["mean"] >= 0 and cells["speed_range_32"]["mean"] >= 0  # 5 repeats
    assert rows[names["int8"]]["bytes_on_disk"]["mean"] < 0.35 * teacher["bytes_on_disk"]["mean"]
    assert rows[names["distilled"]]["parameters"]["mean"] < teacher["parameters"]["mean"]
    assert rows[names["ffn-50"]]["parameters"]["mean"] < teacher["parameters"]["mean"]
    # whole heads and a quarter of the vocabulary: smaller dense models; peak memory follows the bytes
    assert rows[names["heads-50"]]["parameters"]["mean"] < teacher["parameters"]["mean"]
    assert rows[names["vocab-quarter"]]["bytes_on_disk"]["mean"] < teacher["bytes_on_disk"]["mean"]
    assert rows[names["heads-50"]]["peak_memory_32"]["mean"] < teacher["peak_memory_32"]["mean"]
    # LoRA on the token-embedding table adds its A and B; the table trained whole joins the task file
    with_table = [rows[names[f"lora-4-all+{part}-lr3e-3"]]["task_bytes"]["mean"] for part in ("embeddings", "embedding-table")]
    assert rows[names["lora-4-all"]]["task_bytes"]["mean"] < with_table[0] < with_table[1] < teacher["task_bytes"]["mean"]
    assert rows[names["head"]]["task_bytes"]["mean"] < rows[names["lora-4"]]["task_bytes"]["mean"] < teacher["task_bytes"]["mean"]
    # LoRA's task file grows with its rank and its targets, and stays far below the model
    lora_bytes = [rows[names[name]]["task_bytes"]["mean"] for name in ("lora-1", "lora-4", "lora-16")]
    assert lora_bytes == sorted(lora_bytes) and lora_bytes[-1] < teacher["task_bytes"]["mean"]
    assert rows[names["lora-4-all"]]["task_bytes"]["mean"] > rows[names["lora-4"]]["task_bytes"]["mean"]
    # the smaller pre-trained student, distilled and not: the same size, below the teacher's
    small = [rows[names[name]]["parameters"]["mean"] for name in ("distilled-small", "small-no-teacher")]
    assert small[0] == small[1] < teacher["parameters"]["mean"]
    # pruned weights are zeros: the same file size, but it compresses further
    assert rows[names["pruned-50"]]["bytes_zipped"]["mean"] < 0.9 * teacher["bytes_zipped"]["mean"]


def test_c1_has_a_task_adaptive_row_whose_encoders_continued_mlm_on_each_draw(tiny_run):
    out, results, _ = tiny_run
    (table,) = [t for t in results["tables"] if t["claim"] == "C1" and t["corpus"] == "toy"
                and not t["title"].startswith(experiments.CURVE_TITLE)]
    assert any(row["setting"].endswith("+ task-adaptive MLM, full") for row in table["rows"])
    for seed in range(3):  # one adapted encoder per draw of the labeled examples, 3 MLM steps on their texts
        metrics = json.load(open(os.path.join(out, "toy", "adapted", f"final-k-2-seed-{seed}", "run", "metrics.json")))
        assert metrics["step"] == 3


def test_c1_compute_curve_fine_tunes_every_variant_from_every_snapshot_scratch_at_zero(tiny_run):
    out, results, _ = tiny_run
    (table,) = [t for t in results["tables"] if t["corpus"] == "toy" and t["title"].startswith(experiments.CURVE_TITLE)]
    assert [row["setting"] for row in table["rows"]] == (
        ["k=2, 0 steps: from scratch"]
        + [f"k=2, {steps} steps: {variant}" for steps in (10, 20, 30) for variant in (
            "pre-trained, head only, mean pooling", "pre-trained, full", "+ task-adaptive MLM, full")]
        + ["k=2, released another-run: pre-trained, head only, mean pooling",
           "k=2, released another-run: pre-trained, full"]
        + ["k=2, no pre-training: TF-IDF + logistic regression"])
    rows = {row["setting"]: row for t in results["tables"] for row in t["rows"] if t["corpus"] == "toy"}
    # at the end of pre-training the curve's runs are C1's own (the same runs, remembered once)
    for curve, c1 in (("k=2, 30 steps: pre-trained, full", "k=2: pre-trained, full"),
                      ("k=2, 0 steps: from scratch", "k=2: from scratch")):
        assert rows[curve]["cells"] == rows[c1]["cells"]
    # a snapshot's rows differ from the end's: its own encoder, and its own task-adaptive runs
    assert rows["k=2, 10 steps: pre-trained, full"]["cells"] != rows["k=2, 30 steps: pre-trained, full"]["cells"]
    for seed in range(3):
        metrics = json.load(open(os.path.join(out, "toy", "adapted", f"snapshot-10-k-2-seed-{seed}", "run", "metrics.json")))
        assert metrics["step"] == 3
    # the x axis: real tokens per pre-training step, recorded by the run
    per_step = results["pretraining"]["toy"]["final"]["tokens_per_step"]
    assert 0 < per_step <= TINY_PLAN["pretrain_batch_size"]["toy"] * experiments.MLM_MAX_LENGTH


def test_c1_is_decided_at_every_budget_against_scratch_and_tfidf_apart_from_its_headline(tiny_run):
    out, results, results_folder = tiny_run
    controls = ("k=2, 0 steps: from scratch", "k=2, no pre-training: TF-IDF + logistic regression")
    budget = [v for v in results["verdicts"] if "budget" in v and v["corpus"] == "toy"]
    assert [(v["budget"], v["b"]) for v in budget] == [(steps, other) for steps in (10, 20, 30) for other in controls]
    released = [v for v in results["verdicts"] if "released" in v and v["corpus"] == "toy"]
    assert [(v["a"], v["b"]) for v in released] == [("k=2, released another-run: pre-trained, full", other)
                                                    for other in controls]
    claims = json.load(open(os.path.join(results_folder, "claims.json")))
    assert all(not {"budget", "released"} & set(row) for row in claims["C1"]["rows"])  # the headline: C1's own table
    asks = {f"pre-trained full fine-tuning beats {what} (accuracy)" for what in ("from scratch", experiments.TFIDF)}
    asks |= {f"the released another-run, full, beats {what} (accuracy)" for what in ("from scratch", experiments.TFIDF)}
    assert {(point["corpus"], point["asks"]) for point in claims["C1"]["curve"]} == {
        (corpus, ask) for corpus in ("toy", "stdlib") for ask in asks}
    sentence = experiments.curve_sentence(claims)  # README's line
    verdict = "(holds|does not hold|not settled)"
    assert re.fullmatch(rf"tiny toy: k=2: scratch (from \S+ steps|from no budget), TF-IDF (from \S+ steps|from no budget), "
                        rf"another-run vs scratch {verdict}, another-run vs TF-IDF {verdict}\. "
                        r"tiny text: k=2: .*\.", sentence), sentence
    markdown = open(os.path.join(out, "results.md"), encoding="utf-8").read()
    assert "### C1 along the compute curve" in markdown
    if experiments.plot_c1_curve and os.path.exists(os.path.join(out, "labels_per_class.png")):  # matplotlib
        with open(os.path.join(out, "c1_compute_curve.png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_c1_starts_to_hold_at_the_smallest_budget_from_which_it_holds_at_every_larger_one():
    rng = np.random.default_rng(0)
    outcomes = [verdicts.HOLDS, verdicts.DOES_NOT_HOLD, verdicts.NOT_SETTLED]
    for _ in range(200):
        budgets = sorted(rng.choice(np.arange(1, 100), size=rng.integers(1, 6), replace=False).tolist())
        said = [outcomes[i] for i in rng.integers(0, 3, size=len(budgets))]
        rows = [{"claim": "C1", "corpus": "toy", "setting": f"toy k=16 at {b} steps", "budget": b,
                 "comparison": "beats", "verdict": v} for b, v in reversed(list(zip(budgets, said)))]
        (point,) = experiments.curve_summary(rows)
        assert point["verdicts"] == [[b, v] for b, v in zip(budgets, said)]
        expected = next((b for i, b in enumerate(budgets) if all(v == verdicts.HOLDS for v in said[i:])), None)
        assert point["holds_from"] == expected


def test_curve_snapshot_variants_thin_the_snapshots_at_the_ks_it_names_and_the_end_keeps_every_variant():
    plan = {**TINY_PLAN, "curve_labels_per_class": [2, "all"], "curve_snapshot_variants": {"all": ["full"]},
            "curve_variants": ["head", "full", "adapt-full"]}
    plan.pop("released_encoder", None)
    tables = experiments.curve_tables("toy", plan, {"final": None, "snapshot-10": None, "snapshot-20": None},
                                      lambda **spec: spec, lambda k: {"baseline": k})
    rows = {title: [setting for setting, _ in table_rows] for _, title, table_rows in tables}
    every = ["pre-trained, head only", "pre-trained, full", "+ task-adaptive MLM, full"]
    assert rows[f"{experiments.CURVE_TITLE} (k=2)"][1:-1] == [f"k=2, {steps} steps: {v}" for steps in (10, 20, 30) for v in every]
    assert rows[f"{experiments.CURVE_TITLE} (k=all)"][1:-1] == (
        ["k=all, 10 steps: pre-trained, full", "k=all, 20 steps: pre-trained, full"]
        + [f"k=all, 30 steps: {v}" for v in every])


@pytest.mark.skipif(torch.cuda.is_available(), reason="refused only where there is no CUDA GPU")
@pytest.mark.parametrize("name, twin", [("real-text-gpu", "real-text"), ("sentiment-text8-gpu", "sentiment-text8"),
                                        ("sentiment-text8-gpu-base", "sentiment-text8")])
def test_the_gpu_plans_refuse_to_start_on_a_machine_without_a_gpu_and_name_their_cpu_twin(cli, tmp_path, name, twin):
    assert_clear_error(cli("experiments", "--plan", name, "--out", tmp_path / "gpu"), name,
                       "no CUDA GPU", f"--plan {twin} ")
    assert not (tmp_path / "gpu").exists()


# ----------------------------------------------------------------------------------------
# Verdicts by rule, stamped results, fair budgets
# ----------------------------------------------------------------------------------------


def test_each_verdict_is_the_rule_applied_to_the_rows_per_seed_values(tiny_run):
    _, results, _ = tiny_run
    assert {v["claim"] for v in results["verdicts"]} >= {"C1", "C3", "C4", "C5", "C6", "C7"}  # C2: the tiny grid has no "few"
    rows = {(t["corpus"], row["setting"]): row for t in results["tables"] for row in t["rows"]}
    for v in results["verdicts"]:
        a, b = (rows[(v["corpus"], v[side])]["cells"].get(v["metric"]) for side in ("a", "b"))
        by_seed = [dict(zip(cell["seeds"], cell["values"])) if cell else {} for cell in (a, b)]
        assert v["verdict"] == verdicts.compare(*by_seed, v["margin"])["verdict"], v
        assert v["verdict"] in ("holds", "does not hold", "not settled", "not tested")


def test_results_files_open_with_the_stamp_and_record_the_settings(tiny_run):
    out, results, results_folder = tiny_run  # (OUT's results.md is rewritten by the resume test: only its opening is checked)
    written = json.load(open(os.path.join(results_folder, "tiny.json"), encoding="utf-8"))
    assert written["settings"] == json.loads(json.dumps(TINY_PLAN)) and written["verdicts"] == results["verdicts"]
    stamp = written["stamp"]
    assert re.fullmatch(r"[0-9a-f]{40}", stamp["commit"]) and stamp["dirty"] in (True, False)
    assert stamp["torch"] == torch.__version__ and stamp["machine"]["cpu"] and stamp["command"] and stamp["date"]
    assert written["wall_clock_seconds"] > 0
    markdown = open(os.path.join(results_folder, "tiny.md"), encoding="utf-8").read()
    assert markdown.startswith(f"Written by `{stamp['command']}` at commit {stamp['commit']}")
    assert "sample standard deviation" in markdown and "### Verdicts" in markdown
    assert open(os.path.join(out, "results.md"), encoding="utf-8").read().startswith("Written by `")  # OUT's copy too


def test_claims_json_lists_c1_to_c8_with_the_rows_each_verdict_rests_on(tiny_run):
    _, results, results_folder = tiny_run
    claims = json.load(open(os.path.join(results_folder, "claims.json"), encoding="utf-8"))
    assert list(claims) == [f"C{i}" for i in range(1, 9)]
    assert claims["C8"]["verdict"] == "not tested" and claims["C8"]["rows"] == []
    for entry in claims.values():
        several = len({row["plan"] for row in entry["rows"]}) > 1
        expected = verdicts.combine_groups([experiments.claim_group(row, several) + (row["verdict"],)
                                            for row in entry["rows"]])
        assert entry["verdict"] == expected or (expected == "not tested" and entry["verdict"] == "not settled (re-run pending)")


def test_readme_says_where_c1_starts_to_hold_along_the_compute_curve_as_claims_json_does():
    claims = json.load(open(os.path.join(ROOT, "results", "claims.json"), encoding="utf-8"))
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    if not claims["C1"].get("curve"):
        pytest.skip("no committed plan draws C1's compute curve yet")
    assert experiments.curve_sentence(claims) in text


def readme_claims_table():
    """README's "Claims at a glance": claim -> its verdict cell (the third column)."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split("## Claims at a glance", 1)[1].split("\n## ", 1)[0]
    cells = {}
    for line in section.splitlines():
        match = re.match(r"\| \[(C\d)\]\([^)]*\) \| [^|]* \| (.*) \|$", line)
        if match:
            cells[match.group(1)] = match.group(2)
    return cells


def test_readme_carries_the_verdicts_of_results_claims_json_word_for_word():
    claims = json.load(open(os.path.join(ROOT, "results", "claims.json"), encoding="utf-8"))
    assert readme_claims_table() == {claim: entry["verdict"] for claim, entry in claims.items()}


def test_claims_json_is_what_the_committed_plan_results_give():
    claims = json.load(open(os.path.join(ROOT, "results", "claims.json"), encoding="utf-8"))
    assert claims == json.loads(json.dumps(experiments.gather_claims(os.path.join(ROOT, "results"))))


COMMITTED = sorted(name for name in experiments.PLANS if os.path.exists(os.path.join(ROOT, "results", f"{name}.json")))
NOT_YET_RUN = sorted(set(experiments.PLANS) - set(COMMITTED))


@pytest.mark.parametrize("name", experiments.PLANS)
def test_a_committed_results_file_was_made_by_the_plan_as_it_is_today(name):
    if name in NOT_YET_RUN:
        pytest.skip(f"results/{name}.json is not committed yet: the plan has not been re-run on this code")
    written = json.load(open(os.path.join(ROOT, "results", f"{name}.json"), encoding="utf-8"))
    assert written["settings"] == json.loads(json.dumps(experiments.PLANS[name])), \
        f"plan {name} changed since results/{name}.json was made: re-run it"
    assert re.fullmatch(r"[0-9a-f]{40}", written["stamp"]["commit"])
    markdown = open(os.path.join(ROOT, "results", f"{name}.md"), encoding="utf-8").read()
    assert markdown.startswith(f"Written by `{written['stamp']['command']}` at commit {written['stamp']['commit']}")


@pytest.mark.parametrize("name", COMMITTED)
def test_a_committed_results_page_is_what_todays_code_renders_from_its_json(name):
    # a page written before a wording changed would say what the numbers no longer carry
    results = json.load(open(os.path.join(ROOT, "results", f"{name}.json"), encoding="utf-8"))
    render = experiments.c8_markdown if results["settings"].get("runner") == "c8" else experiments.markdown
    assert open(os.path.join(ROOT, "results", f"{name}.md"), encoding="utf-8").read() == render(results)


def test_every_variant_of_a_comparison_gets_the_same_budget_and_a_floor_of_epochs():
    quick = experiments.PLANS["quick"]
    # every label of real text (221 steps an epoch): never a single pass
    assert experiments.epochs_for(3525, quick) == quick["min_epochs"] == 5
    assert experiments.epochs_for(16 * 8, quick) == 15   # 8 steps an epoch: capped at max_epochs
    tables = experiments.tables_for("toy", quick, {"train": [("x", "a")] * 800}, {"final": None}, 2, 8)
    (c1,) = [rows for claim, _, rows in tables if claim == "C1"]
    for k in quick["labels_per_class"]:
        budgets = {spec["epochs"] for setting, spec in c1 if setting.startswith(f"k={k}:") and spec["method"] == "finetune"}
        assert len(budgets) == 1, (k, budgets)  # scratch, head, full: the same epochs


def test_c5_varies_the_documents_remedies_and_labels_the_extras():
    tables = experiments.tables_for("toy", experiments.PLANS["quick"], {"train": [("x", "a")] * 800}, {"final": None}, 2, 8)
    (c5,) = [{setting: spec for setting, spec in rows} for claim, _, rows in tables if claim == "C5"]
    assert {spec.get("weight_decay", 0.01) for spec in c5.values() if spec["method"] == "finetune"} >= {0.0, 0.01, 0.1}
    assert any(spec.get("dropout") for spec in c5.values())
    assert any(spec.get("schedule") == "cyclical" for setting, spec in c5.items() if setting.startswith("(c)"))
    for setting, spec in c5.items():  # L2-SP and layer-wise decay are not the document's (a) and (c)
        if spec.get("l2_sp") or spec.get("layer_lr_decay", 1.0) != 1.0:
            assert setting.startswith("extra, not the document's"), setting


def test_forgetting_is_also_measured_as_lost_fill_mask_accuracy(tiny_run):
    _, results, _ = tiny_run
    (c5,) = [t for t in results["tables"] if t["claim"] == "C5" and t["corpus"] == "toy"]
    for row in c5["rows"]:
        if not row["setting"].startswith("TF-IDF"):
            lost = row["cells"]["fill_mask_lost"]
            assert lost["n"] == 3 and all(-1.0 <= v <= 1.0 for v in lost["values"])
    (c3,) = [t for t in results["tables"] if t["claim"] == "C3" and t["corpus"] == "toy"]
    head = next(row for row in c3["rows"] if row["setting"].endswith("(--freeze head)"))
    assert head["cells"]["fill_mask_lost"]["values"] == [0.0, 0.0, 0.0]  # a frozen encoder loses nothing


def test_c4_pre_training_rates_record_the_largest_gradient_norm_with_and_without_clipping(tiny_run):
    _, results, _ = tiny_run
    (table,) = [t for t in results["tables"] if t["title"].startswith("pre-training learning rate")]
    settings = [row["setting"] for row in table["rows"]]
    assert settings == [f"pre-training lr {lr}, {clip}" for clip in ("clipped at norm 1", "no clipping") for lr in ("0.0001", "0.003")]
    for row in table["rows"]:
        assert all(norm > 0 for norm in row["cells"]["max_grad_norm"]["values"])


def test_cyclical_schedule_restarts_with_decaying_peaks_and_is_lowest_late():
    total, warmup, peak = 100, 10, 1e-3
    rates = [schedule.learning_rate(step, total, peak, warmup, "cyclical") for step in range(total)]
    assert rates[:warmup] == pytest.approx([peak * (s + 1) / warmup for s in range(warmup)])  # warmup as ever
    starts = [warmup + 30 * c for c in range(3)]  # three cycles of 30 steps
    for number, first in enumerate(starts):
        cycle = rates[first:first + 30]
        assert cycle[0] == pytest.approx(peak * 0.5 ** number)                  # each peak half the last
        assert all(later <= earlier for earlier, later in zip(cycle, cycle[1:]))  # annealed within a cycle
        assert cycle[-1] < 0.01 * cycle[0]
        if number:
            assert cycle[0] > rates[first - 1]                                   # a restart: the rate jumps up
    assert max(rates[starts[-1]:]) <= peak / 4 and max(rates) <= peak
    assert np.mean(rates[-30:]) < np.mean(rates[warmup:warmup + 30]) / 3      # lower late in training
    # the same warmup and the same end as cosine; constant stays at the peak
    assert schedule.learning_rate(total - 1, total, peak, warmup, "cosine") < 0.01 * peak
    assert schedule.learning_rate(total - 1, total, peak, warmup, "constant") == peak


def test_finetune_takes_schedule_cyclical_and_weight_decay_and_refuses_other_schedules(cli, labeled, tmp_path, monkeypatch):
    pre, train_tsv, _ = labeled
    decays, make_optimizer = [], train.make_optimizer
    monkeypatch.setattr(train, "make_optimizer", lambda model, lr, weight_decay=0.01, **kw:
                        decays.append(weight_decay) or make_optimizer(model, lr, weight_decay, **kw))
    code, _, stderr = cli("finetune", "--init", pre, "--train", train_tsv, "--out", tmp_path / "c", "--epochs", "1",
                          "--schedule", "cyclical", "--weight-decay", "0.2", "--device", "cpu")
    assert code == 0, stderr
    assert decays == [0.2]  # C5a: the flag reaches AdamW
    assert_clear_error(cli("finetune", "--init", pre, "--train", train_tsv, "--out", tmp_path / "d", "--schedule", "step"),
                       "--schedule", "cyclical")
    assert_clear_error(cli("finetune", "--init", pre, "--train", train_tsv, "--out", tmp_path / "e", "--weight-decay", "-1"),
                       "--weight-decay")
