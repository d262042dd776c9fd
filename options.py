"""Options: every setting of a pre-training or fine-tuning run, and the one place they are checked.

    PretrainOptions    what `ptft.py pretrain` can choose (the flags, by field name)
    FinetuneOptions    what `ptft.py finetune` can choose, with C5's Remedies grouped
    DemoOptions        what the main job (`ptft.py demo`) can choose
    BenchOptions       what `ptft.py bench` can choose
    DistillOptions, PruneOptions   what C7's `ptft.py distill` and `ptft.py prune` can choose
    pick_device, pick_precision   what "auto" means on this machine
    autocast, deterministic_algorithms, attention_backends   what precision and --deterministic do

ptft.py builds these from the parsed flags by field name; train.pretrain and train.finetune call
.check() before any work, so a bad value is one line naming the flag (exit status 2), never a
traceback later. Experiments and tests build them directly: PretrainOptions(steps=40, ...).

Run `python options.py` to see the defaults and what "auto" resolves to here.
"""

import contextlib
import math
import os
import re
from dataclasses import dataclass, field, fields

import torch

from common import InputError
from data import MaskingRule
from model import PRESETS, make_config

SIZE_FIELDS = ("hidden_size", "num_layers", "num_heads", "intermediate_size")  # override the --config preset


# ----------------------------------------------------------------------------------------
# Options, and their checks (the one place flags are validated)
# ----------------------------------------------------------------------------------------


@dataclass
class PretrainOptions:
    corpus: list = None            # text files, ["stdlib"], or None: the embedded toy world
    init: str = None               # continue pre-training this run folder or Hugging Face BERT folder
    config: str = "tiny"           # size preset (model.PRESETS), refined by the four size fields
    hidden_size: int = None
    num_layers: int = None
    num_heads: int = None
    intermediate_size: int = None
    vocab_size: int = None         # WordPiece vocabulary (default: 2048 on the toy world, else 8192)
    lowercase: bool = True
    steps: int = 2000
    batch_size: int = 64           # sequences per micro-batch
    accumulation: int = 1          # micro-batches per optimizer step
    max_length: int = 64           # tokens per sequence, [CLS] and [SEP]s included
    lr: float = 1e-3               # peak rate: linear warmup, then cosine decay (C4)
    warmup_steps: int = None       # default: 5% of the steps
    nsp: bool = True               # B2: next-sentence prediction (else MLM only)
    nsp_weight: float = 1.0        # B3: lambda in L = L_MLM + lambda * L_NSP
    mask_probability: float = 0.15     # B1: the share of tokens in M
    mask_token_fraction: float = 0.8   # B1: of those, set to [MASK]
    random_token_fraction: float = 0.1  # B1: of those, set to a random token (the rest unchanged)
    dropout: float = 0.1
    attention: str = "sdpa"        # "explicit" (the formula written out) or "sdpa" (fused kernel)
    precision: str = "auto"
    compile: bool = False          # torch.compile the training forward
    deterministic: bool = False    # the same numbers from the same seed on a GPU too (options.deterministic_algorithms)
    device: str = "auto"
    seed: int = 0
    save_every: int = 500          # checkpoint every N steps (0: only at the end)
    eval_every: int = 250          # held-out MLM loss every N steps
    snapshot_steps: tuple = ()     # also keep OUT/snapshot-N.pt (C6's budget sweep)

    def check(self):
        check_at_least(("--steps", self.steps, 1), ("--batch-size", self.batch_size, 1),
                       ("--accum", self.accumulation, 1), ("--max-length", self.max_length, 8),
                       ("--warmup-steps", self.warmup_steps or 0, 0), ("--save-every", self.save_every, 0),
                       ("--eval-every", self.eval_every, 1))
        if self.vocab_size is not None:
            check_at_least(("--vocab-size", self.vocab_size, 8))
        check_learning_rate(self.lr)
        if not (math.isfinite(self.nsp_weight) and self.nsp_weight >= 0):
            raise InputError(f"--nsp-weight (lambda in B3) must be a finite number >= 0, got {self.nsp_weight}")
        if not 0 < self.mask_probability < 1:
            raise InputError(f"--mask-probability must be between 0 and 1, got {self.mask_probability}")
        if not 0 <= self.dropout < 1:
            raise InputError(f"--dropout must be at least 0 and below 1, got {self.dropout}")
        masked, randomised = self.mask_token_fraction, self.random_token_fraction
        if not (masked >= 0 and randomised >= 0 and masked + randomised <= 1):
            raise InputError(f"--mask-token-fraction {masked} and --random-token-fraction {randomised}: "
                             "each at least 0, together at most 1 (the rest stay unchanged; B1: 0.8 and 0.1)")
        if self.init and sizes_given(self):
            raise InputError("--hidden-size, --num-layers, --num-heads, --intermediate-size: not with --init "
                             "(continued pre-training keeps the size of the model it starts from)")

    def masking_rule(self):
        return MaskingRule(self.mask_probability, self.mask_token_fraction, self.random_token_fraction)

    def model_config(self):
        """The Config asked for (an --init brings its own sizes and vocabulary)."""
        return model_config(self, vocab_size=self.vocab_size or (8192 if self.corpus else 2048),
                            max_positions=max(128, self.max_length), attention=self.attention,
                            dropout=self.dropout, attention_dropout=self.dropout)


@dataclass
class Remedies:
    """C5, the remedies against forgetting; composable, and 0 / 1.0 switch them off."""
    l2_sp: float = 0.0             # (a) strength of the L2 pull toward theta_0 (l2_sp_penalty)
    aux_mlm: float = 0.0           # (b) weight of E4's MLM loss on unlabeled text, pre-trained MLM head
    layer_lr_decay: float = 1.0    # (c) the layer d steps below the head trains at lr * decay^d


# Default learning rates (C4): a frozen encoder with only the head training tolerates (and
# needs) a large rate; full fine-tuning at this scale does best at 3e-4 (docs/claims.md, C4).
DEFAULT_FINETUNE_LR = {"head": 1e-3, "top": 1e-3, "none": 3e-4}


@dataclass
class FinetuneOptions:
    init: str = "scratch"          # a pre-training run, a Hugging Face BERT folder, or "scratch"
    train: str = None              # TSV files, text<TAB>label (finetune only: fit_classifier takes rows)
    valid: str = None
    freeze: str = "none"           # B4 / C3: head, top-K or none
    pool: str = "cls"              # the classifier's sentence vector: "cls" (BERT's pooler) or "mean" (model.Classifier)
    epochs: int = 20
    lr: float = None               # default: DEFAULT_FINETUNE_LR by --freeze
    batch_size: int = 16
    schedule: str = "cosine"       # C4: after warmup, cosine (to 0) or constant; C5c: cyclical (train.learning_rate)
    weight_decay: float = 0.01     # C5a, L2 regularisation: AdamW's decoupled decay of the weight matrices
    warmup_fraction: float = 0.1
    remedies: Remedies = field(default_factory=Remedies)
    lora: int = None               # C7: rank of low-rank updates of the frozen encoder (None: none; model.LowRankUpdate)
    adapt_steps: int = 0           # task-adaptive pre-training: MLM steps on the training texts first (train.adapt_to_task)
    unlabeled: list = None         # text for --aux-mlm and forgetting (default: init's pre-training corpus)
    mlm_max_length: int = 64       # tokens per sequence of that text
    config: str = "tiny"           # with --init scratch: size preset, size fields, position table, vocabulary
    hidden_size: int = None
    num_layers: int = None
    num_heads: int = None
    intermediate_size: int = None
    max_length: int = 128
    vocab_size: int = 8192
    seed: int = 0
    deterministic: bool = False    # the same numbers from the same seed on a GPU too
    device: str = "auto"

    def peak_lr(self):
        return self.lr if self.lr is not None else DEFAULT_FINETUNE_LR[self.freeze.split("-")[0]]

    def check(self):
        check_at_least(("--epochs", self.epochs, 1), ("--batch-size", self.batch_size, 1),
                       ("--max-length", self.max_length, 8), ("--vocab-size", self.vocab_size, 8))
        if self.lr is not None:
            check_learning_rate(self.lr)
        scratch = self.init == "scratch"
        if not scratch and sizes_given(self):
            raise InputError("--hidden-size, --num-layers, --num-heads, --intermediate-size: only with --init scratch "
                             "(a pre-trained model keeps its size)")
        if scratch:  # an impossible shape is refused before any work
            model_config(self, max_positions=self.max_length)
        if self.lora is not None and self.lora < 1:
            raise InputError(f"--lora: the rank must be a positive whole number, got {self.lora} "
                             "(leave --lora out for no low-rank updates)")
        if self.lora and (scratch or self.freeze != "none"):
            raise InputError("--lora: low-rank updates of a pre-trained encoder, which they freeze themselves; "
                             "not with --init scratch or --freeze")
        check_at_least(("--adapt-steps", self.adapt_steps, 0))
        if self.adapt_steps and scratch:
            raise InputError("--adapt-steps continues a pre-trained model's MLM; --init scratch has none")
        if self.pool not in ("cls", "mean"):
            raise InputError(f"--pool: expected cls or mean, got {self.pool!r}")
        if self.schedule not in ("cosine", "constant", "cyclical"):
            raise InputError(f"--schedule: expected cosine, constant or cyclical, got {self.schedule!r}")
        remedies = self.remedies
        if (remedies.l2_sp < 0 or remedies.aux_mlm < 0 or self.weight_decay < 0 or not 0 < remedies.layer_lr_decay <= 1
                or not 0 <= self.warmup_fraction < 1):
            raise InputError("--l2-sp, --aux-mlm and --weight-decay must be >= 0, --layer-lr-decay in (0, 1], "
                             "--warmup-fraction in [0, 1)")
        if remedies.aux_mlm and self.freeze == "head":
            raise InputError("--aux-mlm with --freeze head: the encoder is frozen, an MLM loss on it would change nothing")
        if (remedies.l2_sp or remedies.aux_mlm) and scratch:
            raise InputError("--l2-sp and --aux-mlm pull toward a pre-trained model; --init scratch has none")


@dataclass
class DistillOptions:
    """C7, `ptft.py distill`: a smaller student trained on a fine-tuned teacher's soft predictions."""
    teacher: str = None            # a classifier run folder
    train: str = None              # labeled TSV: text<TAB>label (the teacher's labels)
    valid: str = None
    unlabeled: list = None         # text files or ["stdlib"]: their sentences join the transfer set, without labels
    max_unlabeled: int = 20000     # at most this many of those sentences (a random choice)
    student_config: str = None     # a preset; None: the teacher's sizes with half its layers (DistilBERT's choice)
    hidden_size: int = None        # the four size fields refine the student's config
    num_layers: int = None
    num_heads: int = None
    intermediate_size: int = None
    student_init: str = "every-other"  # every-other (the teacher's layers 0, 2, 4, ...), scratch, or a run folder
    temperature: float = 2.0       # T in train.distillation_loss
    alpha: float = 0.5             # weight of the labels' cross-entropy; 1 - alpha: the teacher's soft targets
    epochs: int = 5
    lr: float = 5e-4
    batch_size: int = 32
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"

    def check(self):
        check_at_least(("--epochs", self.epochs, 1), ("--batch-size", self.batch_size, 1),
                       ("--max-unlabeled", self.max_unlabeled, 0))
        check_learning_rate(self.lr)
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise InputError(f"--temperature must be a number > 0, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise InputError(f"--alpha must be between 0 and 1 (the labels' share of the loss), got {self.alpha}")
        if self.student_config is not None and self.student_config not in PRESETS:
            raise InputError(f"--student-config: expected one of {', '.join(PRESETS)}, got {self.student_config!r}")

    def finetune_options(self, pool):
        """The loop's settings (train.fit_classifier): everything trains, warmup then cosine."""
        return FinetuneOptions(freeze="none", pool=pool, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                               seed=self.seed, deterministic=self.deterministic, device=self.device)


PRUNE_UNITS = ("weights", "ffn-units")


@dataclass
class PruneOptions:
    """C7, `ptft.py prune`: remove the least important part of a fine-tuned classifier, then recover."""
    init: str = None               # a classifier run folder
    sparsity: float = 0.5          # the fraction removed, in [0, 1)
    unit: str = "weights"          # weights (the smallest |w| of each matrix, zeroed) or ffn-units (whole feed-forward units)
    train: str = None              # labeled TSV for the recovery fine-tuning
    valid: str = None
    epochs: int = 3                # recovery fine-tuning epochs (0: none)
    lr: float = 1e-4
    batch_size: int = 16
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"

    def check(self):
        if not 0 <= self.sparsity < 1:
            raise InputError(f"--sparsity must be in [0, 1) (the fraction removed), got {self.sparsity}")
        if self.unit not in PRUNE_UNITS:
            raise InputError(f"--unit: expected {' or '.join(PRUNE_UNITS)}, got {self.unit!r}")
        check_at_least(("--epochs", self.epochs, 0), ("--batch-size", self.batch_size, 1))
        check_learning_rate(self.lr)
        if self.epochs and not self.train:
            raise InputError("--train: the recovery fine-tuning needs a labeled TSV (or pass --epochs 0 for none)")

    def finetune_options(self, pool):
        return FinetuneOptions(freeze="none", pool=pool, epochs=max(1, self.epochs), lr=self.lr,
                               batch_size=self.batch_size, seed=self.seed, deterministic=self.deterministic,
                               device=self.device)


@dataclass
class DemoOptions:
    """The main job (`python ptft.py`): its pre-training recipe and the fine-tuning comparison."""
    seeds: int = 3                 # draws of the k labeled examples (and fine-tuning seeds)
    labels_per_class: int = 16     # k
    pretrain_steps: int = 1600
    epochs: int = 30               # fine-tuning epochs
    precision: str = "auto"
    device: str = "auto"

    def check(self):
        if self.seeds < 1 or self.labels_per_class < 1 or self.pretrain_steps < 1 or self.epochs < 1:
            raise InputError("--seeds, --labels-per-class, --pretrain-steps and --epochs must be positive")
        pick_precision(self.precision, pick_device(self.device))  # refused before anything is written

    def pretraining(self):
        """The pre-training run, sized to pass the toy world's topic "knee" (where held-out MLM
        loss leaves its syntax plateau near 2.2) on a laptop CPU in fp32 within minutes
        (docs/performance.md has the measurements): the tiny preset with a feed-forward of 64
        (it passes the knee as soon as 256 or 512 do, and each step costs less), 48-token inputs -- the toy world's
        sentences are ~10 tokens, so a pair still spans several sentences -- at a peak rate of
        1.5e-3; no dropout: the generated corpus is practically infinite, and a tiny model that sees each
        sentence about once has nothing to over-fit."""
        return PretrainOptions(steps=self.pretrain_steps, intermediate_size=64, max_length=48, lr=1.5e-3, dropout=0.0,
                               precision=self.precision, device=self.device)


@dataclass
class BenchOptions:
    config: str = "small"          # model size preset (tiny, small, base)
    batch_size: int = None         # sequences per step (default: 32 on a CPU, 256 on a GPU)
    vocab_size: int = None         # default: BERT's 30522 for base, else 8192
    steps: int = 10                # timed steps; the median is reported
    compare_hf: bool = False       # also time transformers' BertForMaskedLM, in the same precision
    compile: bool = False          # also time the fast rows (and transformers) under torch.compile
    precision: str = "auto"        # the fast rows' precision: fp32, bf16, or auto (fp32, and bf16 where native)
    real_fraction: float = 1.0     # the share of real tokens; the rest padding, as short documents leave
    peak_tflops: list = None       # ["bf16=989", ...]: the matmul peak to divide by, instead of measuring it
    json: str = None               # write the rows to this file
    device: str = "auto"

    def check(self):
        check_at_least(("--steps", self.steps, 1), ("--batch-size", 1 if self.batch_size is None else self.batch_size, 1),
                       ("--vocab-size", 8 if self.vocab_size is None else self.vocab_size, 8))
        if self.precision not in ("auto", "fp32", "bf16"):
            raise InputError(f"--precision: expected auto, fp32 or bf16, got {self.precision!r}")
        if not 0.05 <= self.real_fraction <= 1:
            raise InputError(f"--real-fraction must be between 0.05 and 1, got {self.real_fraction}")
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
            if precision not in ("fp32", "bf16") or not math.isfinite(peaks[precision]) or peaks[precision] <= 0:
                raise InputError(f"--peak-tflops: expected PRECISION=TFLOPS with fp32 or bf16 and a positive number "
                                 f"(e.g. bf16=989), got {given!r}")
        return peaks


def check_at_least(*flags):
    """(flag, value, least) triples: a value below its least is a one-line error naming the flag."""
    for flag, value, least in flags:
        if value < least:
            raise InputError(f"{flag} must be at least {least}, got {value}")


def check_learning_rate(lr):
    """--lr: a positive number that float32 (the weights' type, where AdamW applies it) can hold."""
    if not (math.isfinite(lr) and 0 < lr < 1e38):
        raise InputError(f"--lr must be a number > 0 (and below 1e38), got {lr}")


def sizes_given(options):
    return {name: getattr(options, name) for name in SIZE_FIELDS if getattr(options, name) is not None}


def model_config(options, **fixed):
    """options.config (a preset) with the size fields that were given and the `fixed` ones -> a
    Config. An impossible shape is an InputError naming the flags, e.g. "--config tiny:
    --hidden-size 100 is not divisible by --num-heads 3" (Config's own check, with the flags' names)."""
    given = sizes_given(options)
    try:
        return make_config(options.config, **given, **fixed)
    except ValueError as error:
        message = str(error)
        # the flag the user typed (hidden_size -> --hidden-size); max_positions is derived, not typed
        named = [name for name in (*given, *fixed) if name != "max_positions" and re.search(rf"\b{name}\b", message)]
        for name in named:
            message = re.sub(rf"\b{name}\b", "--" + name.replace("_", "-"), message)
        # the preset is part of the problem only when a size is (e.g. its heads do not divide --hidden-size)
        preset = f"--config {options.config}: " if not named or any(name in SIZE_FIELDS for name in named) else ""
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
        raise InputError("--deterministic on a GPU needs CUBLAS_WORKSPACE_CONFIG=:4096:8 in the environment before the "
                         "process first uses the GPU (ptft.py sets it itself; a script calling train.py must set it)")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark = before[1]


def attention_backends(deterministic, device):
    """Where --deterministic runs on a GPU: SDPA's math backend (plain matmuls and softmax, whose
    backward has deterministic kernels) instead of the flash / memory-efficient kernels."""
    if not (deterministic and device.type == "cuda"):
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
