"""ptft -- pre-training and fine-tuning, from scratch. The command line.

    python ptft.py                 the main job: `demo` on the embedded toy world
    python ptft.py demo            pre-train, then fine-tune 4 ways on k labels per class
    python ptft.py pretrain ...    masked language modelling (+ next-sentence prediction)
    python ptft.py finetune ...    a classifier from a pre-trained run (or from scratch)
    python ptft.py evaluate ...    accuracy / macro-F1 / loss on a TSV, or MLM loss on text
    python ptft.py fill-mask ...   the MLM head's top candidates for each [MASK] in a text
    python ptft.py export ...      a run as a Hugging Face BERT folder (from_pretrained opens it)
    python ptft.py distill ...     C7: a smaller student trained on a classifier's soft predictions
    python ptft.py quantize ...    C7: a run's weight matrices as int8 (about 4x smaller on disk)
    python ptft.py prune ...       C7: remove the smallest weights or feed-forward units, then recover
    python ptft.py tokenize ...    a corpus larger than memory, once, into a token file for pretrain
    python ptft.py bench ...       MLM training/inference tokens/s and MFU (vs transformers)
    python ptft.py experiments     every claim C1-C7 as a table with error bars (experiments.py)

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

import numpy as np

import bench
import compress
import data
import experiments
import hf
import toyworld
import train
from checkpoint import load_checkpoint, prepare_out_folder, write_json
from common import InputError
from options import PRUNE_UNITS, BenchOptions, DemoOptions, DistillOptions, FinetuneOptions, PretrainOptions, PruneOptions
from tokenizer import MASK, Tokenizer, train_tokenizer

# ----------------------------------------------------------------------------------------
# demo: the whole paradigm in one command (C1)
# ----------------------------------------------------------------------------------------

DEMO_VARIANTS = ["scratch", "head", "top-2", "full"]  # -> --freeze: (scratch: none), head, top-2, none


def demo(out="runs/demo", options=None, resume=False, force=False):
    """Pre-train on the toy world's unlabeled part, then fine-tune with k labels per class
    four ways, on `seeds` different draws of the k examples and seeds, and print test accuracy.
    Fitting and scoring are the experiments' own (experiments.fine_tune_and_score)."""
    options = options or DemoOptions()
    options.check()
    seeds, labels_per_class, epochs, device = options.seeds, options.labels_per_class, options.epochs, options.device
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
        labeled = experiments.draw_labeled(world["train"], labels_per_class, seed)  # a different draw per seed
        # C1's mechanism: how many content words do k labels per class show the classifier?
        seen_words = {w for text, _ in labeled for w in text.split() if w in word_topics}
        coverage.append(len(seen_words) / len(word_topics))
        unseen = [(text, y) for text, y in world["test"] if not any(w in seen_words for w in text.split())]
        unseen_fraction.append(len(unseen) / len(world["test"]))
        for variant in DEMO_VARIANTS:
            recipe = FinetuneOptions(freeze={"scratch": "none", "full": "none"}.get(variant, variant), epochs=epochs,
                                     seed=seed, device=device)
            info, scores = experiments.fine_tune_and_score(source, labeled, label_names, {"test": world["test"], "unseen": unseen},
                                                           recipe, pretrained=variant != "scratch")
            results.append({"variant": variant, "labels_per_class": labels_per_class, "seed": seed,
                            "accuracy": scores["test"]["accuracy"],
                            "accuracy_unseen_words": scores.get("unseen", {"accuracy": float("nan")})["accuracy"],
                            "seconds": info["seconds"], "trainable_parameters": info["trainable_parameters"],
                            "lr": recipe.peak_lr(), "epochs": epochs})
            print(f"seed {seed}  {variant:8s} test accuracy {scores['test']['accuracy']:.3f}  ({info['seconds']:.1f}s)")
    write_json(os.path.join(out, "results.json"), results)
    print(f"\nPre-training: {pretrain_metrics['step']} steps, held-out MLM loss "
          f"{pretrain_metrics['held_out_mlm_loss']:.3f} (ln|V| = {pretrain_metrics['ln_vocab']:.3f} at init), "
          f"held-out NSP accuracy {pretrain_metrics.get('held_out_nsp_accuracy', float('nan')):.3f}, "
          f"{pretrain_seconds:.0f}s")
    print(f"Fine-tuning on {labels_per_class} labels per class ({labels_per_class * len(label_names)} sentences, "
          f"{len(label_names)} topics), tested on {len(world['test'])} other sentences, {seeds} seeds. The labeled "
          f"sentences contain {100 * np.mean(coverage):.0f}% of the toy world's {len(word_topics)} content words; "
          f"{100 * np.mean(unseen_fraction):.0f}% of the test sentences contain none of those.\n")
    print_demo_table(results)
    print(f"\nresults: {os.path.join(out, 'results.json')}")
    return results


def print_demo_table(results):
    print("| variant | trainable parameters | test accuracy (mean ± std) | on test sentences of unseen words | seconds per run |")
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
# The parser
# ----------------------------------------------------------------------------------------


def build_parser():
    parser = argparse.ArgumentParser(
        prog="ptft.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add_command in (add_demo, add_pretrain, add_finetune, add_distill, add_quantize, add_prune, add_tokenize,
                        add_experiments, add_evaluate, add_fill_mask, add_export, add_bench):
        add_command(commands)
    return parser


def add_demo(commands):
    p = commands.add_parser("demo", formatter_class=HelpFormatter, help="the main job: pre-train, then fine-tune 4 ways",
                            description="Pre-train a tiny BERT on the embedded toy world's unlabeled text, then "
                            "fine-tune it on k labeled sentences per topic four ways -- from scratch (random init, "
                            "same architecture and vocabulary), head only, top-2 layers + head, everything -- and "
                            "print test accuracy (mean ± std over seeds). Writes OUT/results.json.")
    p.add_argument("--out", default="runs/demo", help="run folder")
    p.add_argument("--seeds", type=int, help="number of seeds (draws of the labeled examples)")
    p.add_argument("--labels-per-class", type=int, help="k labeled sentences per topic")
    p.add_argument("--pretrain-steps", type=int, help="pre-training steps")
    p.add_argument("--epochs", type=int, help="fine-tuning epochs")
    p.add_argument("--precision", help="auto (bf16 where the hardware has it, else fp32), fp32 or bf16")
    add_run_flags(p, seed=False)
    p.set_defaults(**option_defaults(DemoOptions))


def add_pretrain(commands):
    p = commands.add_parser("pretrain", formatter_class=HelpFormatter, help="masked language modelling + next-sentence prediction",
                            description="Pre-train an encoder with BERT's masked language modelling (15% of tokens; "
                            "80/10/10 [MASK]/random/unchanged) and next-sentence prediction. Without --corpus it uses "
                            "the embedded toy world; --corpus stdlib uses the docstrings of Python's standard library; "
                            "otherwise UTF-8 text files, one sentence per line, documents separated by blank lines. "
                            "Writes OUT/checkpoint.pt, OUT/vocab.txt and OUT/metrics.json.")
    p.add_argument("--corpus", nargs="+", metavar="FILE", help="text file(s), or 'stdlib' (default: the toy world)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--config", help="model size: tiny, small or base")
    p.add_argument("--init", help="continue pre-training this run folder or Hugging Face BERT folder (its size and vocabulary)")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--batch-size", type=int, help="sequences per step (per micro-batch with --accum)")
    p.add_argument("--accum", dest="accumulation", type=int, help="micro-batches accumulated per step")
    p.add_argument("--max-length", type=int, help="tokens per sequence, [CLS] and [SEP]s included")
    p.add_argument("--lr", type=float, help="peak learning rate (linear warmup, then cosine decay)")
    p.add_argument("--warmup-steps", type=int, help="warmup steps (default: 5%% of --steps)")
    p.add_argument("--vocab-size", type=int, help="WordPiece vocabulary size (default 2048 on the toy world, else 8192)")
    p.add_argument("--mask-probability", type=float, help="fraction of tokens selected for MLM")
    p.add_argument("--mask-token-fraction", type=float, help="of the selected tokens, the share set to [MASK]")
    p.add_argument("--random-token-fraction", type=float, help="of the selected tokens, the share set to a random token")
    p.add_argument("--snapshot-steps", type=int, nargs="*", help="also save OUT/snapshot-N.pt at these steps")
    p.add_argument("--no-nsp", dest="nsp", action="store_false", help="MLM only, no next-sentence prediction (default: MLM + NSP, B3)")
    p.add_argument("--nsp-weight", type=float, help="lambda in L = L_MLM + lambda * L_NSP (B3)")
    p.add_argument("--precision", help="auto (bf16 where the hardware has it, else fp32), fp32, bf16, "
                   "or fp16 (with a GradScaler; for GPUs without bf16)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (slow first steps; helps on GPUs)")
    add_deterministic_flag(p)
    p.add_argument("--dropout", type=float, help="dropout on embeddings, layers and attention (BERT: 0.1)")
    p.add_argument("--attention", help="explicit (the formula, written out) or sdpa (fused kernel)")
    p.add_argument("--save-every", type=int, help="write checkpoint.pt every N steps (0: only at the end)")
    p.add_argument("--eval-every", type=int, help="held-out MLM loss every N steps")
    add_size_flags(p)
    add_run_flags(p)
    p.set_defaults(**option_defaults(PretrainOptions))  # the defaults live in options.py, and --help shows them


def add_finetune(commands):
    p = commands.add_parser("finetune", formatter_class=HelpFormatter, help="train a classifier on a labeled TSV",
                            description="Fine-tune a sequence classifier (pooled [CLS] -> linear) on a TSV of "
                            "'text<TAB>label' lines, from a pre-training run folder or from scratch (a random "
                            "initialisation; its vocabulary is built from the training file). --freeze chooses what "
                            "trains: head (encoder frozen), top-K (the top K layers + head), none (everything). "
                            "Writes OUT/checkpoint.pt, OUT/vocab.txt and OUT/metrics.json (validation metrics).")
    p.add_argument("--init", required=True, help="a pre-training run folder, a Hugging Face BERT folder, or 'scratch'")
    p.add_argument("--train", required=True, help="training TSV: text<TAB>label")
    p.add_argument("--valid", help="validation TSV (labels must appear in the training file)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--freeze", help="head, top-K (e.g. top-2) or none")
    p.add_argument("--lora", type=int, metavar="R", help="C7: freeze the encoder and train rank-R updates of its query "
                   "and value projections (merged into the weights at the end) with the head (default: off)")
    p.add_argument("--pool", help="the sentence vector the classifier reads: cls (BERT's pooler on [CLS]) or mean "
                   "(the mean of the last layer over the real tokens)")
    p.add_argument("--epochs", type=int, help="passes over the training set")
    p.add_argument("--lr", type=float, help="peak learning rate (default: 1e-3 for head/top-K, 3e-4 for none)")
    p.add_argument("--batch-size", type=int, help="examples per step")
    p.add_argument("--config", help="model size with --init scratch: tiny, small or base")
    p.add_argument("--max-length", type=int, help="position-table size with --init scratch")
    p.add_argument("--schedule", help="after warmup: cosine (to 0), constant (C4), or cyclical (C5c: 3 cycles, peaks halving)")
    p.add_argument("--weight-decay", type=float, help="C5a: AdamW's weight decay of the weight matrices (L2 regularisation)")
    p.add_argument("--warmup-fraction", type=float, help="fraction of the steps spent warming up (0: none)")
    p.add_argument("--l2-sp", dest="l2_sp", type=float, metavar="LAMBDA",
                   help="C5a: add LAMBDA/2 * sum ||theta - theta_0||^2, a pull toward the pre-trained weights")
    p.add_argument("--aux-mlm", type=float, metavar="ALPHA",
                   help="C5b: add ALPHA * MLM loss (E4) on unlabeled text, with the pre-trained MLM head")
    p.add_argument("--layer-lr-decay", type=float, metavar="GAMMA",
                   help="C5c: the layer d steps below the head trains at lr * GAMMA^d (embeddings lowest)")
    p.add_argument("--adapt-steps", type=int, metavar="N", help="task-adaptive pre-training: first N steps of MLM on the "
                   "training texts without their labels, continuing the init's pre-training (0: none)")
    p.add_argument("--unlabeled", nargs="+", metavar="FILE",
                   help="unlabeled text for --aux-mlm and forgetting (default: the init's pre-training corpus)")
    add_deterministic_flag(p)
    add_size_flags(p)
    add_run_flags(p, resume=False)
    p.set_defaults(**option_defaults(FinetuneOptions))


def add_distill(commands):
    p = commands.add_parser("distill", formatter_class=HelpFormatter, help="C7: distil a classifier into a smaller student",
                            description="Knowledge distillation: train a smaller student classifier on the teacher's "
                            "softened predictions and the labels, L = alpha * CE(z_s, y) + (1 - alpha) * T^2 * "
                            "KL(softmax(z_t / T) || softmax(z_s / T)). The transfer set is the labeled TSV plus, with "
                            "--unlabeled, sentences without labels (the teacher labels them softly). Writes a classifier "
                            "run folder: OUT/checkpoint.pt, OUT/vocab.txt, OUT/metrics.json (student and teacher scores).")
    p.add_argument("--teacher", required=True, help="a fine-tuned classifier run folder")
    p.add_argument("--train", required=True, help="labeled TSV: text<TAB>label (the teacher's labels)")
    p.add_argument("--valid", help="validation TSV: the student and the teacher are scored on it")
    p.add_argument("--unlabeled", nargs="+", metavar="FILE", help="text file(s), or 'stdlib', for the transfer set")
    p.add_argument("--max-unlabeled", type=int, help="at most this many sentences of --unlabeled (a random choice)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--student-config", help="a size preset (tiny, small, base); default: the teacher's sizes, half its layers")
    p.add_argument("--student-init", help="every-other (the teacher's embeddings, head and layers 0, 2, 4, ...), scratch, "
                   "or a smaller pre-trained run folder / BERT folder")
    p.add_argument("--temperature", type=float, help="T: above 1 softens the teacher's distribution")
    p.add_argument("--alpha", type=float, help="the labels' share of the loss; 1 - alpha goes to the teacher's soft targets")
    p.add_argument("--epochs", type=int, help="passes over the transfer set")
    p.add_argument("--lr", type=float, help="peak learning rate (warmup, then cosine)")
    p.add_argument("--batch-size", type=int, help="sentences per step")
    add_deterministic_flag(p)
    add_size_flags(p)
    add_run_flags(p, resume=False)
    p.set_defaults(**option_defaults(DistillOptions))


def add_quantize(commands):
    p = commands.add_parser("quantize", formatter_class=HelpFormatter, help="C7: store a run's weight matrices as int8",
                            description="Write a copy of a run (classifier or pre-training) whose weight matrices are "
                            "int8 with one float32 scale per row: s_r = max|W_r| / 127, q_r = round(W_r / s_r). About 4x "
                            "smaller on disk; every command reads it (turning the matrices back into float32). Writes "
                            "OUT/checkpoint.pt, OUT/vocab.txt and OUT/metrics.json (sizes, largest weight error).")
    p.add_argument("--init", required=True, help="a run folder or a Hugging Face BERT folder")
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")


def add_prune(commands):
    p = commands.add_parser("prune", formatter_class=HelpFormatter, help="C7: prune a classifier, then recover",
                            description="Remove the least important part of a fine-tuned classifier -- --unit weights: "
                            "the smallest |w| of every weight matrix of the encoder's layers set to 0 (exactly --sparsity "
                            "of each); --unit ffn-units: that fraction of every layer's feed-forward units removed (a "
                            "smaller dense model) -- then fine-tune --epochs on --train to recover, pruned weights held "
                            "at 0. Writes a classifier run folder.")
    p.add_argument("--init", required=True, help="a fine-tuned classifier run folder")
    p.add_argument("--sparsity", type=float, help="the fraction removed, in [0, 1)")
    p.add_argument("--unit", help=f"what is removed: {' or '.join(PRUNE_UNITS)}")
    p.add_argument("--train", help="labeled TSV for the recovery fine-tuning")
    p.add_argument("--valid", help="validation TSV: scored before pruning, after, and after recovery")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--epochs", type=int, help="recovery fine-tuning epochs (0: none)")
    p.add_argument("--lr", type=float, help="peak learning rate of the recovery")
    p.add_argument("--batch-size", type=int, help="examples per step")
    add_deterministic_flag(p)
    add_run_flags(p, resume=False)
    p.set_defaults(**option_defaults(PruneOptions))


def add_tokenize(commands):
    p = commands.add_parser("tokenize", formatter_class=HelpFormatter, help="a corpus once into a token file (larger than memory)",
                            description="Tokenise text files once, streaming them, in --workers processes, into "
                            "OUT.tokens (uint16 ids where the vocabulary fits, else uint32), OUT.sentences.npy, "
                            "OUT.documents.npy and OUT.vocab.txt. `pretrain --corpus OUT.tokens` then reads it through "
                            "a memory map: memory does not grow with the corpus, and no run tokenises it again.")
    p.add_argument("--corpus", nargs="+", required=True, metavar="FILE", help="UTF-8 text files, one sentence per line, "
                   "documents separated by blank lines")
    p.add_argument("--out", required=True, metavar="PREFIX", help="where to write PREFIX.tokens and its companions")
    p.add_argument("--vocab-size", type=int, default=8192, help="WordPiece vocabulary to train on the corpus")
    p.add_argument("--init", help="use this run's (or BERT folder's) vocabulary instead of training one")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenising processes")


def add_experiments(commands):
    p = commands.add_parser("experiments", formatter_class=HelpFormatter, help="test the document's claims C1-C7",
                            description="Run the experiments of experiments.py on the toy world and on the "
                            "standard library's docstrings: one table per claim (C1-C7), each cell mean ± std "
                            "over seeds, with a TF-IDF + logistic-regression baseline. Writes OUT/results.json, "
                            "OUT/results.md and OUT/runs.jsonl (one line per finished run).")
    p.add_argument("--quick", action="store_true", help="= --plan quick")
    p.add_argument("--seeds", type=int, help="seeds per cell (default: the plan's: 5 for full, 3 for the others)")
    p.add_argument("--plan", default="full", choices=sorted(experiments.PLANS),
                   help="full (every table, both corpora, 5 seeds), quick (the same protocol, smaller: 3 seeds, "
                   "real text only for C1 and C6), real-text (the stdlib docstrings pre-trained 40000 steps: where "
                   "real text's gain appears), task-choices (C6's pre-training task variants on the toy world, which "
                   "quick leaves out), c7 (C7's remedies -- distillation, int8, pruning, LoRA -- on both corpora), "
                   "task-adaptive (C1 on real text with task-adaptive pre-training), real-text-gpu (the small encoder "
                   "on real text, ~10 GPU minutes; refused without a CUDA GPU); "
                   "docs/claims.md gives each plan's time on a measured machine")
    p.add_argument("--out", default="runs/experiments", help="output folder")
    p.add_argument("--resume", action="store_true", help="skip the runs already in OUT/runs.jsonl")
    p.add_argument("--force", action="store_true", help="delete an existing --out folder and start over")


def add_evaluate(commands):
    p = commands.add_parser("evaluate", formatter_class=HelpFormatter, help="score a run on a TSV or a text corpus",
                            description="A classifier run on a TSV: accuracy, macro-F1, loss, n. A pre-training run "
                            "on a text file (or 'stdlib'): MLM loss and NSP accuracy on fixed masked batches. "
                            "Prints JSON; with --out also writes OUT/metrics.json.")
    p.add_argument("--init", required=True, help="a run folder (or its checkpoint.pt), or a Hugging Face BERT folder")
    p.add_argument("--data", required=True, help="a TSV (classifier) or a text file / 'stdlib' (pre-training run)")
    p.add_argument("--out", help="folder to write metrics.json in")
    add_device_flag(p)


def add_fill_mask(commands):
    p = commands.add_parser("fill-mask", formatter_class=HelpFormatter, help="predict the tokens behind [MASK]",
                            description="Run the MLM head on TEXT and print, for each [MASK], the top-k "
                            "candidates, best first, one per line: token<TAB>probability. The probability is "
                            "the softmax over the vocabulary of the MLM scores (E4's distribution). With "
                            "several [MASK]s, a line '# [MASK] i' precedes each list.")
    p.add_argument("--init", required=True, help="a pre-training run folder or a Hugging Face BERT folder with an MLM head")
    p.add_argument("text", help='text containing [MASK], e.g. "the cat sat on the [MASK]."')
    p.add_argument("--top-k", type=int, default=5, help="candidates per [MASK]")
    add_device_flag(p)


def add_export(commands):
    p = commands.add_parser("export", formatter_class=HelpFormatter, help="write a run as a Hugging Face BERT folder",
                            description="Write config.json, model.safetensors, vocab.txt and tokenizer_config.json: "
                            "a pre-training run opens with transformers' BertForPreTraining.from_pretrained, a "
                            "fine-tuned classifier with BertForSequenceClassification.from_pretrained.")
    p.add_argument("--init", required=True, help="a run folder (pre-training or classifier), or a Hugging Face BERT folder")
    p.add_argument("--out", required=True, help="the folder to write (must not exist or be empty, unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")


def add_bench(commands):
    p = commands.add_parser("bench", formatter_class=HelpFormatter, help="tokens/s and MFU of MLM training",
                            description="Time one MLM training step (forward + backward + AdamW) and an inference "
                            "forward at seq 128, 15% masked, dropout 0.1: the median of --steps after 3 warm-up steps. "
                            "MFU = model FLOPs / time / the matmul peak (measured at a size that saturates the "
                            "device, or --peak-tflops). Rows: ptft explicit (the reading path), ptft fast (fused "
                            "attention + sparse MLM) in fp32 and in bf16 where native, and with --compare-hf "
                            "transformers' BertForMaskedLM in the same precision (compiled too with --compile).")
    p.add_argument("--config", help="tiny, small or base")
    p.add_argument("--batch-size", type=int, help="sequences per step (default: 32 on a CPU, 256 on a GPU)")
    p.add_argument("--vocab-size", type=int, help="vocabulary size (default: BERT's 30522 for base, else 8192)")
    p.add_argument("--steps", type=int, help="timed steps (the median is reported)")
    p.add_argument("--compare-hf", action="store_true", help="also time transformers' BertForMaskedLM, same precision")
    p.add_argument("--compile", action="store_true", help="also time the fast rows (and transformers) under torch.compile")
    p.add_argument("--precision", help="the fast rows' (and transformers') precision: fp32, bf16, or auto: fp32, and "
                                       "bf16 where the hardware has it (the reading path's row is always fp32)")
    p.add_argument("--real-fraction", type=float,
                   help="the share of real tokens, the rest padding, as short documents leave real text "
                        "(0.39 for the stdlib corpus at 128 tokens): ptft's fast rows skip padding, transformers does not")
    p.add_argument("--peak-tflops", nargs="+", metavar="PRECISION=TFLOPS",
                   help="the matmul peak to compute MFU with, e.g. bf16=989 fp32=67 (default: measured here)")
    p.add_argument("--json", help="write the rows to this JSON file")
    add_device_flag(p)
    p.set_defaults(**option_defaults(BenchOptions))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default (options.py's), except where its text already says it,
    the flag is required, it is an on/off switch, or there is no default to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.required or action.nargs == 0 or action.default in (None, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def option_defaults(options_class):
    """Every field's default of an options dataclass, nested ones flattened (remedies.l2_sp -> l2_sp)."""
    defaults, instance = {}, options_class()
    for field in dataclasses.fields(options_class):
        value = getattr(instance, field.name)
        defaults.update(option_defaults(field.type) if dataclasses.is_dataclass(field.type) else {field.name: value})
    return defaults


def add_size_flags(p):
    p.add_argument("--hidden-size", type=int, help="hidden size H, overriding the --config preset (not with a pre-trained --init)")
    p.add_argument("--num-layers", type=int, help="encoder layers, overriding the --config preset")
    p.add_argument("--num-heads", type=int, help="attention heads (must divide --hidden-size), overriding the --config preset")
    p.add_argument("--intermediate-size", type=int, help="feed-forward size I, overriding the --config preset")


def add_run_flags(p, resume=True, seed=True):
    if resume:
        p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--force", action="store_true", help="delete an existing --out folder and start over")
    if seed:
        p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same numbers on CPU)")
    add_device_flag(p)


def add_deterministic_flag(p):
    p.add_argument("--deterministic", action="store_true",
                   help="the same numbers from the same seed on a GPU too (deterministic kernels; slower there)")


def add_device_flag(p):
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda or mps")


def options_from(options_class, args):
    """An options dataclass (options.py) from the parsed flags, field by field name; a field that
    is itself a dataclass (FinetuneOptions.remedies) is filled the same way."""
    values = {}
    for field in dataclasses.fields(options_class):
        if dataclasses.is_dataclass(field.type):
            values[field.name] = options_from(field.type, args)
        elif hasattr(args, field.name):
            values[field.name] = getattr(args, field.name)
    return options_class(**values)


# ----------------------------------------------------------------------------------------
# The commands: each takes the parsed flags and prints its result
# ----------------------------------------------------------------------------------------


def run_pretrain(args):
    metrics = train.pretrain(args.out, options_from(PretrainOptions, args), args.resume, args.force)
    held_out = f", held-out {metrics['held_out_mlm_loss']:.3f}" if metrics.get("held_out_mlm_loss") is not None else ""
    if metrics.get("already_finished"):
        print(f"{args.out}: already finished at step {metrics['step']} (final training MLM loss "
              f"{metrics['final_train_mlm_loss']:.3f}{held_out}); nothing to do")
        return
    print(f"done: final training MLM loss {metrics['final_train_mlm_loss']:.3f}{held_out} "
          f"(ln|V| = {metrics['ln_vocab']:.3f}); {args.out}/checkpoint.pt")
    if "steady_tokens_per_second" in metrics:
        print(f"speed: {metrics['tokens_per_second']:,.0f} tokens/s; {metrics['steady_tokens_per_second']:,.0f} after the "
              f"first {metrics['timing_warmup_steps']} steps, which took {metrics['timing_warmup_seconds']:.1f} s (compilation, warm-up)")


def run_finetune(args):
    metrics = train.finetune(args.out, options_from(FinetuneOptions, args), args.force)
    summary = {k: metrics[k] for k in ("accuracy", "macro_f1", "loss", "n", "forgetting") if k in metrics}
    print(f"done: {json.dumps(summary)}; {args.out}/checkpoint.pt")


def run_distill(args):
    metrics = compress.distill(args.out, options_from(DistillOptions, args), args.force)
    print(f"done: student accuracy {metrics['accuracy']:.3f} ({metrics['total_parameters']:,} parameters), teacher "
          f"{metrics['teacher_metrics']['accuracy']:.3f} ({metrics['teacher_parameters']:,}) on {metrics['scored_on']}; "
          f"{args.out}/checkpoint.pt")


def run_quantize(args):
    metrics = compress.quantize(args.out, args.init, args.force)
    print(f"done: {metrics['int8_matrices']} matrices as int8, {metrics['bytes_float32']:,} -> {metrics['bytes_int8']:,} bytes "
          f"(largest weight error {metrics['max_weight_error']:.2e}); {args.out}/checkpoint.pt")


def run_prune(args):
    metrics = compress.prune(args.out, options_from(PruneOptions, args), args.force)
    scores = [f"{name} {metrics[key]['accuracy']:.3f}" for name, key in (("before", "before_pruning"), ("pruned", "after_pruning"))
              if metrics.get(key)] + ([f"recovered {metrics['accuracy']:.3f}"] if "accuracy" in metrics else [])
    print(f"done: {metrics['zero_fraction']:.1%} of the layers' weights are 0, {metrics['parameters']:,} parameters"
          f"{'; accuracy ' + ', '.join(scores) if scores else ''}; {args.out}/checkpoint.pt")


def run_tokenize(args):
    if args.workers < 1 or args.vocab_size < 8:
        raise InputError(f"--workers must be at least 1 and --vocab-size at least 8, got {args.workers} and {args.vocab_size}")
    folder = os.path.dirname(args.out) or "."
    if not os.path.isdir(folder):  # refused before the vocabulary is trained, which can take minutes
        raise InputError(f"--out {args.out}: the folder {folder} does not exist")
    started = time.time()
    if args.init:
        tokenizer = Tokenizer.from_checkpoint(load_checkpoint(args.init))
    else:
        print(f"building a {args.vocab_size}-token WordPiece vocabulary from {', '.join(args.corpus)} ...", file=sys.stderr)
        tokenizer = train_tokenizer((s for d in data.iter_documents(args.corpus) for s in d), args.vocab_size)
    vocabulary_seconds, started = time.time() - started, time.time()
    tokens = data.write_token_file(args.corpus, tokenizer, args.out, workers=args.workers)
    print(f"done: {tokens:,} tokens in {args.out}.tokens (vocabulary {vocabulary_seconds:.1f} s, tokenising "
          f"{time.time() - started:.1f} s with {args.workers} processes); pretrain --corpus {args.out}.tokens")


def run_evaluate(args):
    metrics = train.evaluate(args.init, args.data, args.device)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        write_json(os.path.join(args.out, "metrics.json"), metrics)
    print(json.dumps(metrics))


def run_fill_mask(args):
    candidates = train.fill_mask(args.init, args.text, args.top_k, args.device, log=lambda message: print(message, file=sys.stderr))
    for number, best in enumerate(candidates, start=1):
        if len(candidates) > 1:
            print(f"# {MASK} {number}")
        for token, probability in best:
            print(f"{token}\t{probability:.6f}")


def run_export(args):
    checkpoint = load_checkpoint(args.init)
    hf.check_exportable(checkpoint)  # refused before the folder is made
    prepare_out_folder(args.out, force=args.force)
    hf.export(checkpoint, args.out)
    print(f"wrote {args.out}/ (config.json, model.safetensors, vocab.txt, tokenizer_config.json): "
          f"{'BertForSequenceClassification' if checkpoint.get('kind') == 'classifier' else 'BertForPreTraining'}")


COMMANDS = {
    "demo": lambda args: demo(args.out, options_from(DemoOptions, args), resume=args.resume, force=args.force),
    "pretrain": run_pretrain,
    "finetune": run_finetune,
    "distill": run_distill,
    "quantize": run_quantize,
    "prune": run_prune,
    "tokenize": run_tokenize,
    "evaluate": run_evaluate,
    "fill-mask": run_fill_mask,
    "export": run_export,
    "experiments": lambda args: experiments.run(args.out, "quick" if args.quick else args.plan, seeds=args.seeds,
                                                resume=args.resume, force=args.force),
    "bench": lambda args: bench.bench(options_from(BenchOptions, args)),
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
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.command not in ("pretrain", "finetune"):  # started by torchrun
        say(f"error: {args.command} under torchrun: only pretrain and finetune run data-parallel (parallel.py); run "
            f"{args.command} as one process")
        return 2
    if getattr(args, "deterministic", False):  # cuBLAS reads it once, when it starts: before any GPU work
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    try:
        COMMANDS[args.command](args)
    except InputError as error:
        say(f"error: {error}")
        return 2
    except train.TrainingDiverged as error:
        say(f"error: training diverged at {error}")
        return 3
    except OSError as error:  # a folder that is missing or a file, a full disk, no permission: one line
        say(f"error: {error.filename}: {error.strerror}" if error.filename else f"error: {error}")
        return 2
    except KeyboardInterrupt:
        say("interrupted; the last checkpoint written is intact (use --resume to continue)")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
