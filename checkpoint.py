"""Run folders and checkpoints: written whole or not at all, read back only when they make sense.

A run folder holds checkpoint.pt, vocab.txt and metrics.json. checkpoint.pt is a plain dict
(built in one place, make_checkpoint) that torch.load(weights_only=True) can read:

    kind        "pretraining" (encoder + MLM and NSP heads) or "classifier" (encoder + classifier)
    model       the state dict          config   model.Config as a dict
    vocab       the WordPiece vocabulary, lowercase: how the tokenizer splits words
    step, run   the step it was written at and the settings of the run (a resume compares them)
    ...         pretrain adds optimizer, scaler, rng and history (what a bit-exact resume needs);
                finetune adds labels; a Hugging Face folder adds fresh and source

    prepare_out_folder   a new run never overwrites an old one unless asked to; the folder gets
                         ptft's marker (--force deletes only such folders) and this process's lock
    save_atomic          temporary file, fsync, rename: a crash leaves the old file or the new one
    load_checkpoint      a run folder, a checkpoint file or a Hugging Face BERT folder -> the dict,
                         verified (every record's CRC-32, finite weights) and its parts checked
                         against each other (a bad or damaged file is one line, exit 2)
    finished_run         what a --resume finds, decided from the checkpoint (never metrics.json)
    open_model           -> (model with its weights, tokenizer, checkpoint)
    save_task_file       C7: finetune --save delta's task.safetensors -- only what trained, with
                         the base's fingerprint; load_checkpoint(TASK_RUN, base=RUN) reads it on
                         top of its base, the same bits as the full checkpoint, and refuses any
                         other base (base_fingerprint) or a damaged file (task_fingerprint)
    PretrainingRun       what a pre-training checkpoint holds, saved and restored (bit-exact resume)

Run `python checkpoint.py RUN_FOLDER` to see what a checkpoint holds (without one: a self-check).
"""

import contextlib
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

import data
import hf
from common import (
    MARKER,
    TEMPORARY_SUFFIX,
    InputError,
    verify_records,
    write_atomic,
    write_text_atomic,
)
from compress import from_int8_rows, merged_weight
from model import Classifier, Config, PreTrainingModel
from options import SIZE_FIELDS, PretrainOptions
from parallel import Processes, gather_from_processes, refuse_differences
from tokenizer import Tokenizer

# ----------------------------------------------------------------------------------------
# The run folder: made by ptft (a marker), written by one process at a time (a lock)
# ----------------------------------------------------------------------------------------

HELD_LOCKS = {}  # real path of a run folder -> the open folder this process holds its lock on
MAX_HELD_LOCKS = 256  # beyond this, the locks on folders inside another held folder are let go


def prepare_out_folder(out, resume=False, force=False):
    """A new run never overwrites an existing run folder unless asked to, and never one another
    process is writing. On return `out` exists, holds the marker, and this process holds its
    lock until it exits (lock_out_folder). A folder holding only the marker counts as empty."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise InputError(f"{out}: exists and is not a folder")
    if os.path.isdir(out):
        lock_out_folder(out)  # before anything in it is read or deleted
        if folder_contents(out) and not resume:
            if not force:
                raise InputError(f"{out}: folder exists and is not empty; pass --resume to "
                                 f"continue that run or --force to start over")
            remove_made_folder(out)
    made = not os.path.isdir(out) or not folder_contents(out)
    os.makedirs(out, exist_ok=True)
    if made:
        with contextlib.suppress(FileExistsError):
            os.close(os.open(os.path.join(out, MARKER),
                             os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644))
    lock_out_folder(out)
    # what a killed writer left: only a lock holder may write here, so it is stale
    for name in os.listdir(out):
        if name.endswith(TEMPORARY_SUFFIX):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(out, name))


def folder_contents(out):
    return [name for name in os.listdir(out) if name != MARKER]


def lock_out_folder(out):
    """An exclusive lock on the folder itself (flock on the open folder), held until this process
    exits: the operating system releases it when the process ends, however it ends (SIGKILL
    included), so a lock is never left behind. A second process is refused in one line."""
    real = os.path.realpath(out)
    held = HELD_LOCKS.get(real)
    if held is not None:
        try:
            if os.path.samestat(os.fstat(held), os.stat(real)):
                return  # this process already holds it (a resume in the same process)
        except OSError:
            pass
        os.close(HELD_LOCKS.pop(real))  # the folder was replaced (--force): lock the new one
    # a long sweep in one process: let go of finished sub-runs
    if len(HELD_LOCKS) >= MAX_HELD_LOCKS:
        for held_path in [p for p in HELD_LOCKS
                          if any(p.startswith(q + os.sep) for q in HELD_LOCKS)]:
            os.close(HELD_LOCKS.pop(held_path))
    descriptor = os.open(real, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise InputError(f"{out}: another ptft process is writing this folder; wait for it to "
                         f"end or choose another --out") from None
    HELD_LOCKS[real] = descriptor


def remove_made_folder(out):
    """--force: delete a folder that ptft made (it holds the marker) -- never another folder
    (a repository, a home folder), never the working folder or a folder above it."""
    real, here = os.path.realpath(out), os.path.realpath(os.getcwd())
    if os.path.islink(out.rstrip(os.sep) or out):
        raise InputError(f"{out}: is a symbolic link; --force does not delete through it "
                         f"(remove it yourself)")
    if here == real or here.startswith(real.rstrip(os.sep) + os.sep):
        raise InputError(f"{out}: is the working folder or holds it; --force never deletes that")
    if not os.path.exists(os.path.join(out, MARKER)):
        raise InputError(f"{out}: not a folder ptft made (it has no {MARKER}); "
                         "--force deletes only those -- "
                         "remove it yourself or choose another --out")
    shutil.rmtree(out)


def refuse_force_over_inputs(args):
    """--force never deletes a folder an input of the same command lives in (finetune --init X
    --out X): every flag value naming an existing path is an input."""
    out = getattr(args, "out", None)
    if not (getattr(args, "force", False) and out and os.path.isdir(out)):
        return
    real = os.path.realpath(out).rstrip(os.sep) + os.sep
    for name, value in vars(args).items():
        for item in (value if isinstance(value, (list, tuple)) else [value]):
            if name != "out" and isinstance(item, str) and os.path.exists(item) \
                    and (os.path.realpath(item) + os.sep).startswith(real):
                raise InputError(f"--out {out} --force would delete {item} "
                                 f"(--{name.replace('_', '-')}), which this command reads")


def refuse_run_folder(out):
    """evaluate --out: a folder for the evaluation's metrics, never a run folder (its
    metrics.json holds the run's history)."""
    if (os.path.exists(os.path.join(out, "checkpoint.pt"))
            or os.path.exists(os.path.join(out, MARKER))):
        raise InputError(f"--out {out}: is a run folder; its metrics.json would be overwritten "
                         f"-- choose another folder")


# ----------------------------------------------------------------------------------------
# Writing and reading a checkpoint: atomic, and verified before it is trusted
# ----------------------------------------------------------------------------------------


def save_atomic(path, payload):
    """Atomic write (common.write_atomic): a temporary file in the same folder, flushed to disk,
    then renamed over the old one -- a crash at any moment leaves either the old or the new
    checkpoint whole; a full disk is one line naming the file, and no partial file remains."""
    write_atomic(path, lambda f: torch.save(payload, f))


def write_json(path, value):
    write_text_atomic(path, json.dumps(value, indent=2) + "\n")


def make_checkpoint(kind, state, config, tokenizer, **extra):
    """The checkpoint dict, for pretrain, finetune and a Hugging Face folder alike. Every tensor
    in it is on the CPU, wherever it was trained: a run from a GPU opens with a plain torch.load
    on a machine without one, and compares with tensors loaded anywhere."""
    assert kind in ("pretraining", "classifier"), kind
    return on_cpu({"kind": kind, "model": state, "config": config.to_dict(),
                   "vocab": list(tokenizer.vocab), "lowercase": tokenizer.lowercase, **extra})


def save_classifier(out, model, tokenizer, label_names, metrics, run):
    """A classifier run folder (finetune, distill, prune): vocab.txt, checkpoint.pt,
    metrics.json."""
    tokenizer.save(os.path.join(out, "vocab.txt"))
    save_atomic(os.path.join(out, "checkpoint.pt"), make_checkpoint(
        "classifier", model.state_dict(), model.config, tokenizer, labels=label_names,
        pool=model.pool, step=metrics.get("steps", 0), run=run))
    write_json(os.path.join(out, "metrics.json"), metrics)


def on_cpu(value):
    """A copy of dicts, lists and tuples of tensors with every tensor moved to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: on_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(on_cpu(item) for item in value)
    return value


def load_checkpoint(path, log=print, base=None):
    """A run folder, a checkpoint file or a Hugging Face BERT folder -> the checkpoint dict,
    always on the CPU (a resume never needs the GPU memory of the run that wrote it).
    weights_only=True: tensors and plain values only -- a file carrying pickled code is
    refused, never executed. A task file (finetune --save delta) is read on top of `base`, the
    run it was trained from (checkpoint_with_task)."""
    task_path = task_file_in(path)
    if task_path:
        return checkpoint_with_task(task_path, base, log)
    if base is not None:
        raise InputError(f"--base {base}: {path} is not a task file (only a task file, "
                         "finetune --save delta, is read on top of a base)")
    if hf.is_hf_folder(path) and not os.path.exists(os.path.join(path, "checkpoint.pt")):
        kind, state, config, tokenizer, extra = hf.read_folder(path)
        if extra["fresh"]:
            log(f"{path}: the file has no weights for {', '.join(extra['fresh'])}: "
                f"initialised fresh")
        return refuse_non_finite(make_checkpoint(kind, state, config, tokenizer, step=0, **extra),
                                 path)
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pt")
    if not os.path.exists(path):
        raise InputError(f"{path}: no checkpoint here (expected a run folder with checkpoint.pt, "
                         "a Hugging Face "
                         "BERT folder with config.json, or 'scratch')")
    verify_records(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unpickling failure means: not a checkpoint we can trust
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"{path}: not a ptft checkpoint ({reason[:120]})") from None
    check_parts_fit(checkpoint, path)
    checkpoint = with_float_weights(checkpoint, path) if "int8_scales" in checkpoint else checkpoint
    return refuse_non_finite(checkpoint, path)


def refuse_non_finite(checkpoint, path):
    """Weights that are NaN or infinite are refused on load: no command can make sense of them
    (a damaged file, or a run that diverged and was saved anyway)."""
    for name, value in checkpoint["model"].items():
        if (isinstance(value, torch.Tensor) and value.is_floating_point()
                and not torch.isfinite(value).all()):
            raise InputError(f"{path}: weight {name} holds NaN or infinite values; refused")
    return checkpoint


def check_parts_fit(checkpoint, path):
    """What a checkpoint holds must fit together, or a load_state_dict or an embedding lookup
    fails later with a traceback far from the cause: the config builds a Config, the vocabulary
    has the config's size, and the weights are exactly those a model of that config has."""
    if not isinstance(checkpoint, dict) or not {"model", "config", "vocab"} <= set(checkpoint):
        raise InputError(f"{path}: not a ptft checkpoint "
                         f"(expected a dict with model, config and vocab)")
    if not (isinstance(checkpoint["config"], dict) and isinstance(checkpoint["model"], dict)
            and isinstance(checkpoint["vocab"], list)):
        raise InputError(f"{path}: not a ptft checkpoint "
                         f"(config and model must be dicts, vocab a list)")
    hf.check_config_values(checkpoint["config"], path)  # bounds before any allocation
    try:
        config = Config(**checkpoint["config"])
        with torch.device("meta"):  # shapes only: no memory, no time, and the RNG is not touched
            expected = empty_model(checkpoint, config).state_dict()
    # e.g. an unknown field, a size that is not a whole number
    except (TypeError, ValueError) as error:
        raise InputError(f"{path}: the config is not valid ({error})") from None
    if len(checkpoint["vocab"]) != config.vocab_size:
        raise InputError(f"{path}: the vocabulary has {len(checkpoint['vocab'])} tokens, "
                         f"config says vocab_size {config.vocab_size}")
    for name, value in checkpoint["model"].items():
        if name not in expected:
            raise InputError(f"{path}: weight {name} is not part of a model with this config")
        if not isinstance(value, torch.Tensor) or value.shape != expected[name].shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise InputError(f"{path}: weight {name} has shape {shape}, "
                             f"config says {tuple(expected[name].shape)}")
    missing = [name for name in expected if name not in checkpoint["model"]]
    if missing:
        raise InputError(f"{path}: weight {missing[0]} is missing"
                         f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")


# ----------------------------------------------------------------------------------------
# C7: int8 weight matrices on disk (deploy.quantize writes them; every load reads them back)
# ----------------------------------------------------------------------------------------


def with_float_weights(checkpoint, path):
    """A checkpoint with int8 matrices (checkpoint['int8_scales']: weight name -> its row scales)
    -> the same checkpoint with float32 matrices: every command then reads it like any other."""
    scales, weights = checkpoint["int8_scales"], dict(checkpoint["model"])
    for name, scale in scales.items():
        quantized = weights.get(name)
        if not (isinstance(quantized, torch.Tensor) and quantized.dtype == torch.int8
                and quantized.ndim == 2
                and isinstance(scale, torch.Tensor) and scale.shape == (quantized.shape[0],)):
            raise InputError(f"{path}: int8 weight {name} and its scales do not fit "
                             f"(expected an int8 matrix and one scale per row)")
        weights[name] = from_int8_rows(quantized, scale)
    unscaled = [name for name, value in weights.items() if not value.is_floating_point()]
    if unscaled:
        raise InputError(f"{path}: weight {unscaled[0]} is {weights[unscaled[0]].dtype} "
                         f"and has no int8 scales")
    return {**{k: v for k, v in checkpoint.items() if k != "int8_scales"}, "model": weights,
            "stored_as": "int8"}


# ----------------------------------------------------------------------------------------
# C7: a task file -- only what fine-tuning trained, on top of a base it names by fingerprint
# ----------------------------------------------------------------------------------------

TASK_FILE = "task.safetensors"  # a run folder of `finetune --save delta` holds it, no checkpoint.pt
TASK_FORMAT = "ptft task file 1"


def tensor_chunks(tensors):
    """{name: tensor} -> bytes to fingerprint: each tensor's name, dtype, shape and raw bytes, in
    name order (the same tensors, the same chunks, wherever they were computed)."""
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        yield f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode()
        yield tensor.reshape(-1).view(torch.uint8).numpy().tobytes()


def base_fingerprint(checkpoint):
    """What a task file reuses of the run it was fine-tuned from -- the config, the vocabulary
    and the encoder's weights -- as one data.fingerprint: a base with any of them different (a
    different run, a resumed or re-quantised one) is not the base."""
    config = Config(**checkpoint["config"]).to_dict()
    words = json.dumps([config, checkpoint["vocab"], checkpoint.get("lowercase", True)],
                       sort_keys=True).encode()
    encoder = {name: value for name, value in checkpoint["model"].items()
               if name.startswith("encoder.")}
    return data.fingerprint([words, *tensor_chunks(encoder)])


def task_fingerprint(tensors, metadata):
    """A task file's own integrity check (safetensors stores no checksum): the fingerprint of its
    metadata (all but this entry) and of every tensor."""
    words = json.dumps({k: v for k, v in metadata.items() if k != "fingerprint"}, sort_keys=True)
    return data.fingerprint([words.encode(), *tensor_chunks(tensors)])


def save_task_file(path, tensors, base, details):
    """Write `tensors` (what fine-tuning trained: {name: tensor}; LoRA's as LAYER.A and LAYER.B)
    as a safetensors file, atomically, with the base's fingerprint and `details` (labels, pool,
    lora_scale, step, run) as its metadata. Returns its size in bytes."""
    from safetensors.torch import save

    tensors = {name: value.detach().cpu().contiguous() for name, value in tensors.items()}
    metadata = {"format": TASK_FORMAT, "base": base_fingerprint(base),
                **{key: json.dumps(value) for key, value in details.items()}}
    metadata["fingerprint"] = task_fingerprint(tensors, metadata)
    write_atomic(path, lambda f: f.write(save(tensors, metadata=metadata)))
    return os.path.getsize(path)


def task_file_in(path):
    """The task file `path` names (a run folder holding one and no checkpoint.pt, or the file
    itself), or None."""
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "checkpoint.pt")):
        path = os.path.join(path, TASK_FILE)
    return path if path.endswith(".safetensors") and os.path.isfile(path) else None


def read_task_file(path):
    """A task file -> ({name: tensor}, metadata), refused in one line unless it is a ptft task
    file whose metadata and tensors still match the fingerprint it was written with."""
    from safetensors.torch import load

    try:
        with open(path, "rb") as f:
            raw = f.read()
        header_size = int.from_bytes(raw[:8], "little")
        metadata = json.loads(raw[8:8 + header_size]).get("__metadata__") or {}
        tensors = load(raw)
    except Exception as error:  # a header pointing nowhere, bad JSON, a tensor cut short, ...
        raise InputError(f"{path}: damaged or not a safetensors file "
                         f"({str(error)[:120] or type(error).__name__})") from None
    if metadata.get("format") != TASK_FORMAT:
        raise InputError(f"{path}: not a ptft task file (finetune --save delta writes one)")
    if task_fingerprint(tensors, metadata) != metadata.get("fingerprint"):
        raise InputError(f"{path}: damaged: its tensors or metadata no longer match the "
                         "fingerprint it was written with")
    return tensors, metadata


def with_task_applied(base_state, tensors, lora_scale):
    """The classifier's state: the base's encoder weights, each trained tensor in place of its
    base value, and LoRA's LAYER.A / LAYER.B merged into LAYER.weight by compress.merged_weight
    (the very operation that merged them after fine-tuning: the same bits)."""
    state = {name: value for name, value in base_state.items() if name.startswith("encoder.")}
    for name, value in tensors.items():
        if name.endswith(".A"):
            layer = name[:-len(".A")]
            state[layer + ".weight"] = merged_weight(base_state[layer + ".weight"], value,
                                                     tensors[layer + ".B"], lora_scale)
        elif not name.endswith(".B"):
            state[name] = value
    return state


def checkpoint_with_task(task_path, base, log=print):
    """A task file and the run it was trained from (--base) -> the classifier's checkpoint dict,
    as if the full checkpoint had been saved. A base with another fingerprint is refused."""
    tensors, metadata = read_task_file(task_path)
    if base is None:
        raise InputError(f"{task_path}: a task file (only the weights fine-tuning trained); name "
                         f"the run it was trained from with --base (base {metadata['base']})")
    base_checkpoint = load_checkpoint(base, log)
    found = base_fingerprint(base_checkpoint)
    if found != metadata["base"]:
        raise InputError(f"--base {base}: not the run {task_path} was trained from (base "
                         f"fingerprint {found}; the task file needs {metadata['base']})")
    details = {key: json.loads(value) for key, value in metadata.items()
               if key not in ("format", "base", "fingerprint")}
    try:
        state = with_task_applied(base_checkpoint["model"], tensors, details["lora_scale"])
    except (KeyError, RuntimeError) as error:  # a LoRA pair without its layer, shapes that differ
        raise InputError(f"{task_path}: does not fit its base ({str(error)[:120]})") from None
    checkpoint = {"kind": "classifier", "model": state, "config": base_checkpoint["config"],
                  "vocab": base_checkpoint["vocab"],
                  "lowercase": base_checkpoint.get("lowercase", True),
                  "labels": details["labels"], "pool": details["pool"], "step": details["step"],
                  "run": details["run"], "task_file": task_path}
    check_parts_fit(checkpoint, task_path)
    return refuse_non_finite(checkpoint, task_path)


def empty_model(checkpoint, config):
    """The architecture a checkpoint's kind names, freshly initialised."""
    if checkpoint.get("kind") == "classifier":
        return Classifier(config, len(checkpoint.get("labels") or []),
                          checkpoint.get("pool", "cls"))
    return PreTrainingModel(config)


def has_mlm_head(checkpoint):
    """A pre-training checkpoint whose MLM head was trained (not one a Hugging Face folder
    lacked, which open_model initialises fresh)."""
    return checkpoint.get("kind") == "pretraining" and "mlm_head" not in checkpoint.get("fresh", [])


def open_model(source, log=print, base=None, **config_changes):
    """A run folder, a checkpoint file, a Hugging Face BERT folder (or a checkpoint dict already
    loaded) -> (model with its weights, on the CPU; tokenizer; checkpoint dict); a task file
    with `base`, the run it was trained from (load_checkpoint).
    config_changes replace fields that do not change the weights' shapes (dropout, attention)."""
    checkpoint = source if isinstance(source, dict) else load_checkpoint(source, log, base)
    try:
        config = Config(**{**checkpoint["config"], **config_changes})
    except (TypeError, ValueError) as error:
        raise InputError(f"checkpoint config is not valid: {error}") from None
    model = empty_model(checkpoint, config)
    model.load_state_dict(checkpoint["model"])
    return model, Tokenizer.from_checkpoint(checkpoint), checkpoint


@dataclass
class PretrainingRun:
    """A pre-training run's state: what its checkpoint holds, enough for a bit-identical resume --
    the weights, the optimizer's moments, the fp16 loss scale, the history, and every random
    generator (numpy's data stream, python, torch, CUDA) as it was at the step's start."""
    options: PretrainOptions
    corpus_name: str
    model: PreTrainingModel
    tokenizer: Tokenizer
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    data_rng: np.random.Generator
    device: torch.device
    precision: str
    history: list
    # under torchrun: this process among N (parallel.py)
    processes: Processes = field(default_factory=Processes)

    def __post_init__(self):
        """Under torchrun, every process must train the same run on the same data: before the
        first step they compare their settings, the fingerprint of the text each read and their
        vocabularies, and all refuse, with the same line, if any differs."""
        settings = run_settings(self.options, self.corpus_name, self.processes.world_size)
        vocabulary = "\n".join(self.tokenizer.vocab).encode()
        settings["vocabulary"] = hashlib.sha256(vocabulary).hexdigest()[:16]
        refuse_differences(settings, self.processes)

    def rng_states(self, data_state=None):
        """Every generator's state now; data_state: the data generator's, where a background thread
        (fast.StepBatches) has drawn ahead of the step being trained."""
        return {"numpy": data_state or self.data_rng.bit_generator.state,
                "python": random.getstate(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []}

    def restore(self, checkpoint):
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.history[:] = checkpoint.get("history", [])
        rng = (checkpoint["rng_by_rank"][self.processes.rank] if self.processes.world_size > 1
               else checkpoint["rng"])
        self.data_rng.bit_generator.state = rng["numpy"]
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
        if self.device.type == "cuda" and rng.get("cuda"):
            torch.cuda.set_rng_state_all(rng["cuda"])  # dropout masks drawn on the GPU

    def save(self, path, step, rng):
        """Every process calls it; rank 0 writes, with every process's generators (rng_by_rank)."""
        by_rank = gather_from_processes(rng, self.processes)
        if not self.processes.main:
            return
        save_atomic(path, make_checkpoint(
            "pretraining", self.model.state_dict(), self.model.config, self.tokenizer, step=step,
            optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(),
            history=self.history, rng=by_rank[0], rng_by_rank=by_rank,
            run=run_settings(self.options, self.corpus_name, self.processes.world_size)))


def finished_run(out, steps):
    """What a --resume finds in `out`, decided from its checkpoint (never from metrics.json, which
    is written after it and may be missing, stale or damaged): the final metrics of a run that
    reached `steps` (already_finished); None for a run to continue (or a folder with no
    checkpoint yet); refused: a run already beyond `steps`, or metrics with no checkpoint."""
    checkpoint_path = os.path.join(out, "checkpoint.pt")
    metrics_path = os.path.join(out, "metrics.json")
    if not os.path.exists(checkpoint_path):
        if os.path.exists(metrics_path):
            raise InputError(f"{out}: has metrics.json but no checkpoint.pt: the run's state "
                             f"is gone, nothing to resume "
                             "(pass --force to start over)")
        return None
    checkpoint = load_checkpoint(checkpoint_path)
    step = checkpoint.get("step")
    if checkpoint.get("kind") != "pretraining" or not isinstance(step, int):
        raise InputError(f"{checkpoint_path}: not a pre-training checkpoint, cannot --resume it")
    if step > steps:
        raise InputError(f"{checkpoint_path}: the run is at step {step}, beyond --steps {steps}; "
                         f"pass --steps {step} or more")
    if step < steps:
        return None
    try:
        with open(metrics_path, encoding="utf-8") as f:
            metrics = json.load(f)
        if not (isinstance(metrics, dict) and metrics.get("step") == step):
            raise ValueError("not this run's final metrics")
    # missing (killed between the two writes), damaged or stale: rebuilt
    except (OSError, ValueError):
        metrics = final_metrics_from(checkpoint)
        lock_out_folder(out)  # a write: only the folder's one writer
        write_json(metrics_path, metrics)
    return {**metrics, "already_finished": True}


def final_metrics_from(checkpoint):
    """A finished run's metrics.json, rebuilt from what its checkpoint holds (the history of
    held-out evaluations; the speed of the run is not kept)."""
    history = checkpoint.get("history") or []
    last = history[-1] if history and history[-1].get("step") == checkpoint["step"] else {}
    return {"step": checkpoint["step"],
            "final_train_mlm_loss": last.get("train_mlm_loss", float("nan")),
            "held_out_mlm_loss": last.get("held_out_mlm_loss"),
            "ln_vocab": math.log(len(checkpoint["vocab"])),
            "corpus": checkpoint.get("run", {}).get("corpus"),
            "history": history,
            "rebuilt_from": "checkpoint.pt"}


def run_settings(o, corpus_name, world_size=1):
    """The settings a pre-training checkpoint records as its `run` (a resume compares some)."""
    return dict(corpus=corpus_name, corpus_fingerprint=data.corpus_fingerprint(corpus_name),
                config=o.config, init=o.init, nsp=o.nsp, max_length=o.max_length,
                batch_size=o.batch_size, vocab_size=o.vocab_size_asked(), lr=o.lr,
                steps=o.steps, seed=o.seed, mask_probability=o.mask_probability,
                world_size=world_size, objective=o.objective)


# what a --resume must keep: the data (its name and its content: the fingerprint, size and
# SHA-256, of the text read), the task and the batch (the rate and the step count may change);
# under torchrun the number of processes too (each one's data stream is in the checkpoint)
RESUME_MUST_MATCH = ("corpus", "corpus_fingerprint", "config", "init", "nsp", "max_length",
                     "batch_size", "vocab_size", "world_size", "objective")


def check_resume_settings(checkpoint, o, requested, corpus_name, path, world_size=1):
    """A --resume must agree with the checkpoint on the data, the task and the model (requested:
    the Config these options ask for); the refusal names each difference. With --init the sizes
    are the init's (compared through init)."""
    settings = run_settings(o, corpus_name, world_size)
    expected = {key: settings[key] for key in RESUME_MUST_MATCH}
    # what a checkpoint from before the key was recorded ran
    older = {"world_size": 1, "objective": "mlm"}
    found = {key: checkpoint.get("run", {}).get(key, older.get(key)) for key in expected}
    if found["corpus_fingerprint"] is None:  # a checkpoint written before fingerprints were kept
        found["corpus_fingerprint"] = expected["corpus_fingerprint"]
    fields = ["dropout", "attention"] + ([] if o.init else list(SIZE_FIELDS))
    expected.update({f: getattr(requested, f) for f in fields})
    found.update({f: checkpoint["config"].get(f) for f in fields})
    if found != expected:
        differing = ", ".join(f"{k}: checkpoint {found[k]!r} vs now {expected[k]!r}"
                              for k in expected if found[k] != expected[k])
        raise InputError(f"{path}: --resume with different settings ({differing})")


if __name__ == "__main__":
    if len(sys.argv) == 2:
        try:
            model, tokenizer, loaded = open_model(sys.argv[1])
        except InputError as error:
            sys.exit(f"error: {error}")
        print(f"kind: {loaded['kind']}, step {loaded.get('step')}, vocabulary {len(tokenizer)} "
              f"(lowercase {tokenizer.lowercase}); "
              f"{sum(p.numel() for p in model.parameters()):,} parameters")
        print(f"config: {model.config}")
        shown = {"kind", "model", "config", "vocab", "lowercase"}
        print(f"other entries: {', '.join(sorted(set(loaded) - shown))}")
        sys.exit(0)
    # self-check: a checkpoint written atomically loads back; one whose parts do not fit is refused
    import tempfile

    from model import make_config
    from tokenizer import SPECIAL_TOKENS

    config = make_config("tiny", vocab_size=50, max_positions=16)
    tokenizer = Tokenizer(SPECIAL_TOKENS + [f"w{i}" for i in range(45)])
    with tempfile.TemporaryDirectory() as folder:
        prepare_out_folder(folder)
        payload = make_checkpoint("pretraining", PreTrainingModel(config).state_dict(), config,
                                  tokenizer, step=0)
        save_atomic(os.path.join(folder, "checkpoint.pt"), payload)
        model, _, _ = open_model(folder)
        print(f"written and read back: {type(model).__name__}, {len(payload['model'])} tensors")
        save_atomic(os.path.join(folder, "checkpoint.pt"),
                    {**payload, "vocab": payload["vocab"][:10]})
        try:
            load_checkpoint(folder)
        except InputError as error:
            print(f"a vocabulary of the wrong size is refused: {error}")
    print("self-check passed")
