"""Training: pre-training (E2/E4 + B2/B3), fine-tuning (E3, B4, section 3.2), evaluation.

Each function is a straight loop. The command line (ptft.py) only parses flags and calls:

    pretrain(...)       MLM (+ NSP) on unlabeled text -> a run folder with checkpoint.pt
    finetune(...)       a classifier from a pre-trained checkpoint or from scratch
    evaluate(...)       accuracy / macro-F1 / loss on a TSV, or held-out MLM loss on text
    fit_classifier(...) the fine-tuning loop itself, on data in memory (used by the demo)

A run folder holds checkpoint.pt, vocab.txt and metrics.json.
"""

import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import hf
from data import InputError
from model import (IGNORE_INDEX, Classifier, Config, PreTrainingModel, count_parameters, make_config,
                   mlm_loss)


# ----------------------------------------------------------------------------------------
# Small shared pieces: device, seeds, schedule, optimizer, checkpoints
# ----------------------------------------------------------------------------------------

# where tokenised corpora are cached (data.encode_documents); PTFT_CACHE="" turns it off
TOKEN_CACHE = os.environ.get("PTFT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "ptft"))


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
    AVX512-BF16/AMX, where it is ~2x faster), else fp32. fp16 only when asked (GPUs without bf16):
    pretrain then scales the loss with a GradScaler."""
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


def check_at_least(*flags):
    """(flag, value, least) triples: a value below its least is a one-line error naming the flag."""
    for flag, value, least in flags:
        if value < least:
            raise InputError(f"{flag} must be at least {least}, got {value}")


def check_learning_rate(lr):
    """--lr: a positive number that float32 (the weights' type, where AdamW applies it) can hold."""
    if not (math.isfinite(lr) and 0 < lr < 1e38):
        raise InputError(f"--lr must be a number > 0 (and below 1e38), got {lr}")


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def learning_rate(step, total_steps, peak, warmup_steps, schedule="cosine"):
    """C4: linear warmup from 0 to `peak` over warmup_steps, then cosine annealing to 0
    (or constant). `step` counts from 0; the rate is the one used for that step's update."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model, lr, weight_decay=0.01, lr_scales=None):
    """AdamW over the TRAINABLE parameters only (frozen ones are never handed to it).
    As in BERT, biases and LayerNorm weights (the 1-D parameters) get no weight decay.
    lr_scales (parameter name -> factor, see layer_lr_scales) gives each group the rate
    lr * group["lr_scale"]; the training loops multiply their schedule by it."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    lr_scales = lr_scales or {}
    groups = {}
    for name, p in trainable:
        decay = weight_decay if p.ndim >= 2 else 0.0
        scale = lr_scales.get(name, 1.0)
        groups.setdefault((decay, scale), {"params": [], "weight_decay": decay, "lr_scale": scale, "lr": lr * scale})
        groups[(decay, scale)]["params"].append(p)
    # fused: one kernel for the whole update instead of a dozen passes over every tensor -- on
    # this CPU 3.6 ms instead of 35 ms per step at `tiny` (a fifth of the training step)
    fused = all(p.device.type in ("cpu", "cuda") for _, p in trainable)
    return torch.optim.AdamW(list(groups.values()), lr=lr, betas=(0.9, 0.999), eps=1e-6, fused=fused)


def layer_lr_scales(model, decay):
    """C5c, layer-wise learning-rate decay: the layer `depth` steps below the top gets
    lr * decay**depth. The head (pooler + classifier) has depth 0, the top encoder layer 1,
    ..., the bottom layer L, the embeddings L + 1 -- the most general features, lowest rate.
    Returns parameter name -> factor."""
    num_layers = len(model.encoder.layers)
    scales = {}
    for name, _ in model.named_parameters():
        match = re.match(r"encoder\.layers\.(\d+)\.", name)
        if match:
            depth = num_layers - int(match.group(1))
        elif name.startswith("encoder.embeddings."):
            depth = num_layers + 1
        else:
            depth = 0
        scales[name] = decay ** depth
    return scales


def prepare_out_folder(out, resume=False, force=False):
    """A new run never overwrites an existing run folder unless asked to."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"{out}: exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out) and not resume:
        if not force:
            raise InputError(f"{out}: folder exists and is not empty; pass --resume to continue that run or --force to start over")
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)


def save_checkpoint(path, payload):
    """Atomic write: a temporary file in the same folder, flushed to disk, then renamed over
    the old one -- a crash at any moment leaves either the old or the new checkpoint whole."""
    temporary = f"{path}.tmp"
    with open(temporary, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def write_json(path, value):
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
    os.replace(temporary, path)


def load_checkpoint(path, log=print):
    """A run folder, a checkpoint file or a Hugging Face BERT folder -> the checkpoint dict,
    always on the CPU (a resume never needs the GPU memory of the run that wrote it).
    weights_only=True: tensors and plain values only -- a file carrying pickled code is
    refused, never executed."""
    if hf.is_hf_folder(path) and not os.path.exists(os.path.join(path, "checkpoint.pt")):
        checkpoint = hf.load(path)
        if checkpoint["fresh"]:
            log(f"{path}: the file has no weights for {', '.join(checkpoint['fresh'])}: initialised fresh")
        return checkpoint
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pt")
    if not os.path.exists(path):
        raise InputError(f"{path}: no checkpoint here (expected a run folder with checkpoint.pt, a Hugging Face "
                         "BERT folder with config.json, or 'scratch')")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unpickling failure means: not a checkpoint we can trust
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"{path}: not a ptft checkpoint ({reason[:120]})") from None
    if not isinstance(checkpoint, dict) or not {"model", "config", "vocab"} <= set(checkpoint):
        raise InputError(f"{path}: not a ptft checkpoint (expected a dict with model, config and vocab)")
    # What it holds must fit together, or a load_state_dict or an embedding lookup fails later
    # with a traceback far from the cause: the config builds a Config, the vocabulary has the
    # config's size, and the weights are exactly those a model of that config has.
    if not (isinstance(checkpoint["config"], dict) and isinstance(checkpoint["model"], dict)
            and isinstance(checkpoint["vocab"], list)):
        raise InputError(f"{path}: not a ptft checkpoint (config and model must be dicts, vocab a list)")
    try:
        config = Config(**checkpoint["config"])
        with torch.device("meta"):  # shapes only: no memory, no time, and the RNG is not touched
            if checkpoint.get("kind") == "classifier":
                expected = Classifier(config, len(checkpoint.get("labels") or [])).state_dict()
            else:
                expected = PreTrainingModel(config).state_dict()
    except (TypeError, ValueError) as error:  # e.g. an unknown field, a size that is not a whole number
        raise InputError(f"{path}: the config is not valid ({error})") from None
    if len(checkpoint["vocab"]) != config.vocab_size:
        raise InputError(f"{path}: the vocabulary has {len(checkpoint['vocab'])} tokens, config says vocab_size {config.vocab_size}")
    for name, value in checkpoint["model"].items():
        if name not in expected:
            raise InputError(f"{path}: weight {name} is not part of a model with this config")
        if not isinstance(value, torch.Tensor) or value.shape != expected[name].shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise InputError(f"{path}: weight {name} has shape {shape}, config says {tuple(expected[name].shape)}")
    missing = [name for name in expected if name not in checkpoint["model"]]
    if missing:
        raise InputError(f"{path}: weight {missing[0]} is missing"
                         f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")
    return checkpoint


def checkpoint_config(checkpoint):
    try:
        return Config(**checkpoint["config"])
    except (TypeError, ValueError) as error:
        raise InputError(f"checkpoint config is not valid: {error}") from None


def make_model_config(preset, sizes, **fixed):
    """--config PRESET, with the size flags that were given (sizes: hidden_size, num_layers,
    num_heads, intermediate_size -> a value or None) and the `fixed` fields -> a Config.
    An impossible shape is an InputError naming the flags, e.g. "--config tiny: --hidden-size
    100 is not divisible by --num-heads 3" (Config's own check, with the flags' names)."""
    given = {name: value for name, value in (sizes or {}).items() if value is not None}
    try:
        return make_config(preset, **given, **fixed)
    except ValueError as error:
        message = str(error)
        for name in given:  # hidden_size -> --hidden-size: the flag the user typed
            message = message.replace(name, "--" + name.replace("_", "-"))
        raise InputError(f"--config {preset}: {message}") from None


def encoder_weights(checkpoint):
    """The encoder's part of a checkpoint's state dict (what fine-tuning starts from: theta_0)."""
    return {key[len("encoder."):]: value for key, value in checkpoint["model"].items() if key.startswith("encoder.")}


def to_tensors(batch, device):
    return {key: torch.from_numpy(value).to(device) for key, value in batch.items()}


# ----------------------------------------------------------------------------------------
# Pre-training
# ----------------------------------------------------------------------------------------


def load_pretraining_corpus(corpus):
    """--corpus: None -> the toy world (embedded default), ["stdlib"] -> the standard
    library's docstrings, else a list of plain-text files. Returns (name, documents)."""
    if not corpus:
        return "toy-world", data.toy_world(seed=0)["unlabeled"]
    if corpus == ["stdlib"]:
        return "stdlib", data.stdlib_corpus()
    return ",".join(corpus), data.read_corpus(corpus)


def split_held_out(documents, fraction=0.02, seed=1234):
    """Documents -> (training, held-out). The held-out documents (2%, at most 500) measure
    the MLM loss on text the model never trains on. None are held out below 20 documents."""
    if len(documents) < 20:
        return documents, []
    order = np.random.default_rng(seed).permutation(len(documents))
    held = min(500, max(1, int(len(documents) * fraction)))
    return [documents[i] for i in order[held:]], [documents[i] for i in order[:held]]


def held_out_batches(documents, tokenizer, max_length, use_nsp, batch_size=64, num_batches=8, seed=4321):
    """A fixed set of masked held-out batches: the same masks at every evaluation, so the
    numbers are comparable across steps and runs."""
    if not documents:
        return []
    rng = np.random.default_rng(seed)
    use_nsp = use_nsp and len(documents) >= 2
    return [data.pretraining_batch(documents, tokenizer, rng, batch_size, max_length, use_nsp)
            for _ in range(num_batches)]


@torch.no_grad()
def mlm_evaluation(model, batches, device, precision="fp32"):
    """Held-out MLM loss (mean over all masked tokens, E4) and NSP accuracy."""
    was_training = model.training
    model.eval()
    total_loss, total_masked, nsp_correct, nsp_total = 0.0, 0, 0, 0
    for batch in batches:
        batch = to_tensors(batch, device)
        with autocast(device, precision):
            sequence_output, pooled = model.encoder(batch["input_ids"], batch["segment_ids"], batch["attention_mask"])
            scores = model.mlm_scores(sequence_output, batch["mlm_labels"])
            nsp_predictions = model.nsp_head(pooled).argmax(-1)
        targets = batch["mlm_labels"][batch["mlm_labels"] != IGNORE_INDEX]
        total_loss += mlm_loss(scores, targets, num_masked_total=1).item()  # E4's sum over M
        total_masked += targets.numel()
        nsp_correct += (nsp_predictions == batch["nsp_labels"]).sum().item()
        nsp_total += len(batch["nsp_labels"])
    model.train(was_training)
    return {"mlm_loss": total_loss / max(total_masked, 1), "nsp_accuracy": nsp_correct / max(nsp_total, 1)}


def pretrain(out, corpus=None, config="tiny", init=None, steps=2000, batch_size=64, max_length=64, lr=1e-3,
             warmup_steps=None, nsp=True, nsp_weight=1.0, mask_probability=0.15, vocab_size=None,
             accumulation=1, precision="auto", save_every=500, eval_every=250, resume=False,
             force=False, seed=0, device="auto", attention="sdpa", dropout=0.1, sizes=None, lowercase=True,
             compile=False, log=print, progress=True, mask_token_fraction=0.8, random_token_fraction=0.1,
             snapshot_steps=()):
    """E2 via E4 (+ B2, weighted by B3): pre-train an encoder on unlabeled text -- from a random
    initialisation, or (init: a run folder or a Hugging Face BERT folder) continue pre-training
    an existing one with its vocabulary.

    sizes: the --hidden-size/--num-layers/--num-heads/--intermediate-size flags (None: the preset's).
    compile: run the training forward through torch.compile (the weights are the same module's).
    mask_token_fraction / random_token_fraction: B1's 80/10/10 rule (C6 compares 100% [MASK]).
    Writes OUT/checkpoint.pt (also every save_every steps), OUT/vocab.txt, OUT/metrics.json, and
    OUT/snapshot-N.pt at each step N of snapshot_steps (C6: one run serves a budget sweep).
    Returns the metrics dict."""
    # Every flag is checked before any work: a bad one is one line (exit status 2), not a crash later.
    check_at_least(("--steps", steps, 1), ("--batch-size", batch_size, 1), ("--accum", accumulation, 1),
                   ("--max-length", max_length, 8), ("--warmup-steps", warmup_steps or 0, 0),
                   ("--save-every", save_every, 0), ("--eval-every", eval_every, 1))
    check_learning_rate(lr)
    if not (math.isfinite(nsp_weight) and nsp_weight >= 0):
        raise InputError(f"--nsp-weight (lambda in B3) must be a finite number >= 0, got {nsp_weight}")
    if not 0 < mask_probability < 1:
        raise InputError(f"--mask-probability must be between 0 and 1, got {mask_probability}")
    if not 0 <= dropout < 1:
        raise InputError(f"--dropout must be at least 0 and below 1, got {dropout}")
    if not (mask_token_fraction >= 0 and random_token_fraction >= 0 and mask_token_fraction + random_token_fraction <= 1):
        raise InputError(f"--mask-token-fraction {mask_token_fraction} and --random-token-fraction {random_token_fraction}: "
                         "each at least 0, together at most 1 (the rest stay unchanged; B1: 0.8 and 0.1)")
    if init and any(value is not None for value in (sizes or {}).values()):
        raise InputError("--hidden-size, --num-layers, --num-heads, --intermediate-size: not with --init "
                         "(continued pre-training keeps the size of the model it starts from)")
    vocab_size = vocab_size or (8192 if corpus else 2048)  # 2048 on the toy world
    requested = make_model_config(config, sizes, vocab_size=vocab_size, max_positions=max(128, max_length),
                                  attention=attention, dropout=dropout, attention_dropout=dropout)
    device = pick_device(device)
    precision = pick_precision(precision, device)
    prepare_out_folder(out, resume, force)
    checkpoint_path = os.path.join(out, "checkpoint.pt")
    resuming = resume and os.path.exists(checkpoint_path)
    name, documents = load_pretraining_corpus(corpus)
    training_documents, held_out_documents = split_held_out(documents)

    if resuming:
        checkpoint = load_checkpoint(checkpoint_path)
        if checkpoint.get("kind") != "pretraining":
            raise InputError(f"{checkpoint_path}: not a pre-training checkpoint, cannot --resume it")
        model_config = checkpoint_config(checkpoint)
        tokenizer = data.Tokenizer(checkpoint["vocab"], checkpoint.get("lowercase", True))
        expected = dict(corpus=name, config=config, init=init, nsp=nsp, max_length=max_length, batch_size=batch_size,
                        vocab_size=vocab_size)
        found = {key: checkpoint.get("run", {}).get(key) for key in expected}
        # and the model itself: its sizes (with --init: the init's, compared through init above),
        # dropout and attention -- a resumed run that silently kept other ones would not be the run asked for
        fields = ["dropout", "attention"] + ([] if init else ["hidden_size", "num_layers", "num_heads", "intermediate_size"])
        expected.update({field: getattr(requested, field) for field in fields})
        found.update({field: getattr(model_config, field) for field in fields})
        if found != expected:
            differing = ", ".join(f"{k}: checkpoint {found[k]!r} vs now {expected[k]!r}" for k in expected if found[k] != expected[k])
            raise InputError(f"{checkpoint_path}: --resume with different settings ({differing})")
    elif init:
        initial = load_checkpoint(init, log)
        if initial.get("kind") != "pretraining":
            raise InputError(f"{init}: a classifier checkpoint; continued pre-training needs a pre-training run or a BERT folder")
        model_config = replace(checkpoint_config(initial), attention=attention, dropout=dropout, attention_dropout=dropout)
        tokenizer = data.Tokenizer(initial["vocab"], initial.get("lowercase", True))
    else:
        log(f"building a {vocab_size}-token WordPiece vocabulary from {name} ...")
        tokenizer = data.train_tokenizer((s for d in training_documents for s in d), vocab_size, lowercase)
        model_config = replace(requested, vocab_size=len(tokenizer))  # a small corpus may give fewer tokens
    if max_length > model_config.max_positions:
        raise InputError(f"--max-length {max_length} exceeds the position table ({model_config.max_positions})")
    tokenizer.save(os.path.join(out, "vocab.txt"))
    encoded = data.encode_documents(tokenizer, training_documents, TOKEN_CACHE)
    if nsp and (len(encoded) < 2 or not any(len(d) >= 2 for d in encoded)):
        raise InputError(f"{name}: next-sentence prediction needs at least 2 documents (separated by a blank line), "
                         "one of them with 2 or more lines; or pass --no-nsp")
    held_out = held_out_batches(data.encode_documents(tokenizer, held_out_documents), tokenizer, max_length, nsp)

    data_rng = seed_everything(seed)
    model = PreTrainingModel(model_config).to(device)
    optimizer = make_optimizer(model, lr)
    # fp16 keeps 5 exponent bits: small gradients would underflow to 0. The GradScaler multiplies
    # the loss by S before backward, divides the gradients by S before the update, and skips a step
    # whose scaled gradients overflowed (then halves S). bf16 has fp32's range: no scaler (disabled).
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    # --compile: torch.compile traces and fuses the forward; the first steps are slow while it
    # compiles. It shares `model`'s weights; `model` is what we evaluate and save (clean names).
    training_model = torch.compile(model) if compile else model
    warmup_steps = warmup_steps if warmup_steps is not None else max(1, steps // 20)
    start_step, history = 0, []
    if init and not resuming:
        model.load_state_dict(initial["model"])
    if resuming:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        start_step, history = checkpoint["step"], checkpoint.get("history", [])
        data_rng.bit_generator.state = checkpoint["rng"]["numpy"]
        random.setstate(checkpoint["rng"]["python"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if device.type == "cuda" and checkpoint["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])  # dropout masks drawn on the GPU
        log(f"resuming {out} at step {start_step}")
    log(f"pre-training {f'from {init}' if init else f'a {config} encoder'} ({count_parameters(model.encoder):,} parameters, vocab {len(tokenizer)}) "
        f"on {name}: {len(encoded)} documents, {sum(len(s) for d in encoded for s in d):,} tokens; "
        f"{held_out_documents and len(held_out_documents) or 'no'} held out; {device}, {precision}")

    def rng_states():
        return {"numpy": data_rng.bit_generator.state, "python": random.getstate(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []}

    def save(step, rng, path=checkpoint_path):
        payload = {
            "kind": "pretraining", "model": model.state_dict(), "config": model_config.to_dict(),
            "vocab": tokenizer.vocab, "lowercase": tokenizer.lowercase, "step": step,
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "history": history, "rng": rng,
            "run": dict(corpus=name, config=config, init=init, nsp=nsp, max_length=max_length, batch_size=batch_size,
                        vocab_size=vocab_size, lr=lr, steps=steps, seed=seed, mask_probability=mask_probability),
        }
        save_checkpoint(path, payload)

    def stop(step, what):
        bar.close()  # the progress bar's line ends before the error's
        kept = f"{checkpoint_path} (step {last_saved}) is untouched" if last_saved is not None else "no checkpoint was written"
        raise TrainingDiverged(f"step {step}: {what}; {kept} -- try a lower --lr")

    model.train()
    started, tokens_seen, last = time.time(), 0, {}
    # The checkpoint of step k is written only once the weights after step k are known to be good:
    # when step k+1's losses and gradient norm have come out finite (the last one: when every weight
    # is finite). A diverging run therefore never replaces the last good checkpoint with bad weights.
    save_pending, last_saved = False, start_step if resuming else None
    bar = tqdm(range(start_step, steps), initial=start_step, total=steps, desc="pre-train",
               disable=not progress, dynamic_ncols=True)
    for step in bar:
        # nothing draws between the end of the previous update and here: these are the RNG states a
        # resume from the previous step's checkpoint needs to draw the same batches, masks and dropout
        rng_at_start = rng_states()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr, warmup_steps)
        micro_batches = [data.pretraining_batch(encoded, tokenizer, data_rng, batch_size, max_length, nsp,
                                                mask_probability, mask_token_fraction, random_token_fraction)
                         for _ in range(accumulation)]
        # gradient accumulation: every micro-batch's MLM loss is divided by the masked-token
        # count of ALL micro-batches, so the summed gradient is the one big batch would give
        num_masked_total = sum(int((b["mlm_labels"] != IGNORE_INDEX).sum()) for b in micro_batches)
        loss_mlm_total, loss_nsp_total = 0.0, 0.0
        for micro_batch in micro_batches:
            micro_batch = to_tensors(micro_batch, device)
            with autocast(device, precision):
                loss, loss_mlm, loss_nsp = training_model(
                    micro_batch["input_ids"], micro_batch["segment_ids"], micro_batch["attention_mask"],
                    micro_batch["mlm_labels"], micro_batch["nsp_labels"] if nsp else None,
                    nsp_weight=nsp_weight / accumulation, num_masked_total=num_masked_total)
            scaler.scale(loss).backward()  # = loss.backward() unless fp16
            loss_mlm_total += loss_mlm.item()
            loss_nsp_total += 0.0 if loss_nsp is None else loss_nsp.item() / accumulation
            tokens_seen += int(micro_batch["attention_mask"].sum())
        scaler.unscale_(optimizer)  # the true gradients (fp16), for clipping and the norm check
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()  # before clipping
        diverged = [f"{loss_name} loss is {value}" for loss_name, value in (("MLM", loss_mlm_total), ("NSP", loss_nsp_total))
                    if not math.isfinite(value)]
        # finite losses can still overflow in the backward pass; under fp16 that is the scaler's
        # business (an occasional skipped step), otherwise it is divergence
        if not diverged and not math.isfinite(grad_norm) and not scaler.is_enabled():
            diverged = [f"the gradient norm is {grad_norm} (MLM loss {loss_mlm_total:.3f})"]
        if diverged:
            stop(step + 1, ", ".join(diverged))
        if save_pending:  # the weights after step `step` made finite losses and gradients: they are good
            save(step, rng_at_start)
            save_pending, last_saved = False, step
        scaler.step(optimizer)  # = optimizer.step(), except a skipped fp16 step that overflowed
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        last = {"step": step + 1, "train_mlm_loss": loss_mlm_total, "train_nsp_loss": loss_nsp_total if nsp else None}
        elapsed = time.time() - started
        bar.set_postfix(mlm=f"{loss_mlm_total:.3f}", tok_s=f"{tokens_seen / max(elapsed, 1e-9):,.0f}")
        if held_out and ((step + 1) % eval_every == 0 or step + 1 == steps):
            evaluation = mlm_evaluation(model, held_out, device, precision)
            last.update({"held_out_mlm_loss": evaluation["mlm_loss"], "held_out_nsp_accuracy": evaluation["nsp_accuracy"]})
            history.append(last)
            bar.write(f"step {step + 1}: train MLM {loss_mlm_total:.3f}, held-out MLM {evaluation['mlm_loss']:.3f}"
                      + (f", held-out NSP accuracy {evaluation['nsp_accuracy']:.3f}" if nsp else ""))
        if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            save_pending = True  # written during the next step, once its loss vouches for these weights
        if step + 1 in snapshot_steps:  # a snapshot for C6's budget sweep (not vouched for: it is not resumed from)
            save(step + 1, rng_states(), os.path.join(out, f"snapshot-{step + 1}.pt"))
    bar.close()
    # no next step vouches for the last update: look at the weights themselves
    not_finite = [name for name, value in model.named_parameters() if not torch.isfinite(value).all()]
    if not_finite:
        stop(steps, f"weight {not_finite[0]} is not finite after the last update")
    save(steps, rng_states())
    metrics = {**last, "final_train_mlm_loss": last.get("train_mlm_loss"),
               "held_out_mlm_loss": last.get("held_out_mlm_loss"), "ln_vocab": math.log(len(tokenizer)),
               "seconds": time.time() - started, "tokens_per_second": tokens_seen / max(time.time() - started, 1e-9),
               "corpus": name, "history": history}
    write_json(os.path.join(out, "metrics.json"), metrics)
    return metrics


class TrainingDiverged(Exception):
    """A loss or the gradient norm became NaN or infinite. ptft.py reports it and exits with status 3."""


# ----------------------------------------------------------------------------------------
# Fine-tuning
# ----------------------------------------------------------------------------------------


def parse_freeze(freeze, num_layers):
    """--freeze head | top-K | none -> the number of encoder layers that train (from the top).

    head:  the encoder (embeddings + all layers) is frozen; the head (pooler + classifier) trains
    top-K: the top K layers and the head train; embeddings and lower layers are frozen
    none:  everything trains (full fine-tuning)"""
    if freeze == "head":
        return 0
    if freeze == "none":
        return None
    match = re.fullmatch(r"top-(\d+)", freeze or "")
    if not match:
        raise InputError(f"--freeze: expected head, top-K (e.g. top-2) or none, got {freeze!r}")
    k = int(match.group(1))
    if k > num_layers:
        raise InputError(f"--freeze top-{k}: the model has only {num_layers} layers")
    return k


def freeze_below(model, trainable_layers):
    """C3 / B4: keep the pre-trained values of everything below the top `trainable_layers`
    layers. Frozen parameters get requires_grad=False (so they are never in the optimizer and
    get no gradient). Returns the frozen modules: the training loop runs them in eval mode
    (no dropout) -- they are fixed feature extractors, and dropout in them would only add noise
    to the features the head learns from."""
    if trainable_layers is None:
        return []
    layers = model.encoder.layers
    frozen = [model.encoder.embeddings, *layers[: len(layers) - trainable_layers]]
    for module in frozen:
        module.requires_grad_(False)
    return frozen


@torch.no_grad()
def classify(model, rows, labels, device, batch_size=128, pad_id=0):
    """Accuracy, macro-F1, mean cross-entropy and n over (rows of ids, integer labels)."""
    model.eval()
    total_loss, predictions = 0.0, []
    for start in range(0, len(rows), batch_size):
        input_ids, mask = data.pad(rows[start:start + batch_size], pad_id)
        logits = model(torch.from_numpy(input_ids).to(device), None, torch.from_numpy(mask).to(device)).float()
        target = torch.tensor(labels[start:start + batch_size], device=device)
        total_loss += F.cross_entropy(logits, target, reduction="sum").item()
        predictions.extend(logits.argmax(-1).tolist())
    predictions, labels = np.array(predictions), np.array(labels)
    f1s = []
    for label in np.unique(np.concatenate([labels, predictions])):
        true_positive = np.sum((predictions == label) & (labels == label))
        precision = true_positive / max(1, np.sum(predictions == label))
        recall = true_positive / max(1, np.sum(labels == label))
        f1s.append(0.0 if true_positive == 0 else 2 * precision * recall / (precision + recall))
    return {"accuracy": float(np.mean(predictions == labels)), "macro_f1": float(np.mean(f1s)),
            "loss": total_loss / len(labels), "n": int(len(labels))}


def l2_sp_penalty(model, theta_0, strength):
    """C5a, L2-SP: an L2 penalty toward the pre-trained weights theta_0, not toward zero.

        Omega(phi) = strength / 2 * sum_j || phi_j - theta_0,j ||^2      (j: trainable encoder weights)

    theta_0 maps encoder parameter names to their pre-trained values (the head is new and
    has no theta_0). Its gradient is strength * (phi_j - theta_0,j): a spring back to theta_0."""
    terms = [((p - theta_0[name]) ** 2).sum() for name, p in model.encoder.named_parameters() if name in theta_0]
    return strength / 2 * torch.stack(terms).sum() if terms else torch.zeros(())


def fit_classifier(train_rows, train_labels, num_labels, config, encoder_state=None, freeze="none",
                   epochs=20, lr=1e-3, batch_size=16, warmup_fraction=0.1, seed=0, device="cpu",
                   pad_id=0, progress=False, schedule="cosine", l2_sp=0.0, layer_lr_decay=1.0,
                   aux_mlm=0.0, pretrained_state=None, aux_batches=None, held_out=None):
    """E3: minimise the mean cross-entropy of the classifier over the labeled set D.

    phi starts from the pre-trained theta_0 (encoder_state) or, for the baseline, from a random
    initialisation of the same architecture (encoder_state=None). Returns (model, info).

    C4: warmup over warmup_fraction of the steps (0: none), then `schedule` (cosine or constant).
    C5, the remedies against forgetting (composable; 0 / 1.0 switch them off):
      l2_sp:          strength of the L2 penalty toward theta_0 (l2_sp_penalty)
      layer_lr_decay: lower layers train with smaller rates (layer_lr_scales)
      aux_mlm:        weight of E4's MLM loss on unlabeled batches (aux_batches, an iterator of
                      data.pretraining_batch dicts), computed with the pre-trained MLM head
    pretrained_state (a PreTrainingModel state dict: encoder + MLM head) is needed by aux_mlm
    and, with held_out (held_out_batches), measures forgetting: the held-out MLM loss of the
    encoder under the pre-trained MLM head, before and after fine-tuning."""
    seed_everything(seed)
    model = Classifier(config, num_labels)
    if encoder_state is not None:
        model.encoder.load_state_dict(encoder_state)  # strict: every encoder weight must be there
    trainable_layers = parse_freeze(freeze, config.num_layers)
    if aux_mlm and (trainable_layers == 0 or pretrained_state is None):
        raise InputError("--aux-mlm: needs a trainable encoder (not --freeze head) and an init with an MLM head")
    frozen = freeze_below(model, trainable_layers)
    model.to(device)
    # The MLM model shares the classifier's encoder (the same modules, not a copy): its MLM loss
    # is the loss of the encoder being fine-tuned. Its heads stay at their pre-trained values.
    mlm_model = None
    if pretrained_state is not None:
        mlm_model = PreTrainingModel(config)
        mlm_model.load_state_dict(pretrained_state)
        mlm_model.encoder = model.encoder
        mlm_model.mlm_head.requires_grad_(False)
        mlm_model.nsp_head.requires_grad_(False)
        mlm_model.to(device)
    mlm_loss_before = mlm_evaluation(mlm_model, held_out, device)["mlm_loss"] if mlm_model and held_out else None
    theta_0 = {name: p.detach().clone() for name, p in model.encoder.named_parameters()
               if p.requires_grad and not name.startswith("pooler.")} if l2_sp else None  # the pooler is head
    lr_scales = layer_lr_scales(model, layer_lr_decay) if layer_lr_decay != 1.0 else None
    optimizer = make_optimizer(model, lr, lr_scales=lr_scales)
    rng = np.random.default_rng(seed)
    steps_per_epoch = math.ceil(len(train_rows) / batch_size)
    total_steps = epochs * steps_per_epoch
    warmup_steps = max(1, int(warmup_fraction * total_steps)) if warmup_fraction > 0 else 0
    step, started = 0, time.time()
    bar = tqdm(total=total_steps, desc=f"fine-tune ({freeze})", disable=not progress, dynamic_ncols=True)
    for epoch in range(epochs):
        model.train()
        for module in frozen:
            module.eval()  # frozen layers: no dropout (see freeze_below)
        order = rng.permutation(len(train_rows))
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            input_ids, mask = data.pad([train_rows[i] for i in index], pad_id)
            target = torch.tensor([train_labels[i] for i in index], device=device)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, total_steps, lr, warmup_steps, schedule) * group["lr_scale"]
            logits = model(torch.from_numpy(input_ids).to(device), None, torch.from_numpy(mask).to(device))
            # E3: l(f_phi(x), y) = cross-entropy, averaged over the batch
            loss = F.cross_entropy(logits.float(), target)
            # E3 with the C5 remedies added:
            #   L(phi) = E3's loss + l2_sp / 2 * sum_j ||phi_j - theta_0,j||^2 + aux_mlm * L_MLM(phi)   (E4)
            if l2_sp:
                loss = loss + l2_sp_penalty(model, theta_0, l2_sp)
            if aux_mlm:
                batch = to_tensors(next(aux_batches), device)
                loss = loss + aux_mlm * mlm_model(batch["input_ids"], batch["segment_ids"], batch["attention_mask"],
                                                  batch["mlm_labels"])[1]
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()  # before clipping
            if not math.isfinite(loss.item()) or not math.isfinite(grad_norm):
                bar.close()
                raise TrainingDiverged(f"fine-tuning step {step + 1}: classification loss is {loss.item()}, gradient "
                                       f"norm {grad_norm}; nothing was written -- try a lower --lr")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    info = {"steps": step, "seconds": time.time() - started, "train_loss": loss.item(),
            "trainable_parameters": count_parameters(model, trainable_only=True),
            "total_parameters": count_parameters(model)}
    if mlm_loss_before is not None:
        # C5: forgetting = how much worse the fine-tuned encoder does the pre-training task
        mlm_loss_after = mlm_evaluation(mlm_model, held_out, device)["mlm_loss"]
        info.update(mlm_loss_before=mlm_loss_before, mlm_loss_after=mlm_loss_after,
                    forgetting=mlm_loss_after - mlm_loss_before)
    return model, info


def encode_labels(labels, label_names, path):
    index = {name: i for i, name in enumerate(label_names)}
    unknown = [(number, label) for number, label in enumerate(labels, start=1) if label not in index]
    if unknown:
        number, label = unknown[0]
        raise InputError(f"{path}: example {number}: label {label!r} never appears in the training file "
                         f"(known: {', '.join(label_names[:10])}{' ...' if len(label_names) > 10 else ''})")
    return [index[label] for label in labels]


# Default learning rates (C4): a frozen encoder with only the head training tolerates (and
# needs) a large rate; see README for what we measured for full fine-tuning at this scale.
DEFAULT_FINETUNE_LR = {"head": 1e-3, "top": 1e-3, "none": 3e-4}


def unlabeled_text(checkpoint, corpus=None):
    """The unlabeled text behind a pre-trained checkpoint, split as pre-training split it:
    (training documents, held-out documents). corpus as pretrain's --corpus; by default the
    corpus the checkpoint was pre-trained on, when that is known and still readable (a
    Hugging Face folder's is not). None when there is no text."""
    if not corpus:
        name = checkpoint.get("run", {}).get("corpus")
        if name == "stdlib":
            corpus = ["stdlib"]
        elif name and name != "toy-world" and all(os.path.exists(path) for path in name.split(",")):
            corpus = name.split(",")
        elif name != "toy-world":
            return None
    return split_held_out(load_pretraining_corpus(corpus)[1])


def mlm_batch_stream(encoded_documents, tokenizer, batch_size, max_length, seed):
    """--aux-mlm's batches: an endless stream of MLM-only batches (B1 masking), one per step."""
    rng = np.random.default_rng(seed)
    while True:
        yield data.pretraining_batch(encoded_documents, tokenizer, rng, batch_size, max_length, use_nsp=False)


def finetune(out, init, train, valid=None, freeze="none", epochs=20, lr=None, batch_size=16,
             config="tiny", max_length=128, vocab_size=8192, seed=0, device="auto", force=False,
             log=print, progress=True, sizes=None, schedule="cosine", warmup_fraction=0.1, l2_sp=0.0, aux_mlm=0.0,
             layer_lr_decay=1.0, unlabeled=None, mlm_max_length=64):
    """Fine-tune a classifier on TRAIN (TSV) from INIT (a pre-training run folder) or 'scratch'.
    sizes (with 'scratch' only): the --hidden-size/--num-layers/--num-heads/--intermediate-size flags.
    Writes OUT/checkpoint.pt, OUT/vocab.txt, OUT/metrics.json (metrics on VALID, or on TRAIN without it).

    The C4 schedule and C5 remedies are fit_classifier's. When INIT has an MLM head, metrics.json
    also holds forgetting: the held-out MLM loss before and after (mlm_loss_before/after) on
    unlabeled text (`unlabeled`, as --corpus; default: INIT's pre-training corpus, held-out part)."""
    check_at_least(("--epochs", epochs, 1), ("--batch-size", batch_size, 1), ("--max-length", max_length, 8))
    if lr is not None:
        check_learning_rate(lr)
    if init != "scratch" and any(value is not None for value in (sizes or {}).values()):
        raise InputError("--hidden-size, --num-layers, --num-heads, --intermediate-size: only with --init scratch "
                         "(a pre-trained model keeps its size)")
    if init == "scratch":  # an impossible shape is refused before any work
        make_model_config(config, sizes, max_positions=max_length)
    if schedule not in ("cosine", "constant"):
        raise InputError(f"--schedule: expected cosine or constant, got {schedule!r}")
    if l2_sp < 0 or aux_mlm < 0 or not 0 < layer_lr_decay <= 1 or not 0 <= warmup_fraction < 1:
        raise InputError("--l2-sp and --aux-mlm must be >= 0, --layer-lr-decay in (0, 1], --warmup-fraction in [0, 1)")
    if aux_mlm and freeze == "head":
        raise InputError("--aux-mlm with --freeze head: the encoder is frozen, an MLM loss on it would change nothing")
    if (l2_sp or aux_mlm) and init == "scratch":
        raise InputError("--l2-sp and --aux-mlm pull toward a pre-trained model; --init scratch has none")
    device = pick_device(device)
    train_texts, train_label_names = data.read_tsv(train)
    label_names = sorted(set(train_label_names))
    if len(label_names) < 2:
        raise InputError(f"{train}: only one class ({label_names[0]!r}); a classifier needs at least two")
    valid_texts, valid_labels = data.read_tsv(valid) if valid else ([], [])
    valid_ids = encode_labels(valid_labels, label_names, valid) if valid else []
    if init == "scratch":
        tokenizer = data.train_tokenizer(train_texts, vocab_size)
        model_config = make_model_config(config, sizes, vocab_size=len(tokenizer), max_positions=max_length)
        encoder_state = None
    else:
        checkpoint = load_checkpoint(init)
        model_config = checkpoint_config(checkpoint)
        tokenizer = data.Tokenizer(checkpoint["vocab"], checkpoint.get("lowercase", True))
        encoder_state = encoder_weights(checkpoint)
    has_mlm_head = init != "scratch" and checkpoint.get("kind") == "pretraining" and "mlm_head" not in checkpoint.get("fresh", [])
    if aux_mlm and not has_mlm_head:
        raise InputError(f"--aux-mlm: {init} has no pre-trained MLM head (a classifier checkpoint or a headless BERT)")
    parse_freeze(freeze, model_config.num_layers)  # refuse a bad value before any work
    # C5: forgetting is measured on held-out unlabeled text; --aux-mlm trains on the rest
    text = unlabeled_text(checkpoint, unlabeled) if has_mlm_head else None
    if aux_mlm and not (text and text[0]):
        raise InputError(f"--aux-mlm: no unlabeled text for {init}; name it with --unlabeled FILE (or stdlib)")
    pretrained_state, held_out, aux_batches = None, None, None
    if text:
        mlm_max_length = min(mlm_max_length, model_config.max_positions)
        pretrained_state = checkpoint["model"]
        held_out = held_out_batches(data.encode_documents(tokenizer, text[1]), tokenizer, mlm_max_length, use_nsp=False)
        if aux_mlm:
            aux_batches = mlm_batch_stream(data.encode_documents(tokenizer, text[0]), tokenizer, batch_size,
                                           mlm_max_length, seed)
    elif has_mlm_head:
        log(f"{init}: its pre-training text is unknown; pass --unlabeled to measure forgetting")
    if lr is None:
        lr = DEFAULT_FINETUNE_LR[freeze.split("-")[0]]
    prepare_out_folder(out, resume=False, force=force)
    train_rows = data.classification_inputs(tokenizer, train_texts, model_config.max_positions, log, path=train)
    valid_rows = data.classification_inputs(tokenizer, valid_texts, model_config.max_positions, log, path=valid)
    log(f"fine-tuning from {init} with --freeze {freeze}: {len(train_rows)} examples, "
        f"{len(label_names)} classes, {epochs} epochs, lr {lr:g}, device {device}")
    model, info = fit_classifier(train_rows, encode_labels(train_label_names, label_names, train),
                                 len(label_names), model_config, encoder_state, freeze, epochs, lr,
                                 batch_size, seed=seed, device=device, pad_id=tokenizer.pad_id, progress=progress,
                                 schedule=schedule, warmup_fraction=warmup_fraction, l2_sp=l2_sp,
                                 layer_lr_decay=layer_lr_decay, aux_mlm=aux_mlm, pretrained_state=pretrained_state,
                                 aux_batches=aux_batches, held_out=held_out)
    metrics = {**info, "init": init, "freeze": freeze, "lr": lr, "epochs": epochs, "labels": label_names,
               "schedule": schedule, "warmup_fraction": warmup_fraction, "l2_sp": l2_sp, "aux_mlm": aux_mlm,
               "layer_lr_decay": layer_lr_decay,
               "scored_on": valid or f"{train} (training set: no --valid given)"}
    if valid:
        metrics.update(classify(model, valid_rows, valid_ids, device, pad_id=tokenizer.pad_id))
    else:
        metrics.update(classify(model, train_rows, encode_labels(train_label_names, label_names, train), device,
                                pad_id=tokenizer.pad_id))
    tokenizer.save(os.path.join(out, "vocab.txt"))
    save_checkpoint(os.path.join(out, "checkpoint.pt"), {
        "kind": "classifier", "model": model.state_dict(), "config": model_config.to_dict(),
        "vocab": tokenizer.vocab, "lowercase": tokenizer.lowercase, "labels": label_names,
        "step": info["steps"], "run": {"init": str(init), "freeze": freeze, "lr": lr, "epochs": epochs, "seed": seed}})
    write_json(os.path.join(out, "metrics.json"), metrics)
    return metrics


# ----------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------


def evaluate(init, data_path, device="auto", log=print):
    """A classifier checkpoint on a TSV -> accuracy, macro-F1, loss, n.
    A pre-training checkpoint on a text corpus -> held-out MLM loss (E4) and NSP accuracy."""
    device = pick_device(device)
    checkpoint = load_checkpoint(init)
    model_config = checkpoint_config(checkpoint)
    tokenizer = data.Tokenizer(checkpoint["vocab"], checkpoint.get("lowercase", True))
    if checkpoint.get("kind") == "classifier":
        texts, labels = data.read_tsv(data_path)
        label_ids = encode_labels(labels, checkpoint["labels"], data_path)
        model = Classifier(model_config, len(checkpoint["labels"]))
        model.load_state_dict(checkpoint["model"])
        rows = data.classification_inputs(tokenizer, texts, model_config.max_positions, log, path=data_path)
        return classify(model.to(device), rows, label_ids, device, pad_id=tokenizer.pad_id)
    model = PreTrainingModel(model_config)
    model.load_state_dict(checkpoint["model"])
    documents = data_path and (data.stdlib_corpus() if data_path == "stdlib" else data.read_corpus([data_path]))
    encoded = data.encode_documents(tokenizer, documents)
    max_length = min(model_config.max_positions, checkpoint.get("run", {}).get("max_length", 128))
    batches = held_out_batches(encoded, tokenizer, max_length, use_nsp=len(encoded) >= 2)
    result = mlm_evaluation(model.to(device), batches, device)
    result["n"] = int(sum((b["mlm_labels"] != IGNORE_INDEX).sum() for b in batches))
    return result


@torch.no_grad()
def fill_mask(init, text, top_k=5, device="auto", log=print):
    """The MLM head's prediction at every [MASK] of TEXT: a list with, per [MASK], the top_k
    (token, probability) pairs, best first. The probability is E4's softmax over the vocabulary
    -- the distribution whose log the MLM loss sums over the masked set M."""
    device = pick_device(device)
    checkpoint = load_checkpoint(init, log)
    if checkpoint.get("kind") != "pretraining":
        raise InputError(f"{init}: a classifier checkpoint has no MLM head; fill-mask needs a pre-trained one")
    if "mlm_head" in checkpoint.get("fresh", []):
        raise InputError(f"{init}: the file has no MLM head weights (a sentence-embedding model?); fill-mask needs them")
    model_config = checkpoint_config(checkpoint)
    tokenizer = data.Tokenizer(checkpoint["vocab"], checkpoint.get("lowercase", True))
    if top_k < 1:
        raise InputError(f"--top-k must be positive, got {top_k}")
    input_ids = [tokenizer.cls_id, *tokenizer.encode(text), tokenizer.sep_id]
    if tokenizer.mask_id not in input_ids:
        raise InputError(f"no {data.MASK} in the text; write {data.MASK} where a token should be predicted")
    if len(input_ids) > model_config.max_positions:
        raise InputError(f"the text is {len(input_ids)} tokens long; the model takes at most {model_config.max_positions}")
    model = PreTrainingModel(model_config)
    model.load_state_dict(checkpoint["model"])
    model.to(device).eval()
    input_ids = torch.tensor([input_ids], device=device)
    sequence_output, _ = model.encoder(input_ids)
    # mlm_scores reads the masked set M off the labels: any value but IGNORE_INDEX marks a position
    masked = torch.where(input_ids == tokenizer.mask_id, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    scores = model.mlm_scores(sequence_output, masked).float()  # s_theta(x' | x~): (number of [MASK]s, V)
    # E4: P(x' | x~) = exp(s_theta(x' | x~)) / sum_{x'' in V} exp(s_theta(x'' | x~))
    probabilities = scores.softmax(dim=-1)
    best = probabilities.topk(min(top_k, len(tokenizer)), dim=-1)
    return [[(tokenizer.vocab[i], p) for i, p in zip(ids.tolist(), ps.tolist())]
            for ids, ps in zip(best.indices, best.values)]


# ----------------------------------------------------------------------------------------
# Benchmark: tokens/s and MFU of an MLM training step, ours and (optionally) transformers'
# ----------------------------------------------------------------------------------------


def matmul_peak(device, dtype, size=2048, repeats=5):
    """The machine's practical matmul peak in FLOP/s: the median of a few size^3 matmuls."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times = []
    for _ in range(repeats + 1):
        synchronize(device)
        started = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - started)
    return 2 * size ** 3 / float(np.median(times[1:]))


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def training_flops(config, batch_size, length, num_predicted):
    """Model FLOPs of one training step (forward + backward = 3x forward, 2 FLOPs per multiply-add):
    6 x (weights of the layers) x tokens + attention's two T x T products + the MLM head and
    vocabulary projection at the positions actually computed."""
    hidden, layers = config.hidden_size, config.num_layers
    layer_weights = layers * (4 * hidden * hidden + 2 * hidden * config.intermediate_size)
    tokens = batch_size * length
    attention = layers * 2 * 2 * batch_size * length * length * hidden
    head = (hidden * hidden + hidden * config.vocab_size) * num_predicted
    return 3 * (2 * layer_weights * tokens + attention + 2 * head)


def bench(config="small", compare_hf=False, json_path=None, steps=10, device="auto", compile=False, log=print):
    """Time the MLM training step and an inference forward at BERT-like shapes: vocab 8192,
    seq 128, batch 32, 15% masked, dropout 0.1. Returns the rows (and writes them as JSON).
    compile: also the fast rows with the model under torch.compile (compile time not counted)."""
    check_at_least(("--steps", steps, 1))
    device = pick_device(device)
    model_config = make_model_config(config, None, vocab_size=8192, max_positions=128)
    batch_size, length = 32, 128
    generator = np.random.default_rng(0)
    input_ids = torch.from_numpy(generator.integers(5, 8192, (batch_size, length))).to(device)
    selected = torch.from_numpy(generator.random((batch_size, length)) < 0.15).to(device)
    mlm_labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    segment_ids = torch.zeros_like(input_ids)
    attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    num_masked = int(selected.sum())
    bf16 = pick_precision("auto", device) == "bf16"
    peaks = {"fp32": matmul_peak(device, torch.float32)}
    if bf16:
        peaks["bf16"] = matmul_peak(device, torch.bfloat16)
    log(f"{config}: {model_config.num_layers} layers, hidden {model_config.hidden_size}, vocab 8192, "
        f"seq {length}, batch {batch_size}, {num_masked} masked; device {device}; matmul peak "
        + ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in peaks.items()))

    def median_seconds(function):
        times = []
        for _ in range(steps):
            synchronize(device)
            started = time.perf_counter()
            function()
            synchronize(device)
            times.append(time.perf_counter() - started)
        return float(np.median(times))

    def measure(step_function, forward_function):
        for _ in range(3):  # warm-up: allocator, kernels, autotuning
            step_function()
        training = median_seconds(step_function)
        with torch.no_grad():
            return training, median_seconds(forward_function)

    variants = [("explicit", "fp32", "explicit", False, False), ("fast", "fp32", "sdpa", True, False)]
    if bf16:
        variants.append(("fast", "bf16", "sdpa", True, False))
    if compile:
        variants += [("fast, compiled", precision, "sdpa", True, True) for _, precision, _, sparse, _ in variants if sparse]
    rows = []
    for variant, precision, attention, sparse, compiled in variants:
        torch.manual_seed(0)
        model = PreTrainingModel(replace(model_config, attention=attention)).to(device).train()
        optimizer = make_optimizer(model, 1e-4)
        training_model = torch.compile(model) if compiled else model
        encoder = torch.compile(model.encoder) if compiled else model.encoder

        def step():
            with autocast(device, precision):
                loss = training_model(input_ids, segment_ids, attention_mask, mlm_labels, sparse=sparse)[0]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def forward():
            with autocast(device, precision):
                model.mlm_scores(encoder(input_ids, segment_ids, attention_mask)[0], mlm_labels, sparse)

        train_seconds, infer_seconds = measure(step, forward)
        flops = training_flops(model_config, batch_size, length, num_masked if sparse else batch_size * length)
        rows.append({"impl": "ptft", "variant": f"{variant} ({attention} attention, {'sparse' if sparse else 'dense'} MLM)",
                     "precision": precision, "config": config, "train_tokens_per_s": batch_size * length / train_seconds,
                     "infer_tokens_per_s": batch_size * length / infer_seconds, "mfu": flops / train_seconds / peaks[precision]})
    if compare_hf:
        try:
            import transformers
        except ImportError:
            raise InputError("--compare-hf needs `transformers` (pip install transformers)") from None
        hf_config = transformers.BertConfig(
            vocab_size=8192, hidden_size=model_config.hidden_size, num_hidden_layers=model_config.num_layers,
            num_attention_heads=model_config.num_heads, intermediate_size=model_config.intermediate_size,
            max_position_embeddings=128, attn_implementation="sdpa")
        torch.manual_seed(0)
        hf_model = transformers.BertForMaskedLM(hf_config).to(device).train()
        optimizer = make_optimizer(hf_model, 1e-4)

        def hf_step():
            hf_model(input_ids=input_ids, attention_mask=attention_mask.long(), labels=mlm_labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        train_seconds, infer_seconds = measure(hf_step, lambda: hf_model(input_ids=input_ids, attention_mask=attention_mask.long()))
        flops = training_flops(model_config, batch_size, length, batch_size * length)
        rows.append({"impl": "hf", "variant": "BertForMaskedLM (sdpa)", "precision": "fp32", "config": config,
                     "train_tokens_per_s": batch_size * length / train_seconds,
                     "infer_tokens_per_s": batch_size * length / infer_seconds, "mfu": flops / train_seconds / peaks["fp32"]})
    hf_speed = next((r["train_tokens_per_s"] for r in rows if r["impl"] == "hf"), None)
    log("| impl | variant | precision | train tokens/s | inference tokens/s | MFU |" + (" vs hf |" if hf_speed else ""))
    log("|---|---|---|---|---|---|" + ("---|" if hf_speed else ""))
    for r in rows:
        log(f"| {r['impl']} | {r['variant']} | {r['precision']} | {r['train_tokens_per_s']:,.0f} | "
            f"{r['infer_tokens_per_s']:,.0f} | {100 * r['mfu']:.0f}% |"
            + (f" {r['train_tokens_per_s'] / hf_speed:.2f}x |" if hf_speed else ""))
    # the data path that feeds the step (B2 sentence pairs + B1 80/10/10 masking, numpy, one core)
    # on random documents of 8-40 token sentences: it must be far faster than any row above
    tokenizer = data.Tokenizer(data.SPECIAL_TOKENS + [f"w{i}" for i in range(8192 - len(data.SPECIAL_TOKENS))])
    documents = [[generator.integers(5, 8192, size) for size in generator.integers(8, 40, 12)] for _ in range(2000)]
    started, produced = time.perf_counter(), 0
    for _ in range(20):
        produced += int(data.pretraining_batch(documents, tokenizer, generator, batch_size, length)["attention_mask"].sum())
    data_speed = produced / (time.perf_counter() - started)
    log(f"data path (sentence pairs + masking): {data_speed:,.0f} tokens/s = "
        f"{data_speed / max(r['train_tokens_per_s'] for r in rows):.0f}x the fastest training step above")
    if json_path:
        write_json(json_path, rows)
    return rows


if __name__ == "__main__":
    # `python train.py`: both loops end to end on a small toy world, in about a minute on a CPU --
    # pre-training (E4 falls from ln|V|), then fine-tuning on its labels (E3).
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        world = data.toy_world(seed=0, num_documents=3000)
        corpus = os.path.join(folder, "unlabeled.txt")
        data.write_corpus(corpus, world["unlabeled"])
        for split in ("train", "test"):
            data.write_tsv(os.path.join(folder, f"{split}.tsv"), world[split])
        pre = pretrain(os.path.join(folder, "pre"), [corpus], steps=500, vocab_size=1024, eval_every=250,
                       progress=False)
        print(f"pre-training: held-out MLM loss {pre['held_out_mlm_loss']:.3f} (ln|V| = {pre['ln_vocab']:.3f})")
        tuned = finetune(os.path.join(folder, "head"), os.path.join(folder, "pre"), os.path.join(folder, "train.tsv"),
                         os.path.join(folder, "test.tsv"), freeze="none", epochs=10, progress=False)
        print(f"fine-tuning everything: test accuracy {tuned['accuracy']:.3f} (chance {1 / len(data.TOPICS):.3f}; "
              "`python ptft.py` pre-trains 5x longer, where the gains of pre-training show)")
