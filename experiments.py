"""experiments.py -- every testable claim of the document (C1-C7) as a table with error bars.

    python ptft.py experiments --quick        (or: python experiments.py --quick)

Two corpora, the same protocol on each:
  toy     the embedded toy world (toyworld.toy_world): which of 8 topics a sentence is about.
  stdlib  real text: the docstrings of Python's standard library. The task: which of 8 areas of
          the library (GUI, concurrency, mail, web, imports, numbers, testing, files) a
          docstring documents. Train and test are split BY SOURCE FILE (no file in both), and
          the test files' docstrings are kept out of pre-training.

For each corpus: one pre-training run (E2/E4), with snapshots along the way so that the same
run serves C6's budget sweep; then many short fine-tuning runs (E3, train.fit_classifier) on
k labeled examples per class. Seed s draws the k examples AND seeds the fine-tuning, so every
row of a table sees the same draws (paired comparisons). A cell is the mean ± std over seeds.
Every table carries a non-neural baseline, TF-IDF + logistic regression: does pre-training
beat counting words?

Outputs in OUT:
  runs.jsonl    one line per finished run (fine-tuning or baseline); --resume skips them
  results.json  the tables: per row, per metric, mean / std / n and the values per seed
  results.md    the same as markdown, with the wall-clock

PLANS below is the only knob: the sizes of the full and the quick run (tests shrink a copy).
"""

import json
import math
import os
import time
import zlib

import numpy as np
import torch

import compress
import data
import deploy
import evaluation
import finetuning
import options
import toyworld
import train
from checkpoint import open_model, prepare_out_folder, write_json
from common import InputError
from model import count_parameters
from options import DistillOptions, FinetuneOptions, PretrainOptions, PruneOptions, Remedies
from tokenizer import split_words

# ----------------------------------------------------------------------------------------
# The plans. Pre-training dominates the time; fine-tuning runs take seconds. Each plan's
# wall-clock, measured and with its machine, is in docs/claims.md.
# ----------------------------------------------------------------------------------------

PLANS = {
    "full": dict(
        seeds=5,
        corpora=["toy", "stdlib"],
        toy_documents=20000,                     # the toy world's unlabeled documents (its default)
        toy_labeled=(64, 32, 100),               # its labeled sentences per class: train, valid, test
        stdlib_max_documents=None,               # None: every docstring
        pretrain_steps={"toy": 5000, "stdlib": 20000},
        pretrain_batch_size={"toy": 64, "stdlib": 8},
        snapshot_steps={"toy": [500, 1000, 1500, 2500], "stdlib": [1000, 3000, 10000]},
        eval_every={"toy": 250, "stdlib": 500},
        # C6's task variants are pre-trained this long: on the toy world the knee of the budget
        # curve (at 2500 steps every variant is near 100% and no choice could show)
        task_choice_steps={"toy": 1500, "stdlib": 10000},
        tables={"toy": ["C1", "C2", "C3", "C4", "C5", "C6"], "stdlib": ["C1", "C2", "C3", "C4", "C5", "C6"]},
        labels_per_class=[4, 16, 64, "all"],
        c1_variants={"toy": ["scratch", "head", "head-mean", "top-2", "full"],
                     "stdlib": ["scratch", "head", "head-mean", "top-2", "full"]},
        k=16,                                    # labels per class in the tables after C1
        finetune_steps=240,                      # about this many steps per run (see epochs_for)
        max_epochs=30,
        epoch_grid=[1, 2, 5, 10, 30],
        lr_grid=[2e-5, 5e-5, 1e-4, 3e-4, 1e-3],
        l2_sp=0.01, aux_mlm=1.0, layer_lr_decay=0.5,    # C5's remedies, at one strength each
        forgetting_batches=8,
    ),
}
# The quick plan: the same protocol, smaller (3 seeds, ~120 fine-tuning steps per run), sized
# for a quarter of an hour on 2 CPU cores. Not less toy pre-training: before ~2500 steps the toy
# world's C1 gain is mostly not there yet (C6's budget table shows the knee). Real
# text gets C1 and C6's budget sweep, at a budget too small for a gain (that is the real-text
# plan's job); C6's task choices (MLM only, 30% masking, 100% [MASK]) run in the full and
# task-choices plans.
PLANS["quick"] = {
    **PLANS["full"],
    "seeds": 3,
    "pretrain_steps": {"toy": 2500, "stdlib": 3000},
    "snapshot_steps": {"toy": [500, 1000, 1500], "stdlib": [1000, 2000]},
    "task_choice_steps": {"toy": None, "stdlib": None},
    "tables": {"toy": ["C1", "C2", "C3", "C4", "C5", "C6"], "stdlib": ["C1", "C6"]},
    "c1_variants": {"toy": ["scratch", "head", "head-mean", "top-2", "full"], "stdlib": ["scratch", "head", "head-mean", "full"]},
    "finetune_steps": 120,
    "max_epochs": 15,
    "epoch_grid": [1, 3, 10, 15],
    "lr_grid": [2e-5, 5e-5, 3e-4, 1e-3],
    "forgetting_batches": 4,
}

# C6's task choices alone, on the toy world: what the quick plan
# leaves out, pre-trained 1500 steps each as in the full plan.
PLANS["task-choices"] = {
    **PLANS["quick"],
    "corpora": ["toy"],
    "tables": {"toy": ["C6"], "stdlib": []},
    "task_choice_steps": {"toy": 1500, "stdlib": None},
}

# Real text only, pre-trained twice as long as the full plan (40000 steps):
# where on the budget curve, if anywhere, pre-training starts to beat scratch and counting words.
PLANS["real-text"] = {
    **PLANS["full"],
    "seeds": 3,
    "corpora": ["stdlib"],
    "pretrain_steps": {"toy": None, "stdlib": 40000},
    "snapshot_steps": {"toy": [], "stdlib": [5000, 10000, 20000, 30000]},
    "task_choice_steps": {"toy": None, "stdlib": None},
    "tables": {"toy": [], "stdlib": ["C1", "C4", "C6"]},
    "c1_variants": {"toy": [], "stdlib": ["scratch", "head", "head-mean", "full"]},
}

# Real text at GPU scale: the `small` encoder on the stdlib docstrings plus the installed packages'
# docstrings (data.package_docstrings), about 10 minutes of pre-training on one GPU (an estimate:
# not yet run on one); then C1 with mean pooling and task-adaptive rows, and C6's budget sweep. On a
# CPU it would take hours, so it refuses to start there.
PLANS["real-text-gpu"] = {
    **PLANS["real-text"],
    "needs_gpu": True,
    "pretrain_config": "small",
    "extra_text": "packages",
    "pretrain_steps": {"toy": None, "stdlib": 20000},
    "pretrain_batch_size": {"toy": 64, "stdlib": 128},
    "snapshot_steps": {"toy": [], "stdlib": [2500, 5000, 10000]},
    "eval_every": {"toy": 250, "stdlib": 1000},
    "tables": {"toy": [], "stdlib": ["C1", "C6"]},
    "c1_variants": {"toy": [], "stdlib": ["scratch", "head", "head-mean", "adapt-head-mean", "full", "adapt-full"]},
    "adapt_steps": 500,
}

# C1 with task-adaptive pre-training (finetuning.adapt_to_task), on real text: the general
# pre-training, then adapt_steps more MLM steps on the k labeled texts themselves, without labels.
PLANS["task-adaptive"] = {
    **PLANS["quick"],
    "corpora": ["stdlib"],
    "pretrain_steps": {"toy": None, "stdlib": 10000},
    "snapshot_steps": {"toy": [], "stdlib": []},
    "tables": {"toy": [], "stdlib": ["C1", "C3"]},
    "labels_per_class": [16, "all"],
    "c1_variants": {"toy": [], "stdlib": ["scratch", "head", "head-mean", "adapt-head-mean", "full", "adapt-full"]},
    "adapt_steps": 500,
    "finetune_steps": 1100,                      # 15 epochs at k=16, 5 over every label
}

# C7 alone, on both corpora: one teacher per seed (full fine-tuning on k labels per class) and
# every remedy of compress.py made from it, through the commands users run.
PLANS["c7"] = {
    **PLANS["quick"],
    "pretrain_steps": {"toy": 2500, "stdlib": 10000},
    "snapshot_steps": {"toy": [], "stdlib": []},
    "tables": {"toy": ["C7"], "stdlib": ["C7"]},
    # real text at k=16 leaves the teacher near chance (~18%); with every label it has something to lose
    "c7_labels_per_class": {"toy": 16, "stdlib": "all"},
    # 15 epochs at k=16 on the toy world, 10 over all of real text's labels: a teacher trained to
    # convergence, so that the remedies' own training (recovery, distillation) has nothing to add
    "finetune_steps": 2200,
}
for plan in PLANS.values():
    plan.setdefault("c7_remedies", ["teacher", "head", "lora-4", "int8", "int8-arithmetic", "pruned-50", "pruned-50+int8",
                                    "ffn-50", "distilled", "distilled+int8"])
    plan.setdefault("c7_unlabeled", 2000)        # the distillation transfer set: unlabeled sentences
    plan.setdefault("c7_recovery_epochs", 3)     # fine-tuning after pruning
    plan.setdefault("c7_timing_seconds", 1.0)    # CPU inference timed this long per batch size

# Default learning rates of fine-tuning: options.DEFAULT_FINETUNE_LR (head 1e-3, full 3e-4).
HEAD_LR, FULL_LR = options.DEFAULT_FINETUNE_LR["head"], options.DEFAULT_FINETUNE_LR["none"]
CLASSIFIER_MAX_LENGTH = 64   # tokens per labeled text, [CLS] and [SEP] included
MLM_MAX_LENGTH = 64          # tokens per pre-training / forgetting sequence
AUX_BATCH_SIZE = 8           # unlabeled sequences per fine-tuning step with --aux-mlm

# ----------------------------------------------------------------------------------------
# The two tasks
# ----------------------------------------------------------------------------------------

# Area of the standard library -> path prefixes (relative to the stdlib folder).
STDLIB_AREAS = {
    "gui": ("tkinter/", "turtle.py"),
    "concurrency": ("asyncio/", "multiprocessing/", "concurrent/", "threading.py", "queue.py", "sched.py"),
    "mail": ("email/", "mailbox.py", "imaplib.py", "smtplib.py", "poplib.py", "nntplib.py", "mailcap.py"),
    "web": ("http/", "urllib/", "wsgiref/", "xmlrpc/", "html/", "ftplib.py", "socketserver.py", "cgi.py"),
    "imports": ("importlib/", "distutils/", "pkgutil.py", "zipimport.py", "modulefinder.py", "runpy.py"),
    "numbers": ("_pydecimal.py", "fractions.py", "statistics.py", "numbers.py", "random.py", "datetime.py"),
    "testing": ("unittest/", "doctest.py", "pdb.py", "bdb.py", "trace.py", "profile.py", "cProfile.py", "timeit.py"),
    "files": ("tarfile.py", "zipfile", "pathlib.py", "shutil.py", "_pyio.py", "gzip.py", "bz2.py", "lzma.py",
              "tempfile.py", "glob.py", "fnmatch.py", "filecmp.py"),
}


def stdlib_area(path):
    return next((area for area, prefixes in STDLIB_AREAS.items() if path.startswith(prefixes)), None)


def stdlib_task(max_documents=None, test_fraction=0.3):
    """Docstrings -> {unlabeled, train, test}. A labeled text is a docstring's first 3 lines
    (its summary). Per area, whole files go to the test split until it holds ~30% of the
    area's docstrings; the pre-training text is every docstring NOT from a test file."""
    docstrings = data.stdlib_docstrings()
    if max_documents:
        docstrings = docstrings[:: max(1, len(docstrings) // max_documents)]
    rng = np.random.default_rng(0)
    test_files = set()
    for area in STDLIB_AREAS:
        counts = {}
        for path, _ in docstrings:
            if stdlib_area(path) == area:
                counts[path] = counts.get(path, 0) + 1
        files, in_test = sorted(counts), 0
        for i in rng.permutation(len(files)):
            if in_test + counts[files[i]] <= test_fraction * sum(counts.values()):
                test_files.add(files[i])
                in_test += counts[files[i]]
    labeled = {"train": [], "test": []}
    for path, lines in docstrings:
        area = stdlib_area(path)
        if area:
            labeled["test" if path in test_files else "train"].append((" ".join(lines[:3]), area))
    train_texts = {text for text, _ in labeled["train"]}
    test = [(text, area) for text, area in labeled["test"] if text not in train_texts]  # no text in both
    unlabeled = [lines for path, lines in docstrings if path not in test_files]
    return {"unlabeled": unlabeled, "train": labeled["train"], "test": test}


def package_text(task):
    """The installed packages' docstrings (data.package_docstrings) as more pre-training text for
    the stdlib task, minus any docstring whose summary is a test text (a package may vendor a
    copy of a standard-library module)."""
    test_texts = {text for text, _ in task["test"]}
    return [lines for _, lines in data.package_docstrings() if " ".join(lines[:3]) not in test_texts]


def toy_task(num_documents, labeled_per_class):
    """The toy world: pre-train on its unlabeled documents; its train + valid sentences are the
    pool the k labeled examples are drawn from; its test sentences are the test set."""
    world = toyworld.toy_world(seed=0, num_documents=num_documents, labeled_per_class=labeled_per_class)
    return {"unlabeled": world["unlabeled"], "train": world["train"] + world["valid"], "test": world["test"]}


def draw_labeled(examples, k, seed):
    """k examples per class ('all': every one), a different draw for every seed."""
    if k == "all":
        return examples
    rng = np.random.default_rng(1000 + seed)
    chosen = []
    for label in sorted({y for _, y in examples}):
        pool = [i for i, (_, y) in enumerate(examples) if y == label]
        chosen += sorted(rng.choice(pool, size=min(k, len(pool)), replace=False))
    return [examples[i] for i in chosen]


# ----------------------------------------------------------------------------------------
# The non-neural baseline: TF-IDF + logistic regression (numpy / torch, no sklearn)
# ----------------------------------------------------------------------------------------


def tfidf_logistic_regression(train_texts, train_labels, test_texts, num_classes, max_words=5000, steps=200,
                              l2=1e-3):
    """Counts of words, weighted by rarity, then a linear softmax classifier. Returns test predictions.

        tfidf(w, x) = count(w in x) * (ln((1 + n) / (1 + df(w))) + 1),  each row scaled to length 1

    n: training texts, df(w): training texts containing w. Words: the same basic tokenizer as
    BERT's (tokenizer.split_words). The classifier: softmax(W x + b), cross-entropy + l2 * ||W||^2,
    full-batch Adam -- a convex problem, so the optimizer matters little."""
    train_words = [split_words(text) for text in train_texts]
    document_frequency = {}
    for words in train_words:
        for word in set(words):
            document_frequency[word] = document_frequency.get(word, 0) + 1
    vocabulary = sorted(document_frequency, key=lambda w: (-document_frequency[w], w))[:max_words]
    index = {word: i for i, word in enumerate(vocabulary)}
    idf = np.array([math.log((1 + len(train_texts)) / (1 + document_frequency[w])) + 1 for w in vocabulary])

    def features(word_lists):
        x = np.zeros((len(word_lists), len(vocabulary)), dtype=np.float32)
        for row, words in enumerate(word_lists):
            for word in words:
                if word in index:
                    x[row, index[word]] += 1
        x *= idf
        return torch.from_numpy(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))

    x_train, y_train = features(train_words), torch.tensor(train_labels)
    weight = torch.zeros(len(vocabulary), num_classes, requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.1)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(x_train @ weight + bias, y_train) + l2 * (weight ** 2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return (features([split_words(text) for text in test_texts]) @ weight + bias).argmax(-1).numpy()


# ----------------------------------------------------------------------------------------
# Pre-training runs (one per corpus, plus C6's task-choice variants)
# ----------------------------------------------------------------------------------------

# C6's task choices: PretrainOptions fields that differ from the standard recipe
# (MLM + NSP, 15% of tokens selected, 80/10/10 [MASK]/random/unchanged).
TASK_CHOICES = {
    "mlm-only": dict(nsp=False),
    "mask-30": dict(mask_probability=0.30),
    "all-mask": dict(mask_token_fraction=1.0, random_token_fraction=0.0),
}


def pretrain_encoders(out, corpus, task, plan, resume, log):
    """Pre-train on the task's unlabeled text -> {encoder name: (checkpoint path, held-out MLM
    loss at the end, seconds)}. Names: 'final', 'snapshot-N', and C6's task choices."""
    folder = os.path.join(out, corpus)
    os.makedirs(folder, exist_ok=True)
    unlabeled_path = os.path.join(folder, "unlabeled.txt")
    data.write_corpus(unlabeled_path, task["unlabeled"])
    steps, snapshots = plan["pretrain_steps"][corpus], plan["snapshot_steps"][corpus]
    runs = {"final": ("pretrain", steps, {})}
    if plan["task_choice_steps"][corpus] and "C6" in plan["tables"][corpus]:
        for name, choice in TASK_CHOICES.items():
            runs[name] = (f"pretrain-{name}", plan["task_choice_steps"][corpus], choice)
    encoders = {}
    for name, (run_folder, run_steps, choice) in runs.items():
        path = os.path.join(folder, run_folder)
        if not (resume and os.path.exists(os.path.join(path, "metrics.json"))):
            log(f"[{corpus}] pre-training '{name}' for {run_steps} steps {choice or ''}")
            # no dropout: at these budgets the model under-fits; dropout would only slow it down
            recipe = PretrainOptions(corpus=[unlabeled_path], steps=run_steps, batch_size=plan["pretrain_batch_size"][corpus],
                                     config=plan.get("pretrain_config", "tiny"),
                                     max_length=MLM_MAX_LENGTH, lr=1e-3, dropout=0.0, save_every=0,
                                     vocab_size=2048 if corpus == "toy" else 8192, eval_every=plan["eval_every"][corpus],
                                     snapshot_steps=tuple(snapshots) if name == "final" else (), **choice)
            train.pretrain(path, recipe, force=True, log=log, progress=False)
        with open(os.path.join(path, "metrics.json")) as f:
            metrics = json.load(f)
        encoders[name] = (os.path.join(path, "checkpoint.pt"), metrics["held_out_mlm_loss"], metrics["seconds"])
        if name == "final":
            for step in snapshots:
                if step < steps:
                    encoders[f"snapshot-{step}"] = (os.path.join(path, f"snapshot-{step}.pt"), None, None)
    return encoders


# ----------------------------------------------------------------------------------------
# One run: fine-tuning (or the baseline) on k labels per class, one seed
# ----------------------------------------------------------------------------------------


def epochs_for(num_examples, plan, batch_size=16):
    """About plan['finetune_steps'] steps: many epochs on a few labels, few on many."""
    steps_per_epoch = math.ceil(num_examples / batch_size)
    return int(min(plan["max_epochs"], max(1, round(plan["finetune_steps"] / steps_per_epoch))))


class Loaded:
    """A pre-trained checkpoint, opened once: config, tokenizer, weights and, with
    forgetting_batches > 0, its unlabeled text (data.pretraining_text): held-out batches
    measure forgetting, the rest feeds --aux-mlm."""

    def __init__(self, path, forgetting_batches=0):
        self.path = path
        model, self.tokenizer, checkpoint = open_model(path)
        self.config = model.config
        self.encoder_state = model.encoder.state_dict()
        self.pretrained_state = model.state_dict()
        self.training_documents, self.held_out = None, None
        if forgetting_batches:
            self.training_documents, held_out_documents = data.pretraining_text(checkpoint.get("run", {}).get("corpus"))
            self.held_out = data.held_out_batches(data.encode_documents(self.tokenizer, held_out_documents), self.tokenizer,
                                                  MLM_MAX_LENGTH, use_nsp=False, batch_size=32, num_batches=forgetting_batches)
        self.encoded_training_documents = None  # encoded when --aux-mlm first needs them
        self.rows = {}  # tokenized labeled texts -> their token ids

    def starting_point(self, finetune_options):
        """train.StartingPoint: the pre-trained encoder, and the MLM parts C5 needs."""
        aux_batches = None
        if finetune_options.remedies.aux_mlm:
            if self.encoded_training_documents is None:
                self.encoded_training_documents = data.encode_documents(self.tokenizer, self.training_documents)
            aux_batches = data.mlm_batch_stream(self.encoded_training_documents, self.tokenizer, AUX_BATCH_SIZE,
                                                MLM_MAX_LENGTH, finetune_options.seed)
        return train.StartingPoint(self.encoder_state, self.pretrained_state, self.held_out, aux_batches)

    def inputs(self, texts):
        key = tuple(texts)
        if key not in self.rows:
            self.rows[key] = data.classification_inputs(self.tokenizer, texts, CLASSIFIER_MAX_LENGTH, warn=lambda *a: None)
        return self.rows[key]


ADAPTED = {}  # folder -> Loaded: each draw's adapted encoder, opened once


def adapted(loaded, texts, spec, folder):
    """The encoder of `loaded` after spec['adapt_steps'] steps of MLM on `texts` (finetuning.adapt_to_task)."""
    if folder not in ADAPTED:
        run = os.path.join(folder, "run")
        if not os.path.exists(os.path.join(run, "metrics.json")):
            finetuning.adapt_to_task(folder, loaded.path, texts, FinetuneOptions(adapt_steps=spec["adapt_steps"], seed=spec["seed"],
                                                                            mlm_max_length=MLM_MAX_LENGTH), log=lambda *a: None)
        ADAPTED[folder] = Loaded(os.path.join(run, "checkpoint.pt"))
    return ADAPTED[folder]


def fine_tune_and_score(source, labeled, label_names, test_sets, finetune_options, pretrained=True):
    """E3 on `labeled` ((text, label) pairs): from source's pre-trained encoder or, pretrained=False,
    from a random initialisation of the same architecture and vocabulary (C1's baseline); then
    scored on each test set (name -> (text, label) pairs). Returns (info, {name: metrics}).
    The demo (ptft.py) and every table here fit and score their variants with this."""
    labels = data.encode_labels([y for _, y in labeled], label_names, "train")
    start = source.starting_point(finetune_options) if pretrained else None
    model, info = train.fit_classifier(source.inputs([text for text, _ in labeled]), labels, len(label_names), source.config,
                                       finetune_options, start=start, pad_id=source.tokenizer.pad_id)
    device = options.pick_device(finetune_options.device)
    scores = {name: evaluation.classify(model, source.inputs([text for text, _ in examples]),
                                   data.encode_labels([y for _, y in examples], label_names, name), device,
                                   pad_id=source.tokenizer.pad_id)
              for name, examples in test_sets.items() if examples}
    return info, scores


def finetune_run(spec, task, loaded, scratch_source, folder=None):
    """One line of runs.jsonl: fine-tune per spec, score on the task's test set (C7: c7_run)."""
    label_names = sorted({y for _, y in task["train"]})
    labeled = draw_labeled(task["train"], spec["k"], spec["seed"])
    if spec["method"] == "c7":
        return c7_run(spec, task, loaded, folder)
    if spec.get("adapt_steps"):  # task-adaptive: continue MLM on these labeled texts first (one run per draw)
        loaded = adapted(loaded, [text for text, _ in labeled], spec, os.path.join(folder, "adapted", f"k-{spec['k']}-seed-{spec['seed']}"))
    if spec["method"] == "tfidf":
        started = time.time()
        train_labels = data.encode_labels([y for _, y in labeled], label_names, "train")
        test_labels = data.encode_labels([y for _, y in task["test"]], label_names, "test")
        predictions = tfidf_logistic_regression([text for text, _ in labeled], train_labels,
                                                [text for text, _ in task["test"]], len(label_names))
        return {"accuracy": float(np.mean(predictions == np.array(test_labels))), "seconds": time.time() - started}
    recipe = FinetuneOptions(freeze=spec["freeze"], epochs=spec["epochs"], lr=spec["lr"], warmup_fraction=spec["warmup"],
                             schedule=spec["schedule"], seed=spec["seed"], pool=spec.get("pool", "cls"),
                             remedies=Remedies(spec["l2_sp"], spec["aux_mlm"], spec["layer_lr_decay"]))
    # scratch: the same architecture and vocabulary, a random initialisation (C1's baseline)
    pretrained = spec["encoder"] != "scratch"
    info, scores = fine_tune_and_score(loaded if pretrained else scratch_source, labeled, label_names,
                                       {"test": task["test"]}, recipe, pretrained)
    result = {"accuracy": scores["test"]["accuracy"], "seconds": info["seconds"],
              "trainable_parameters": info["trainable_parameters"]}
    for key in ("mlm_loss_before", "mlm_loss_after", "forgetting"):
        if key in info:
            result[key] = info[key]
    return result


# C7's rows: each remedy's run folder, made from one teacher per seed by compress.py's commands
C7_NAMES = {"teacher": "teacher: pre-trained, full fine-tuning", "head": "head only (--freeze head)",
            "lora-4": "LoRA, rank 4 (--lora 4)", "int8": "teacher, int8 (quantize)",
            "pruned-50": "teacher, 50% of weights pruned + recovery (prune)",
            "int8-arithmetic": "teacher, int8, computed in int8 (PyTorch's dynamic quantisation kernels)",
            "pruned-50+int8": "pruned 50%, then int8", "ffn-50": "teacher, 50% of feed-forward units removed + recovery",
            "distilled": "distilled into half the layers (distill, every-other init, unlabeled transfer set)",
            "distilled+int8": "distilled, then int8"}


def c7_run(spec, task, loaded, folder):
    """One remedy on one seed, through the commands users run (finetuning.finetune, deploy.*), in
    folder/c7/k-K-seed-S/NAME. The teacher is fine-tuned once per seed (everything trains, k labels
    per class); every other remedy is made from it (or, head and LoRA, beside it). Measured:
    test accuracy, parameters, bytes of checkpoint.pt (and zipped), the bytes a task adds to a
    shared pre-trained encoder, and CPU sentences per second at batch 1 and 32."""
    seed, quiet = spec["seed"], (lambda *args: None)
    seed_folder = os.path.join(folder, "c7", f"k-{spec['k']}-seed-{seed}")
    os.makedirs(seed_folder, exist_ok=True)
    train_tsv = os.path.join(seed_folder, "train.tsv")  # the draw the commands read (the test set is scored in memory)
    data.write_tsv(train_tsv, draw_labeled(task["train"], spec["k"], seed))

    def made(name):
        path = os.path.join(seed_folder, name)
        if os.path.exists(os.path.join(path, "metrics.json")):
            return path
        tuned = dict(init=loaded.path, train=train_tsv, epochs=spec["epochs"], seed=seed, device="cpu")
        recovery = dict(train=train_tsv, epochs=spec["recovery_epochs"], seed=seed, device="cpu")
        if name.endswith("int8"):  # "int8": the teacher quantised; "X+int8": X quantised
            deploy.quantize(path, made(name[:-len("+int8")] if "+" in name else "teacher"), force=True, log=quiet)
        elif name == "teacher":
            finetuning.finetune(path, FinetuneOptions(lr=FULL_LR, **tuned), force=True, log=quiet, progress=False)
        elif name == "head":
            finetuning.finetune(path, FinetuneOptions(freeze="head", lr=HEAD_LR, **tuned), force=True, log=quiet, progress=False)
        elif name.startswith("lora-"):
            finetuning.finetune(path, FinetuneOptions(lora=int(name[5:]), lr=HEAD_LR, **tuned), force=True, log=quiet, progress=False)
        elif name.startswith(("pruned-", "ffn-")):
            unit, percent = ("weights", name[7:]) if name.startswith("pruned-") else ("ffn-units", name[4:])
            deploy.prune(path, PruneOptions(init=made("teacher"), sparsity=int(percent) / 100, unit=unit, **recovery),
                           force=True, log=quiet, progress=False)
        elif name == "distilled":
            deploy.distill(path, DistillOptions(teacher=made("teacher"), train=train_tsv, seed=seed, device="cpu",
                                                  unlabeled=[os.path.join(folder, "unlabeled.txt")],
                                                  max_unlabeled=spec["unlabeled"]), force=True, log=quiet, progress=False)
        else:
            raise ValueError(f"unknown C7 remedy {name!r}")
        return path

    arithmetic = spec["remedy"] == "int8-arithmetic"  # the int8 run, computed with int8 matmuls
    path = made("int8" if arithmetic else spec["remedy"])
    model, tokenizer, checkpoint = open_model(path, quiet)
    parameters = count_parameters(model)  # the int8 layers' weights are no longer nn.Parameters
    model = compress.with_int8_arithmetic(model) if arithmetic else model
    if model is None:
        return {}  # this torch has no int8 kernels: the row stays empty
    with open(os.path.join(path, "metrics.json")) as f:
        metrics = json.load(f)
    checkpoint_path = os.path.join(path, "checkpoint.pt")
    with open(checkpoint_path, "rb") as f:
        zipped = len(zlib.compress(f.read(), 6))
    shares_encoder = spec["remedy"] == "head" or spec["remedy"].startswith("lora-")
    test_rows = data.classification_inputs(tokenizer, [text for text, _ in task["test"]], CLASSIFIER_MAX_LENGTH, warn=quiet)
    test_labels = data.encode_labels([y for _, y in task["test"]], checkpoint["labels"], "test")
    return {"accuracy": evaluation.classify(model, test_rows, test_labels, "cpu", pad_id=tokenizer.pad_id)["accuracy"],
            "parameters": parameters,
            "bytes_on_disk": os.path.getsize(checkpoint_path), "bytes_zipped": zipped,
            "task_bytes": metrics["task_bytes"] if shares_encoder else os.path.getsize(checkpoint_path),
            **{f"sentences_per_second_{size}": deploy.sentences_per_second(model, test_rows[:256], size, tokenizer.pad_id,
                                                                              seconds=spec["timing_seconds"])
               for size in (1, 32)}}


# ----------------------------------------------------------------------------------------
# The tables: each row is (claim, setting, the run it repeats over seeds)
# ----------------------------------------------------------------------------------------


def tables_for(corpus, plan, task, encoders, num_layers, num_classes):
    k = plan["k"]
    epochs = epochs_for(k * num_classes, plan)

    def finetune_spec(**changes):
        spec = dict(method="finetune", corpus=corpus, encoder="final", k=k, freeze="none", lr=FULL_LR,
                    epochs=epochs, schedule="cosine", warmup=0.1, l2_sp=0.0, aux_mlm=0.0, layer_lr_decay=1.0)
        spec.update(changes)
        if spec["k"] != k and "epochs" not in changes:
            size = len(task["train"]) if spec["k"] == "all" else spec["k"] * num_classes
            spec["epochs"] = epochs_for(size, plan)
        return spec

    def baseline(k_value=k):
        return dict(method="tfidf", corpus=corpus, k=k_value)

    scratch, head, full = finetune_spec(encoder="scratch"), finetune_spec(freeze="head", lr=HEAD_LR), finetune_spec()
    tables = []
    if "C1" in plan["tables"][corpus]:
        rows = []
        variants = {"scratch": ("from scratch", dict(encoder="scratch")),
                    "head": ("pre-trained, head only", dict(freeze="head", lr=HEAD_LR)),
                    "head-mean": ("pre-trained, head only, mean pooling", dict(freeze="head", lr=HEAD_LR, pool="mean")),
                    "top-2": ("pre-trained, top-2 + head", dict(freeze="top-2", lr=HEAD_LR)),
                    "full": ("pre-trained, full", {}),
                    "adapt-head-mean": ("+ task-adaptive MLM, head only, mean pooling",
                                        dict(freeze="head", lr=HEAD_LR, pool="mean", adapt_steps=plan.get("adapt_steps"))),
                    "adapt-full": ("+ task-adaptive MLM, full", dict(adapt_steps=plan.get("adapt_steps")))}
        for k_value in plan["labels_per_class"]:
            rows += [(f"k={k_value}: {variants[v][0]}", finetune_spec(k=k_value, **variants[v][1]))
                     for v in plan["c1_variants"][corpus]]
            rows.append((f"k={k_value}: TF-IDF + logistic regression", baseline(k_value)))
        tables.append(("C1", "labels per class: pre-trained vs from scratch", rows))
    if "C2" in plan["tables"][corpus]:
        rows = []
        for name, spec in (("pre-trained, full", full), ("pre-trained, head only", head), ("from scratch", scratch)):
            rows += [(f"{name}, {e} epochs", {**spec, "epochs": e}) for e in plan["epoch_grid"]]
        tables.append(("C2", f"accuracy vs fine-tuning epochs (k={k})", rows + [("TF-IDF + logistic regression", baseline())]))
    if "C3" in plan["tables"][corpus]:
        rows = []
        for frozen in range(num_layers + 1):
            freeze = "none" if frozen == 0 else "head" if frozen == num_layers else f"top-{num_layers - frozen}"
            rows.append((f"{frozen} of {num_layers} layers frozen (--freeze {freeze})",
                         finetune_spec(freeze=freeze, lr=HEAD_LR if frozen else FULL_LR)))
        rows.insert(1, (f"embeddings frozen (--freeze top-{num_layers})", finetune_spec(freeze=f"top-{num_layers}", lr=HEAD_LR)))
        rows.append((f"{num_layers} of {num_layers} layers frozen, mean pooling (--freeze head --pool mean)",
                     finetune_spec(freeze="head", lr=HEAD_LR, pool="mean")))
        tables.append(("C3", f"freezing depth (k={k})", rows + [("TF-IDF + logistic regression", baseline())]))
    if "C4" in plan["tables"][corpus]:
        rows = [(f"head only, lr {lr:g}", {**head, "lr": lr}) for lr in plan["lr_grid"]]
        rows += [(f"full, lr {lr:g}", {**full, "lr": lr}) for lr in plan["lr_grid"]]
        rows += [(f"full, lr {FULL_LR:g}, no warmup", {**full, "warmup": 0.0}),
                 (f"full, lr {FULL_LR:g}, constant (no cosine)", {**full, "schedule": "constant"})]
        tables.append(("C4", f"learning rate, warmup, schedule (k={k})", rows + [("TF-IDF + logistic regression", baseline())]))
    if "C5" in plan["tables"][corpus]:
        remedies = dict(l2_sp=plan["l2_sp"], aux_mlm=plan["aux_mlm"], layer_lr_decay=plan["layer_lr_decay"])
        rows = [(f"full fine-tuning, lr {FULL_LR:g}, cosine (no remedy)", full),
                (f"(a) --l2-sp {plan['l2_sp']:g}", {**full, "l2_sp": plan["l2_sp"]}),
                (f"(b) --aux-mlm {plan['aux_mlm']:g}", {**full, "aux_mlm": plan["aux_mlm"]}),
                (f"(c) --layer-lr-decay {plan['layer_lr_decay']:g}", {**full, "layer_lr_decay": plan["layer_lr_decay"]}),
                ("(c) the other way: constant lr, no late lowering", {**full, "schedule": "constant"}),
                (f"(d) --freeze top-1 (lr {FULL_LR:g})", {**full, "freeze": "top-1"}),
                ("(a) + (b) + (c) combined", {**full, **remedies})]
        tables.append(("C5", f"forgetting: remedies for full fine-tuning (k={k})", rows + [("TF-IDF + logistic regression", baseline())]))
    if "C6" in plan["tables"][corpus]:
        rows = [("0 steps (from scratch)", scratch)]
        rows += [(f"{name.split('-')[1]} steps", {**full, "encoder": name}) for name in encoders if name.startswith("snapshot-")]
        rows.append((f"{plan['pretrain_steps'][corpus]} steps", full))
        choice_steps = plan["task_choice_steps"][corpus]
        if choice_steps and any(name in encoders for name in TASK_CHOICES):
            reference = "final" if choice_steps == plan["pretrain_steps"][corpus] else f"snapshot-{choice_steps}"
            rows += [(f"{choice_steps} steps, MLM + NSP, 15%, 80/10/10 (reference)", {**full, "encoder": reference}),
                     (f"{choice_steps} steps, MLM only (no NSP)", {**full, "encoder": "mlm-only"}),
                     (f"{choice_steps} steps, 30% masked", {**full, "encoder": "mask-30"}),
                     (f"{choice_steps} steps, 100% [MASK] (no 80/10/10)", {**full, "encoder": "all-mask"})]
        tables.append(("C6", f"pre-training budget and task choices, full fine-tuning (k={k})",
                       rows + [("TF-IDF + logistic regression", baseline())]))
    if "C7" in plan["tables"][corpus]:
        c7_k = plan.get("c7_labels_per_class", {}).get(corpus, k)
        size = len(task["train"]) if c7_k == "all" else c7_k * num_classes
        rows = [(C7_NAMES[name], dict(method="c7", corpus=corpus, remedy=name, k=c7_k, epochs=epochs_for(size, plan),
                                      recovery_epochs=plan["c7_recovery_epochs"], unlabeled=plan["c7_unlabeled"],
                                      timing_seconds=plan["c7_timing_seconds"]))
                for name in plan["c7_remedies"]]
        tables.append(("C7", f"smaller, cheaper models from one fine-tuned teacher per seed (k={c7_k})", rows))
    return tables


# ----------------------------------------------------------------------------------------
# Running everything, with runs.jsonl as the memory (--resume)
# ----------------------------------------------------------------------------------------


def summarize(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values), "values": values}


# The columns of each claim's table (keys of a run's result; the markdown shows those present)
COLUMNS = {"C1": ["accuracy", "seconds"], "C2": ["accuracy", "seconds"],
           "C3": ["accuracy", "trainable_parameters", "seconds", "forgetting"],
           "C4": ["accuracy", "forgetting", "seconds"], "C5": ["accuracy", "forgetting", "seconds"],
           "C6": ["mlm_loss_before", "accuracy", "seconds"],
           "C7": ["accuracy", "parameters", "bytes_on_disk", "bytes_zipped", "task_bytes", "sentences_per_second_1",
                  "sentences_per_second_32"]}
METRICS = [  # (key in a run's result, markdown header, format of mean ± std)
    ("accuracy", "test accuracy %", lambda c: f"{100 * c['mean']:.1f} ± {100 * c['std']:.1f}"),
    ("mlm_loss_before", "held-out MLM loss of the pre-trained encoder", lambda c: f"{c['mean']:.3f}"),
    ("forgetting", "forgetting: Δ held-out MLM loss", lambda c: f"{c['mean']:+.3f} ± {c['std']:.3f}"),
    ("trainable_parameters", "trainable parameters", lambda c: f"{c['mean']:,.0f}"),
    ("seconds", "seconds per run", lambda c: f"{c['mean']:.1f} ± {c['std']:.1f}"),
    ("parameters", "parameters", lambda c: f"{c['mean']:,.0f}"),
    ("bytes_on_disk", "checkpoint.pt bytes", lambda c: f"{c['mean']:,.0f}"),
    ("bytes_zipped", "zipped bytes", lambda c: f"{c['mean']:,.0f}"),
    ("task_bytes", "bytes per task", lambda c: f"{c['mean']:,.0f}"),
    ("sentences_per_second_1", "CPU sentences/s, batch 1", lambda c: f"{c['mean']:,.0f} ± {c['std']:,.0f}"),
    ("sentences_per_second_32", "CPU sentences/s, batch 32", lambda c: f"{c['mean']:,.0f} ± {c['std']:,.0f}"),
]


def run(out="runs/experiments", plan_name="quick", seeds=None, resume=False, force=False, plan=None, log=print):
    """Run the plan (PLANS[plan_name], or `plan` itself) and write runs.jsonl, results.json, results.md."""
    plan = dict(plan or PLANS[plan_name])
    if seeds is not None:
        if seeds < 1:
            raise InputError(f"--seeds must be positive, got {seeds}")
        plan["seeds"] = seeds
    if plan.get("runner") == "c8":  # C8's own runner (run_c8, at the end of this file)
        return run_c8(out, plan_name, plan, resume, force, log)
    if plan.get("needs_gpu") and options.pick_device("auto").type != "cuda":
        raise InputError(f"--plan {plan_name} pre-trains a small encoder for about 10 minutes of a GPU: hours on "
                         "this machine, which has no CUDA GPU; on a CPU run --plan real-text (the tiny encoder, ~22 minutes)")
    prepare_out_folder(out, resume, force)
    started = time.time()
    runs_path = os.path.join(out, "runs.jsonl")
    finished = {}
    if resume and os.path.exists(runs_path):
        with open(runs_path) as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    finished[record["key"]] = record["result"]
        log(f"resuming: {len(finished)} runs already in {runs_path}")
    results = {"plan": plan_name, "settings": plan, "device": str(options.pick_device("auto")), "pretraining": {},
               "tables": []}
    for corpus in plan["corpora"]:
        corpus_started = time.time()
        task = toy_task(plan["toy_documents"], plan["toy_labeled"]) if corpus == "toy" else stdlib_task(plan["stdlib_max_documents"])
        if corpus == "stdlib" and plan.get("extra_text") == "packages":
            task["unlabeled"] += package_text(task)
        num_classes = len({y for _, y in task["train"]})
        log(f"[{corpus}] {len(task['unlabeled'])} unlabeled documents, {len(task['train'])} labeled for training, "
            f"{len(task['test'])} for testing, {num_classes} classes")
        encoders = pretrain_encoders(out, corpus, task, plan, resume, log)
        results["pretraining"][corpus] = {name: {"held_out_mlm_loss": loss, "seconds": seconds}
                                          for name, (_, loss, seconds) in encoders.items() if seconds is not None}
        loaded = {name: Loaded(path, plan["forgetting_batches"]) for name, (path, _, _) in encoders.items()}
        num_layers = loaded["final"].config.num_layers
        for claim, title, rows in tables_for(corpus, plan, task, encoders, num_layers, num_classes):
            table = {"claim": claim, "title": title, "corpus": corpus, "classes": num_classes, "rows": []}
            for setting, spec in rows:
                outcomes = []
                for seed in range(plan["seeds"]):
                    spec_seed = {**spec, "seed": seed}
                    key = json.dumps(spec_seed, sort_keys=True)
                    if key not in finished:
                        finished[key] = finetune_run(spec_seed, task, loaded.get(spec.get("encoder", "final")),
                                                     loaded["final"], folder=os.path.join(out, corpus))
                        with open(runs_path, "a") as f:
                            f.write(json.dumps({"key": key, "spec": spec_seed, "result": finished[key]}) + "\n")
                    outcomes.append(finished[key])
                cells = {metric: summarize([o.get(metric) for o in outcomes]) for metric, _, _ in METRICS}
                table["rows"].append({"claim": claim, "setting": setting,
                                      "cells": {m: c for m, c in cells.items() if c is not None}})
                log(f"[{corpus}] {claim} {setting}: accuracy {100 * cells['accuracy']['mean']:.1f} "
                    f"± {100 * cells['accuracy']['std']:.1f}")
            results["tables"].append(table)
        results["pretraining"][corpus]["wall_clock_seconds"] = time.time() - corpus_started
    results["wall_clock_seconds"] = time.time() - started
    write_json(os.path.join(out, "results.json"), results)
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write(markdown(results))
    plot_labels_per_class(results, os.path.join(out, "labels_per_class.png"))
    plot_accuracy_against_size(results, os.path.join(out, "c7_accuracy_against_size.png"))
    log(f"done in {results['wall_clock_seconds'] / 60:.1f} minutes: {out}/results.md, results.json, runs.jsonl")
    return results


CORPUS_NAMES = {"toy": "toy world", "stdlib": "real text: stdlib docstrings"}


def markdown(results):
    lines = [f"Plan `{results['plan']}`, {results['settings']['seeds']} seeds, device {results['device']}; "
             f"wall-clock {results['wall_clock_seconds'] / 60:.1f} minutes. Each cell: mean ± std over seeds.", ""]
    for corpus, runs in results["pretraining"].items():
        lines.append(f"Pre-training on the {CORPUS_NAMES[corpus]}: " + "; ".join(
            f"{name}: held-out MLM loss {run['held_out_mlm_loss']:.3f}, {run['seconds']:.0f} s"
            for name, run in runs.items() if isinstance(run, dict))
            + f"; everything on this corpus: {runs['wall_clock_seconds'] / 60:.1f} minutes.")
    for table in results["tables"]:
        present = [(m, header, show) for m, header, show in METRICS
                   if m in COLUMNS[table["claim"]] and any(m in r["cells"] for r in table["rows"])]
        lines += ["", f"### {table['claim']} — {table['title']} ({CORPUS_NAMES[table['corpus']]})", "",
                  "| claim | setting | " + " | ".join(header for _, header, _ in present) + " |",
                  "|---|---|" + "---|" * len(present)]
        for row in table["rows"]:
            cells = [show(row["cells"][m]) if m in row["cells"] else "—" for m, _, show in present]
            lines.append(f"| {row['claim']} | {row['setting']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_labels_per_class(results, path):
    """C1's learning curve as a picture, if matplotlib is installed (optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    tables = [t for t in results["tables"] if t["claim"] == "C1"]
    figure, axes = plt.subplots(1, len(tables), figsize=(6 * len(tables), 4), squeeze=False)
    for axis, table in zip(axes[0], tables):
        for variant in sorted({r["setting"].split(": ", 1)[1] for r in table["rows"]}):
            rows = [r for r in table["rows"] if r["setting"].endswith(": " + variant)]
            means = [100 * r["cells"]["accuracy"]["mean"] for r in rows]
            stds = [100 * r["cells"]["accuracy"]["std"] for r in rows]
            axis.errorbar([r["setting"].split(":")[0] for r in rows], means, yerr=stds, label=variant, capsize=3)
        axis.axhline(100 / table["classes"], color="grey", linestyle=":", linewidth=1, label="chance")
        axis.set_title(CORPUS_NAMES[table["corpus"]])
        axis.set_xlabel("labels per class")
        axis.set_ylabel("test accuracy %")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def plot_accuracy_against_size(results, path):
    """C7 as a picture, if matplotlib is installed: test accuracy against the bytes a task stores."""
    tables = [t for t in results["tables"] if t["claim"] == "C7"]
    if not tables:
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axes = plt.subplots(1, len(tables), figsize=(7 * len(tables), 4.5), squeeze=False)
    for axis, table in zip(axes[0], tables):
        for row in table["rows"]:
            cells = row["cells"]
            if "task_bytes" not in cells:
                continue
            x, y = cells["task_bytes"]["mean"], 100 * cells["accuracy"]["mean"]
            axis.errorbar([x], [y], yerr=[100 * cells["accuracy"]["std"]], fmt="o", capsize=3)
            axis.annotate(row["setting"].split(" (")[0], (x, y), fontsize=6, xytext=(4, 3), textcoords="offset points")
        axis.set_xscale("log")
        axis.set_title(CORPUS_NAMES[table["corpus"]])
        axis.set_xlabel("bytes stored per task (log scale)")
        axis.set_ylabel("test accuracy %")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


if __name__ == "__main__":
    # `python experiments.py`: a tiny plan end to end in a temporary folder (about a minute on a
    # CPU) -- every table, with numbers too small to mean anything. The real plans:
    # python ptft.py experiments --plan quick|real-text|task-choices|full
    import tempfile

    tiny = {**PLANS["quick"], "corpora": ["toy"], "toy_documents": 400, "toy_labeled": (4, 2, 8),
            "pretrain_steps": {"toy": 40, "stdlib": None}, "pretrain_batch_size": {"toy": 8, "stdlib": 8},
            "snapshot_steps": {"toy": [20], "stdlib": []}, "eval_every": {"toy": 20, "stdlib": 20},
            "task_choice_steps": {"toy": 20, "stdlib": None}, "labels_per_class": [2], "k": 2,
            "tables": {"toy": ["C1", "C2", "C3", "C4", "C5", "C6", "C7"], "stdlib": []}, "c7_unlabeled": 50,
            "c7_timing_seconds": 0.05,
            "finetune_steps": 2, "max_epochs": 2, "epoch_grid": [1, 2], "lr_grid": [1e-3], "forgetting_batches": 1}
    with tempfile.TemporaryDirectory() as folder:
        results = run(folder, "tiny", plan=tiny, force=True, log=lambda *a: None)
        print(markdown(results))


# ----------------------------------------------------------------------------------------
# C8 (and a C6 row): the same encoder pre-trained with BERT's objective and with GPT's
# ----------------------------------------------------------------------------------------

# MLM + NSP vs causal LM at the same budget (steps, batch, length, model size, rate), on the toy
# world; each fine-tuned the same ways at k labels per class. A causal encoder classifies from the
# mean over real tokens (model.Classifier: [CLS] sees only itself), so MLM's head-only row is given
# with mean pooling too: the difference between the two objectives is then not the pooling's.
PLANS["c8"] = {
    **PLANS["quick"],
    "runner": "c8",
    "corpora": ["toy"],
    "pretrain_steps": {"toy": 2500, "stdlib": None},
    "snapshot_steps": {"toy": [], "stdlib": []},
    "task_choice_steps": {"toy": None, "stdlib": None},
    "tables": {"toy": ["C6"], "stdlib": []},
    "c1_variants": {"toy": [], "stdlib": []},
    "c8_prompts_per_topic": 10,                  # generation: prompts per topic for the on-topic share
}
C8_OBJECTIVES = {"mlm": "MLM + NSP (BERT)", "causal": "causal LM (GPT-style)"}


def c8_rows(plan, num_classes):
    """(setting, spec) of the C8 table: each objective fine-tuned head-only and fully, scratch and TF-IDF."""
    k = plan["k"]
    base = dict(method="finetune", corpus="toy", k=k, freeze="none", lr=FULL_LR, epochs=epochs_for(k * num_classes, plan),
                schedule="cosine", warmup=0.1, l2_sp=0.0, aux_mlm=0.0, layer_lr_decay=1.0)
    head = dict(base, freeze="head", lr=HEAD_LR)
    rows = [("from scratch (same architecture, full)", dict(base, encoder="scratch"))]
    rows += [(f"{C8_OBJECTIVES['mlm']}, head only ([CLS] pooler)", dict(head, encoder="mlm")),
             (f"{C8_OBJECTIVES['mlm']}, head only, mean pooling", dict(head, encoder="mlm", pool="mean")),
             (f"{C8_OBJECTIVES['mlm']}, full", dict(base, encoder="mlm")),
             (f"{C8_OBJECTIVES['causal']}, head only (mean pooling)", dict(head, encoder="causal", pool="mean")),
             (f"{C8_OBJECTIVES['causal']}, full (mean pooling)", dict(base, encoder="causal", pool="mean")),
             ("TF-IDF + logistic regression", dict(method="tfidf", corpus="toy", k=k))]
    return rows


def run_c8(out, plan_name, plan, resume, force, log):
    """Pre-train the tiny encoder twice on the toy world (mlm, causal: the same steps, batch,
    length, size and rate), fine-tune each per c8_rows over seeds, write runs.jsonl (--resume),
    results.json and results.md. No verdict rule in the project yet: each cell keeps its per-seed
    values, the mean and the sample std (n - 1)."""
    prepare_out_folder(out, resume, force)
    started = time.time()
    runs_path = os.path.join(out, "runs.jsonl")
    finished = {}
    if resume and os.path.exists(runs_path):
        with open(runs_path) as f:
            finished = {record["key"]: record["result"] for record in map(json.loads, filter(str.strip, f))}
    task = toy_task(plan["toy_documents"], plan["toy_labeled"])
    folder = os.path.join(out, "toy")
    os.makedirs(folder, exist_ok=True)
    unlabeled_path = os.path.join(folder, "unlabeled.txt")
    data.write_corpus(unlabeled_path, task["unlabeled"])
    pretraining, loaded = {}, {}
    for objective in C8_OBJECTIVES:
        path = os.path.join(folder, f"pretrain-{objective}")
        if not (resume and os.path.exists(os.path.join(path, "metrics.json"))):
            log(f"[toy] pre-training '{objective}' for {plan['pretrain_steps']['toy']} steps")
            recipe = PretrainOptions(corpus=[unlabeled_path], objective=objective, steps=plan["pretrain_steps"]["toy"],
                                     batch_size=plan["pretrain_batch_size"]["toy"], config=plan.get("pretrain_config", "tiny"),
                                     max_length=MLM_MAX_LENGTH, lr=1e-3, dropout=0.0, save_every=0, vocab_size=2048,
                                     eval_every=plan["eval_every"]["toy"])
            train.pretrain(path, recipe, force=True, log=log, progress=False)
        with open(os.path.join(path, "metrics.json")) as f:
            metrics = json.load(f)
        pretraining[objective] = {key: metrics.get(key) for key in ("held_out_mlm_loss", "held_out_perplexity", "seconds")}
        loaded[objective] = Loaded(os.path.join(path, "checkpoint.pt"))
    num_classes = len({y for _, y in task["train"]})
    table = {"claim": "C6", "title": f"pre-training objective: MLM vs causal LM at the same budget (k={plan['k']})",
             "corpus": "toy", "classes": num_classes, "rows": []}
    for setting, spec in c8_rows(plan, num_classes):
        outcomes = []
        for seed in range(plan["seeds"]):
            spec_seed = {**spec, "seed": seed}
            key = json.dumps(spec_seed, sort_keys=True)
            if key not in finished:
                finished[key] = finetune_run(spec_seed, task, loaded.get(spec.get("encoder")), loaded["mlm"], folder=folder)
                with open(runs_path, "a") as f:
                    f.write(json.dumps({"key": key, "spec": spec_seed, "result": finished[key]}) + "\n")
            outcomes.append(finished[key])
        cells = {metric: summarize([o.get(metric) for o in outcomes]) for metric, _, _ in METRICS}
        cells = {m: c for m, c in cells.items() if c is not None}
        values = cells["accuracy"]["values"]
        cells["accuracy"]["sample_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
        table["rows"].append({"claim": "C6", "setting": setting, "cells": cells})
        log(f"[toy] C8 {setting}: accuracy {100 * cells['accuracy']['mean']:.1f} ± "
            f"{100 * (cells['accuracy']['sample_std'] or 0):.1f} (seeds: {', '.join(f'{100 * v:.1f}' for v in values)})")
    generation = on_topic_share(loaded["causal"].path, plan.get("c8_prompts_per_topic", 10))
    log(f"[toy] C8 generation: {100 * generation['on_topic_share']:.1f}% of {generation['content_words']} generated "
        f"content words from the prompt's topic ({generation['prompts']} prompts)")
    results = {"plan": plan_name, "settings": plan, "device": str(options.pick_device("auto")), "pretraining": {},
               "c8_pretraining": pretraining, "c8_generation": generation, "tables": [table],
               "wall_clock_seconds": time.time() - started}
    write_json(os.path.join(out, "results.json"), results)
    lines = [f"Pre-training on the toy world, {plan['pretrain_steps']['toy']} steps each: " + "; ".join(
        f"{name}: held-out loss {run['held_out_mlm_loss']:.3f}"
        + (f" (perplexity {run['held_out_perplexity']:.2f})" if run.get("held_out_perplexity") else "")
        + f", {run['seconds']:.0f} s" for name, run in pretraining.items()),
        "Per-seed test accuracies (%): " + "; ".join(
            f"{row['setting']}: {', '.join(f'{100 * v:.1f}' for v in row['cells']['accuracy']['values'])}"
            for row in table["rows"]),
        f"Generation (causal run, sampled at temperature 1, {C8_NEW_TOKENS} new tokens, seed = prompt number): "
        f"{100 * generation['on_topic_share']:.1f}% of {generation['content_words']} generated content words are from the "
        f"prompt's topic, over {generation['prompts']} prompts `the ADJ NOUN` (chance: {100 * generation['chance']:.1f}%).", ""]
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + markdown(results))
    log(f"done in {results['wall_clock_seconds'] / 60:.1f} minutes: {out}/results.md, results.json, runs.jsonl")
    return results


C8_NEW_TOKENS = 20


def on_topic_share(causal_path, prompts_per_topic):
    """Does the causal model write on its prompt's topic? For each topic, prompts `the ADJ NOUN`
    from that topic's words (seeded); each continued by evaluation.generate (sampled, temperature
    1, seed = the prompt's number); the share of the generated content words (toyworld's topic
    words) that belong to the prompt's topic. Chance: 1 / the number of topics."""
    word_topics, rng, quiet = toyworld.toy_word_topics(), np.random.default_rng(8), (lambda *args: None)
    on_topic, content_words, prompts = 0, 0, 0
    for topic, words in toyworld.TOPICS.items():
        for _ in range(prompts_per_topic):
            adjective, noun = words["adjectives"], words["nouns"]
            prompt = f"the {adjective[rng.integers(len(adjective))]} {noun[rng.integers(len(noun))][0]}"
            text, _ = evaluation.generate(causal_path, prompt, C8_NEW_TOKENS, seed=prompts, device="cpu", log=quiet)
            topics = [word_topics[w] for w in split_words(text) if w in word_topics]
            on_topic += sum(t == topic for t in topics)
            content_words += len(topics)
            prompts += 1
    return {"on_topic_share": on_topic / max(content_words, 1), "content_words": content_words, "prompts": prompts,
            "chance": 1 / len(toyworld.TOPICS)}
