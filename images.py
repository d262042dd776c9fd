"""C8 on images: masked-patch pre-training (ViT + inpainting, as the document names it), then
fine-tuning to classify -- on the same encoder as text.

The recipe is BERT's with pixels for words. An image is cut into P x P patches (a sequence of N
"tokens", each a vector of P*P pixels); a share of the patches is hidden behind a learned [MASK]
patch vector; the encoder -- model.py's Transformer layers, unchanged -- predicts the hidden
pixels; the loss is the mean squared error on the MASKED patches only (E-img, docs/equations.md,
beside E4). Then the reconstruction head is dropped and a classifier reads the encoder
(model.Classifier itself, with --freeze head | top-K | none as for text: train.freeze_below).

What is new, and all that is new:
    patchify / unpatchify     images (B, S, S) <-> patches (B, N, P*P), exactly invertible
    PatchEmbeddings           a linear map of each patch + a learned position + a [CLS] slot, in
                              place of the token embedding; masked patches become the [MASK]
                              vector (SimMIM's choice: the encoder sees every position)
    masked_patch_loss         E-img, written out
    image_world, digits       the data: a generated image world (numpy, seeded) and the real
                              8 x 8 handwritten digits that ship inside scikit-learn (optional)
    pretrain_images           the pre-training loop, checkpoints and --resume
    fit_image_classifier      the fine-tuning loop on images in memory (E3)
    pixel_logistic_regression C1's non-neural baseline on images: softmax regression on pixels

Shapes: B batch, S image side, P patch side, N = (S / P)^2 patches, D = P*P pixels per patch,
T = N + 1 positions ([CLS] first), H hidden size.

Run `python images.py` for a self-check: a short pre-training on the image world, then the
reconstruction picture.
"""

import math
import os
import struct
import zlib
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import evaluation
import fast
import schedule
import train
from checkpoint import on_cpu, prepare_out_folder, save_atomic, write_json
from common import InputError, verify_records
from model import (
    PRESETS,
    Classifier,
    Config,
    Encoder,
    count_parameters,
    init_weights,
    make_config,
)
from options import check_learning_rate, check_settings, pick_device, setting, trainable_layers

# ----------------------------------------------------------------------------------------
# Patches: an image as a sequence of tokens
# ----------------------------------------------------------------------------------------


def patchify(images, patch):
    """(B, S_h, S_w) -> (B, N, P*P): row-major patches, each patch's pixels row-major.
    N = (S_h / P) * (S_w / P). Works on numpy arrays and torch tensors alike (reshape and
    transpose only: every pixel lands in exactly one slot, nothing is computed)."""
    batch, height, width = images.shape
    rows, columns = height // patch, width // patch
    x = images.reshape(batch, rows, patch, columns, patch)
    x = x.transpose(0, 1, 3, 2, 4) if isinstance(x, np.ndarray) else x.permute(0, 1, 3, 2, 4)
    return x.reshape(batch, rows * columns, patch * patch)


def unpatchify(patches, height, width, patch):
    """(B, N, P*P) -> (B, S_h, S_w): patchify's inverse, exactly."""
    batch, rows, columns = patches.shape[0], height // patch, width // patch
    x = patches.reshape(batch, rows, columns, patch, patch)
    x = x.transpose(0, 1, 3, 2, 4) if isinstance(x, np.ndarray) else x.permute(0, 1, 3, 2, 4)
    return x.reshape(batch, height, width)


def check_patch_size(image_size, patch_size):
    if patch_size < 1 or image_size % patch_size:
        raise InputError(f"--patch-size {patch_size}: the image side ({image_size}) must be a "
                         "multiple of it")


# ----------------------------------------------------------------------------------------
# The data: a generated image world, and scikit-learn's 8 x 8 digits
# ----------------------------------------------------------------------------------------

# The image world, as the toy world is for text: unlabeled images teach what the labels need.
# Ten textures -- five patterns (stripes in four directions, checks) at two periods -- each a
# sinusoid at a random phase: the same texture never has the same pixels twice, so a linear
# model of pixels sees little. An image is one texture (its class) with a rectangle of another
# texture over a part of it (at most a quarter of the image): every texture is a class AND a
# part that turns up in the other classes' images. To fill in a hidden patch the encoder must
# tell, from the visible ones, which texture lies there, at which phase, and where the
# rectangle's edge runs: the very features the classes are made of.
PATTERNS = ("horizontal stripes", "vertical stripes", "diagonal stripes",
            "anti-diagonal stripes", "checks")
PERIODS = (4, 8)       # pixels per cycle
TEXTURES = [f"{pattern}, period {period}" for period in PERIODS for pattern in PATTERNS]
WORLD_NOISE = 0.1      # std of the Gaussian noise on every pixel


def texture(kind, size, rng):
    """TEXTURES[kind] at a random phase: (size, size) values in [0, 1]."""
    pattern, period = kind % len(PATTERNS), PERIODS[kind // len(PATTERNS)]
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=2)
    wave = 2 * np.pi / period
    along = {0: y, 1: x, 2: x + y, 3: x - y}
    if pattern in along:
        return 0.5 + 0.5 * np.sin(wave * along[pattern] + phase[0])
    return 0.5 + 0.5 * np.sin(wave * x + phase[0]) * np.sin(wave * y + phase[1])


def image_world(num_images, seed, size=16):
    """num_images generated images (num_images, size, size) float32 and their classes (an index
    into TEXTURES), balanced: image i has class i mod 10. Seeded: the same seed, the same
    images."""
    rng = np.random.default_rng(seed)
    images = np.empty((num_images, size, size), dtype=np.float32)
    labels = np.arange(num_images) % len(TEXTURES)
    for i, label in enumerate(labels):
        other = (label + rng.integers(1, len(TEXTURES))) % len(TEXTURES)  # any texture but its own
        height, width = rng.integers(size // 4, size // 2 + 1, size=2)
        top, left = rng.integers(0, size - height + 1), rng.integers(0, size - width + 1)
        image = texture(label, size, rng)
        image[top:top + height, left:left + width] = texture(other, size, rng)[
            top:top + height, left:left + width]
        images[i] = image + rng.normal(0, WORLD_NOISE, size=(size, size))
    return images, labels


def digits():
    """scikit-learn's 1,797 handwritten digits (8 x 8, 0..16, shipped inside the package: no
    download), scaled to [0, 1]. Optional: without scikit-learn, one line saying so."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise InputError("--data digits needs scikit-learn (pip install scikit-learn); "
                         "--data world needs nothing") from None
    loaded = load_digits()
    return (loaded.images / 16.0).astype(np.float32), loaded.target.astype(np.int64)


# The splits: test images are never pre-trained on; labels are drawn from the labeled pool.
WORLD_UNLABELED, WORLD_POOL_PER_CLASS, WORLD_TEST_PER_CLASS = 20000, 100, 100
DIGITS_TEST = 500
DATA_SETS = ("world", "digits")


def image_data(name, image_size=None):
    """--data NAME -> {"unlabeled": images, "pool": (images, labels), "test": (images, labels),
    "classes": count, "image_size": S}. world: three independently seeded draws; digits: a fixed
    shuffle, the last 500 for testing, the rest both the labeled pool and (without labels) the
    pre-training images."""
    if name not in DATA_SETS:
        raise InputError(f"--data: expected world or digits, got {name!r}")
    if name == "world":
        size = image_size or 16
        classes = len(TEXTURES)
        unlabeled, _ = image_world(WORLD_UNLABELED, seed=1, size=size)
        return {"unlabeled": unlabeled, "classes": classes, "image_size": size,
                "pool": image_world(WORLD_POOL_PER_CLASS * classes, seed=2, size=size),
                "test": image_world(WORLD_TEST_PER_CLASS * classes, seed=3, size=size)}
    if image_size not in (None, 8):
        raise InputError(f"--image-size {image_size}: the digits are 8 x 8")
    images, labels = digits()
    order = np.random.default_rng(0).permutation(len(images))
    pool, test = order[:-DIGITS_TEST], order[-DIGITS_TEST:]
    return {"unlabeled": images[pool], "classes": 10, "image_size": 8,
            "pool": (images[pool], labels[pool]), "test": (images[test], labels[test])}


def draw_per_class(labels, k, seed):
    """Indices of k examples of each class, a different draw for every seed (sorted)."""
    rng = np.random.default_rng(1000 + seed)
    chosen = [rng.choice(np.flatnonzero(labels == c), size=k, replace=False)
              for c in np.unique(labels)]
    return np.sort(np.concatenate(chosen))


# ----------------------------------------------------------------------------------------
# The model: model.py's encoder with patches in place of tokens
# ----------------------------------------------------------------------------------------


class PatchEmbeddings(nn.Module):
    """In place of model.Embeddings: patch (D pixels) -> linear -> H, the masked ones replaced by
    the [MASK] patch vector, a [CLS] vector in front, + learned positions -> LayerNorm ->
    dropout. (B, N, D) -> (B, N + 1, H)."""

    def __init__(self, config, patch_dim):
        super().__init__()
        self.projection = nn.Linear(patch_dim, config.hidden_size)
        self.cls = nn.Parameter(torch.zeros(config.hidden_size))
        self.mask = nn.Parameter(torch.zeros(config.hidden_size))  # [MASK], as a patch vector
        self.position = nn.Embedding(config.max_positions, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = fast.Dropout(config.dropout)

    def forward(self, patches, masked=None):
        x = self.projection(patches)                                                # (B, N, H)
        if masked is not None:  # B1's [MASK] for patches: the hidden pixels never enter
            x = torch.where(masked[..., None], self.mask.to(x.dtype), x)
        x = torch.cat([self.cls.expand(x.shape[0], 1, -1), x], dim=1)               # (B, T, H)
        x = x + self.position(torch.arange(x.shape[1], device=x.device))
        return self.dropout(self.layer_norm(x))


class ImageEncoder(Encoder):
    """model.Encoder -- the same layers and pooler -- reading patches: only the embedding
    differs. Every image has all its patches (no padding), so no attention mask is needed."""

    def __init__(self, config, patch_dim):
        super().__init__(config)
        self.embeddings = PatchEmbeddings(config, patch_dim)
        init_weights(self, config.initializer_range)

    def forward(self, patches, segment_ids=None, attention_mask=None, masked=None):
        # (B, N, D) -> (sequence output (B, T, H), pooled [CLS] (B, H)); segment_ids and
        # attention_mask are Encoder.forward's, accepted so that model.Classifier can call it
        x = self.embeddings(patches, masked)
        for layer in self.layers:
            x = layer(x, None)
        return x, self.pool(x)


def masked_patch_loss(predictions, targets, masked):
    """E-img, the masked-patch loss, written out (docs/equations.md):

        L_img(theta) = 1 / (|M| D) * sum_{i in M} || x_hat_i - x_i ||^2

    predictions, targets: (B, N, D) -- the reconstruction of every patch and its true pixels;
    masked: (B, N) bool, the set M. Only masked patches count: an unmasked patch's prediction
    never enters the loss (it was visible; copying it teaches nothing -- as E4 scores only the
    tokens behind [MASK]). Normalised per masked pixel."""
    squared = ((predictions.float() - targets.float()) ** 2).sum(dim=-1)            # (B, N)
    count = masked.sum().clamp(min=1) * targets.shape[-1]
    return torch.where(masked, squared, 0.0).sum() / count


class MaskedPatchModel(nn.Module):
    """ImageEncoder + the reconstruction head (dense -> GELU -> LayerNorm -> D pixels, MLMHead's
    transform with pixels in place of vocabulary scores). Its loss is E-img."""

    def __init__(self, config, patch_dim):
        super().__init__()
        self.config = config
        self.encoder = ImageEncoder(config, patch_dim)
        self.head = nn.Sequential(nn.Linear(config.hidden_size, config.hidden_size), nn.GELU(),
                                  nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps),
                                  nn.Linear(config.hidden_size, patch_dim))
        init_weights(self, config.initializer_range)

    def forward(self, patches, masked):
        """-> (E-img loss, reconstruction (B, N, D)); position 0 ([CLS]) reconstructs nothing."""
        sequence_output, _ = self.encoder(patches, masked=masked)                   # (B, T, H)
        reconstruction = self.head(sequence_output[:, 1:])                         # (B, N, D)
        return masked_patch_loss(reconstruction, patches, masked), reconstruction


def random_patch_mask(batch, num_patches, ratio, generator):
    """(B, N) bool: exactly round(ratio * N) patches (at least 1) hidden in each image, chosen
    uniformly (a torch.Generator: seeded, resumable)."""
    hidden = max(1, round(ratio * num_patches))
    order = torch.rand(batch, num_patches, generator=generator).argsort(dim=1)
    return order < hidden  # the patches whose random rank is among the first `hidden`


def image_classifier(config, patch_dim, num_labels, pool="mean"):
    """model.Classifier with the ImageEncoder in place of the text encoder: its pooling, dropout
    and linear layer are the text classifier's. Call it with patches and an all-ones attention
    mask (B, T) (classify)."""
    model = Classifier(config, num_labels, pool)
    model.encoder = ImageEncoder(config, patch_dim)
    if model.pool == "mean":  # as Classifier does: the pooler is not on the path
        model.encoder.pooler.requires_grad_(False)
    return model


def classify(model, patches):
    """Logits (B, classes) of an image classifier for patches (B, N, D)."""
    every_position = torch.ones(patches.shape[0], patches.shape[1] + 1, dtype=torch.bool,
                                device=patches.device)  # (B, T): no padding, ever
    return model(patches, None, every_position)


# ----------------------------------------------------------------------------------------
# Settings (options.setting, as options.py declares every other command's)
# ----------------------------------------------------------------------------------------


@dataclass
class ImagePretrainOptions:
    data: str = setting("world", "world (generated, numpy) or digits (scikit-learn's 8x8)",
                        choices=DATA_SETS)
    image_size: int = setting(None, "side of the world's images (default 16; digits: 8)", least=2)
    patch_size: int = setting(None, "patch side P (default 4 on the world, 2 on digits)", least=1)
    mask_ratio: float = setting(0.5, "share of each image's patches hidden behind [MASK]")
    config: str = setting("tiny", "encoder size: tiny, small or base (model.PRESETS)",
                          choices=tuple(PRESETS))
    intermediate_size: int = setting(256, "feed-forward size I, overriding the preset", least=1)
    steps: int = setting(2000, "optimizer steps", least=1)
    batch_size: int = setting(64, "images per step", least=1)
    lr: float = setting(1e-3, "peak learning rate (warmup, then cosine; C4)")
    dropout: float = setting(0.0, "dropout in the encoder")
    seed: int = setting(0, "random seed (same seed, same numbers on CPU)")
    save_every: int = setting(500, "write checkpoint.pt every N steps (0: only at the end)",
                              least=0)
    device: str = setting("auto", "auto (cuda, then mps, then cpu), cpu, cuda or mps")

    def check(self):
        check_settings(self)
        if not 0 < self.mask_ratio < 1:
            raise InputError(f"--mask-ratio must be between 0 and 1, got {self.mask_ratio}")
        check_learning_rate(self.lr)
        size = self.image_size or (8 if self.data == "digits" else 16)
        check_patch_size(size, self.patch_or_default())

    def patch_or_default(self):
        return self.patch_size or (2 if self.data == "digits" else 4)


@dataclass
class ImageFinetuneOptions:
    init: str = setting("scratch", "an image pre-training run folder, or scratch")
    data: str = setting("world", "world or digits: the images the labels belong to",
                        choices=DATA_SETS)
    labels_per_class: int = setting(4, "k labeled images per class (drawn by --seed)", least=1)
    freeze: str = setting("none", "B4 / C3: head, top-K (e.g. top-1) or none")
    pool: str = setting("mean", "what the classifier reads: mean (over positions) or cls")
    epochs: int = setting(40, "passes over the labeled images", least=1)
    lr: float = setting(None, "peak learning rate (default: 1e-2 for head/top-K, 1e-3 for none)")
    batch_size: int = setting(16, "images per step", least=1)
    dropout: float = setting(0.1, "dropout in the encoder and before the classifier")
    seed: int = setting(0, "random seed: the draw of the labeled images and the training")
    # no --device: tens of images train in seconds on the CPU

    def check(self):
        check_settings(self)
        if self.pool not in ("mean", "cls"):
            raise InputError(f"--pool: expected mean or cls, got {self.pool!r}")
        trainable_layers(self.freeze)  # the form; the depth where the model is built

    def peak_lr(self):
        # above text's defaults (options.DEFAULT_FINETUNE_LR): on the image world at k=4, ~160
        # steps at 1e-3 left the head under-trained (a linear probe of the same features did
        # better), and full fine-tuning did no worse at 1e-3 than at 3e-4
        return self.lr if self.lr is not None else (1e-3 if self.freeze == "none" else 1e-2)


# ----------------------------------------------------------------------------------------
# Pre-training: the loop, checkpoints, --resume
# ----------------------------------------------------------------------------------------

# what a --resume must keep (the rate and the step count may change)
RESUME_MUST_MATCH = ("data", "image_size", "patch_size", "mask_ratio", "config",
                     "intermediate_size", "batch_size", "dropout", "seed")


def image_config(o, num_patches, **changes):
    """The encoder's model.Config: the preset, one position per patch plus [CLS]; vocab_size and
    type_vocab_size are the text embedding's, unused here (1)."""
    return make_config(o.config, intermediate_size=o.intermediate_size, vocab_size=1,
                       type_vocab_size=1, max_positions=num_patches + 1, dropout=o.dropout,
                       attention_dropout=o.dropout, **changes)


def pretrain_images(out, o, resume=False, force=False, log=print):
    """E-img: pre-train an ImageEncoder on --data's unlabeled images. Writes OUT/checkpoint.pt
    (also every save_every steps), OUT/metrics.json and OUT/reconstructions.png. --resume
    continues from the checkpoint (the same batches and masks as an uninterrupted run)."""
    o.check()
    data_set = image_data(o.data, o.image_size)
    prepare_out_folder(out, resume, force)
    patch = o.patch_or_default()
    unlabeled = torch.from_numpy(patchify(data_set["unlabeled"], patch))              # (U, N, D)
    device = pick_device(o.device)
    train.seed_everything(o.seed)  # the initialisation and dropout; the data: `generator`
    model = MaskedPatchModel(image_config(o, unlabeled.shape[1]), unlabeled.shape[2]).to(device)
    optimizer = schedule.make_optimizer(model, o.lr)
    generator, history, step = torch.Generator().manual_seed(o.seed), [], 0
    path = os.path.join(out, "checkpoint.pt")
    if resume and os.path.exists(path):
        step, history = restore(path, o, model, optimizer, generator)
        log(f"resuming {out} at step {step}")
    log(f"pre-training a {o.config} image encoder ({count_parameters(model.encoder):,} "
        f"parameters) on {len(unlabeled)} {o.data} images, {unlabeled.shape[1]} patches of "
        f"{patch}x{patch}, {o.mask_ratio:.0%} masked; {device}")
    model.train()
    while step < o.steps:
        batch = unlabeled[torch.randint(len(unlabeled), (o.batch_size,), generator=generator)]
        masked = random_patch_mask(o.batch_size, batch.shape[1], o.mask_ratio, generator)
        for group in optimizer.param_groups:
            group["lr"] = schedule.learning_rate(step, o.steps, o.lr, max(1, o.steps // 20))
        loss, _ = model(batch.to(device), masked.to(device))
        if not math.isfinite(loss.item()):  # before the update: the last checkpoint stays good
            raise train.TrainingDiverged(f"step {step + 1}: the masked-patch loss is "
                                         f"{loss.item()}; try a lower --lr")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % max(1, o.steps // 10) == 0 or step == o.steps:
            history.append({"step": step, "train_loss": loss.item(),
                            "held_out_loss": held_out_loss(model, data_set, patch, o, device)})
            log(f"step {step}: masked-patch loss {loss.item():.4f}, held-out "
                f"{history[-1]['held_out_loss']:.4f}")
        if step == o.steps or (o.save_every and step % o.save_every == 0):
            save(path, o, model, optimizer, generator, step, history)
    metrics = {"step": step, "held_out_loss": history[-1]["held_out_loss"] if history else None,
               "data": o.data, "history": history}
    write_json(os.path.join(out, "metrics.json"), metrics)
    write_reconstructions(os.path.join(out, "reconstructions.png"), model, data_set, patch, o)
    log(f"done: held-out masked-patch loss {metrics['held_out_loss']:.4f}; {out}/checkpoint.pt, "
        f"{out}/reconstructions.png")
    return metrics


def held_out_loss(model, data_set, patch, o, device, count=500):
    """E-img on the first `count` test images, with masks from a fixed seed (comparable across
    steps and runs); the model goes back to training mode."""
    test = torch.from_numpy(patchify(data_set["test"][0][:count], patch))
    masked = random_patch_mask(len(test), test.shape[1], o.mask_ratio,
                               torch.Generator().manual_seed(12345))
    model.eval()
    with torch.no_grad():
        loss = model(test.to(device), masked.to(device))[0].item()
    model.train()
    return loss


def save(path, o, model, optimizer, generator, step, history):
    save_atomic(path, {"kind": "image-pretraining", "model": on_cpu(model.state_dict()),
                       "config": model.config.to_dict(), "patch_dim": model.head[-1].out_features,
                       "run": asdict(o), "step": step, "history": history,
                       "optimizer": optimizer.state_dict(), "rng": generator.get_state(),
                       "torch_rng": torch.get_rng_state()})  # dropout's masks


def load_image_checkpoint(path):
    """An image run folder or checkpoint file -> its dict, verified (every record's CRC-32) and
    read with weights_only=True; anything else is one line."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pt")
    if not os.path.exists(path):
        raise InputError(f"{path}: no checkpoint here (expected an image pre-training run)")
    verify_records(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise InputError(f"{path}: not a ptft checkpoint ({str(error)[:120]})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("kind") != "image-pretraining":
        raise InputError(f"{path}: not an image pre-training checkpoint (pretrain-images "
                         "writes those)")
    return checkpoint


def restore(path, o, model, optimizer, generator):
    """--resume: the checkpoint's weights, optimizer moments and generator; its settings must
    match. Returns (step, history)."""
    checkpoint = load_image_checkpoint(path)
    run, now = checkpoint["run"], asdict(o)
    differing = [f"{key}: checkpoint {run.get(key)!r} vs now {now[key]!r}"
                 for key in RESUME_MUST_MATCH if run.get(key) != now[key]]
    if differing:
        raise InputError(f"{path}: --resume with different settings ({', '.join(differing)})")
    if checkpoint["step"] > o.steps:
        raise InputError(f"{path}: the run is at step {checkpoint['step']}, beyond --steps "
                         f"{o.steps}")
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    generator.set_state(checkpoint["rng"])
    torch.set_rng_state(checkpoint["torch_rng"])
    return checkpoint["step"], checkpoint["history"]


# ----------------------------------------------------------------------------------------
# Fine-tuning (E3 on images) and the pixel baseline
# ----------------------------------------------------------------------------------------


def fit_image_classifier(patches, labels, num_labels, config, o, encoder_state=None):
    """E3 on images: the mean cross-entropy of image_classifier over (patches (n, N, D), labels),
    from encoder_state (None: a random initialisation, C1's scratch). --freeze as for text:
    options.trainable_layers / train.freeze_below (frozen modules in eval mode, never in the
    optimizer).
    Returns the model (in eval mode)."""
    train.seed_everything(o.seed)
    model = image_classifier(replace(config, dropout=o.dropout, attention_dropout=o.dropout),
                             patches.shape[2], num_labels, o.pool)
    if encoder_state is not None:
        model.encoder.load_state_dict(encoder_state)
    frozen = train.freeze_below(model, trainable_layers(o.freeze, config.num_layers))
    optimizer = schedule.make_optimizer(model, o.peak_lr())
    rng = np.random.default_rng(o.seed)
    labels = torch.as_tensor(labels)
    total_steps = o.epochs * math.ceil(len(patches) / o.batch_size)
    step = 0
    for _ in range(o.epochs):
        model.train()
        for module in frozen:
            module.eval()
        order = rng.permutation(len(patches))
        for first in range(0, len(order), o.batch_size):
            index = torch.from_numpy(order[first:first + o.batch_size])
            for group in optimizer.param_groups:
                group["lr"] = schedule.learning_rate(step, total_steps, o.peak_lr(),
                                                  max(1, total_steps // 10)) * group["lr_scale"]
            loss = F.cross_entropy(classify(model, patches[index]).float(), labels[index])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
    return model.eval()


def accuracy(model, patches, labels):
    with torch.no_grad():
        predicted = classify(model, patches).argmax(-1).numpy()
    return float((predicted == np.asarray(labels)).mean())


def finetune_images(out, o, force=False, log=print):
    """--data's labeled pool -> k per class (seeded) -> fit_image_classifier from --init (or
    scratch) -> test accuracy. Writes OUT/checkpoint.pt (the classifier) and OUT/metrics.json."""
    o.check()
    source = None if o.init == "scratch" else load_image_checkpoint(o.init)
    if source is not None and source["run"]["data"] != o.data:
        raise InputError(f"--init {o.init}: pre-trained on {source['run']['data']} images, "
                         f"not --data {o.data}")
    # the pre-training run's image settings (scratch: the defaults a pre-training would have)
    pre = ImagePretrainOptions(**source["run"]) if source else ImagePretrainOptions(data=o.data)
    data_set = image_data(o.data, pre.image_size)
    prepare_out_folder(out, force=force)
    patch = pre.patch_or_default()
    pool_images, pool_labels = data_set["pool"]
    chosen = draw_per_class(pool_labels, o.labels_per_class, o.seed)
    patches = torch.from_numpy(patchify(pool_images[chosen], patch))
    config = Config(**source["config"]) if source else image_config(pre, patches.shape[1])
    encoder = ({k[len("encoder."):]: v for k, v in source["model"].items()
                if k.startswith("encoder.")} if source else None)
    model = fit_image_classifier(patches, pool_labels[chosen], data_set["classes"], config, o,
                                 encoder)
    test_images, test_labels = data_set["test"]
    metrics = {"accuracy": accuracy(model, torch.from_numpy(patchify(test_images, patch)),
                                    test_labels),
               "n": len(test_labels), "labeled": len(chosen), "init": o.init,
               "trainable_parameters": count_parameters(model, trainable_only=True)}
    save_atomic(os.path.join(out, "checkpoint.pt"),
                {"kind": "image-classifier", "model": on_cpu(model.state_dict()),
                 "config": config.to_dict(), "run": asdict(o)})
    write_json(os.path.join(out, "metrics.json"), metrics)
    log(f"test accuracy {metrics['accuracy']:.3f} on {metrics['n']} {o.data} images "
        f"({len(chosen)} labeled, --init {o.init}, --freeze {o.freeze})")
    return metrics


def pixel_logistic_regression(train_images, train_labels, test_images, num_classes, l2=None,
                              steps=300):
    """C1's baseline on images: softmax(W x + b) on the raw pixels x (standardised with the
    training images' mean and std), by evaluation.linear_softmax. l2=None: chosen from L2_GRID
    by cross-validation on the labeled images themselves (choose_l2) -- 256 pixels and 40 images
    over-fit without it. Returns test predictions."""
    if l2 is None:
        l2 = choose_l2(train_images, train_labels, num_classes, steps)
    x_train = torch.from_numpy(train_images.reshape(len(train_images), -1)).float()
    mean, std = x_train.mean(0), x_train.std(0).clamp(min=1e-3)
    x_train = (x_train - mean) / std
    predict = evaluation.linear_softmax(x_train, torch.as_tensor(train_labels), num_classes, l2,
                                        steps, lr=0.05)
    x_test = (torch.from_numpy(test_images.reshape(len(test_images), -1)).float() - mean) / std
    return predict(x_test)


L2_GRID = (1e-3, 1e-2, 1e-1, 1.0)
FOLDS = 4


def choose_l2(images, labels, num_classes, steps):
    """The L2_GRID value with the best accuracy over FOLDS folds of the labeled images (fold f:
    each class's f-th, (f + FOLDS)-th, ... image; fewer folds where a class has fewer images);
    a tie goes to the larger penalty."""
    labels = np.asarray(labels)
    rank = np.zeros(len(labels), dtype=int)
    for c in np.unique(labels):
        rank[labels == c] = np.arange((labels == c).sum())
    # a class with fewer images than FOLDS: fewer folds
    count = min(FOLDS, int(np.bincount(labels)[np.unique(labels)].min()))
    if count < 2:
        return 0.1  # one image per class: nothing to hold out
    folds = rank % count
    scores = []
    for l2 in L2_GRID:
        right = sum(int((pixel_logistic_regression(images[folds != f], labels[folds != f],
                                                   images[folds == f], num_classes, l2, steps)
                         == labels[folds == f]).sum()) for f in range(count))
        scores.append((right, l2))
    return max(scores)[1]


# ----------------------------------------------------------------------------------------
# The picture: images, their masked versions, the reconstructions (a PNG from numpy + zlib)
# ----------------------------------------------------------------------------------------


def write_png(path, gray):
    """A (height, width) array in [0, 1] as an 8-bit grayscale PNG: the signature, IHDR, the
    zlib-compressed rows (each after a 0 byte: no filter), IEND; every chunk with its CRC-32."""
    pixels = (np.clip(gray, 0, 1) * 255).round().astype(np.uint8)

    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    rows = b"".join(b"\x00" + row.tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", pixels.shape[1], pixels.shape[0], 8, 0, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))


def write_reconstructions(path, model, data_set, patch, o, count=8, scale=8):
    """Three rows of `count` test images: the image, its masked version (hidden patches grey),
    the reconstruction (visible patches as they are, hidden ones as the model predicts them);
    each pixel drawn as scale x scale."""
    test = data_set["test"][0][:count]
    size = data_set["image_size"]
    patches = torch.from_numpy(patchify(test, patch))
    masked = random_patch_mask(count, patches.shape[1], o.mask_ratio,
                               torch.Generator().manual_seed(7))
    model.eval()
    with torch.no_grad():
        device = next(model.parameters()).device
        predicted = model(patches.to(device), masked.to(device))[1].cpu()
    hidden = masked[..., None]
    grey = torch.full_like(patches, 0.5)
    rows = [patches, torch.where(hidden, grey, patches), torch.where(hidden, predicted, patches)]
    gap = 2
    canvas = np.ones((3 * (size + gap), count * (size + gap)), dtype=np.float32)
    for r, row in enumerate(rows):
        for c, image in enumerate(unpatchify(row, size, size, patch).numpy()):
            top, left = r * (size + gap), c * (size + gap)
            canvas[top:top + size, left:left + size] = image
    write_png(path, np.kron(canvas, np.ones((scale, scale))))


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        options = ImagePretrainOptions(steps=300, save_every=0)
        metrics = pretrain_images(os.path.join(folder, "pre"), options)
        print(f"held-out masked-patch loss: {metrics['history'][0]['held_out_loss']:.4f} at step "
              f"{metrics['history'][0]['step']} -> {metrics['held_out_loss']:.4f}")
