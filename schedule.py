"""schedule.py -- C4: how fast to learn. The learning rate at each step (linear warmup, then cosine
annealing; constant; or C5c's cyclical schedule) and AdamW over the trainable parameters, with
C5c's extra, layer-wise rates (lower toward the bottom of the encoder).

Both loops of train.py call these: the rate is set on every parameter group before each update.
docs/equations.md writes the formulas out (C4, C5c).
"""

import math
import re

import torch


def learning_rate(step, total_steps, peak, warmup_steps, schedule="cosine", cycles=3,
                  cycle_decay=0.5):
    """C4: linear warmup from 0 to `peak` over warmup_steps, then cosine annealing to 0
    (or constant). `step` counts from 0; the rate is the one used for that step's update.

    C5c, "cyclical": the document's remedy against forgetting, a cyclical schedule that lowers the
    rate late in training (循环学习率调度,在训练后期降低学习率). Cosine annealing
    with warm restarts (SGDR, Loshchilov & Hutter 2017) whose peaks decay: after warmup the steps
    split into `cycles` equal cycles; cycle c starts at peak * cycle_decay**c and anneals along a
    cosine to 0. Restarts make it cyclical; the decaying peaks make every late step slower than the
    early ones (the last cycle never exceeds peak * cycle_decay**(cycles - 1)). A triangular cycle
    would do the same job; the cosine keeps one curve shape for all three schedules."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cyclical":
        cycle = min(cycles - 1, int(progress * cycles))
        within = progress * cycles - cycle       # 0 .. 1 inside the current cycle
        return peak * cycle_decay ** cycle * 0.5 * (1.0 + math.cos(math.pi * min(1.0, within)))
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
        groups.setdefault((decay, scale), {"params": [], "weight_decay": decay, "lr_scale": scale,
                                           "lr": lr * scale})
        groups[(decay, scale)]["params"].append(p)
    # fused: one kernel for the whole update instead of a dozen passes over every tensor (same
    # formula)
    fused = all(p.device.type in ("cpu", "cuda") for _, p in trainable)
    return torch.optim.AdamW(list(groups.values()), lr=lr, betas=(0.9, 0.999), eps=1e-6,
                             fused=fused)


def layer_lr_scales(model, decay):
    """C5c, layer-wise learning-rate decay: the layer `depth` steps below the top gets
    lr * decay**depth. The head (pooler + classifier) has depth 0, the top encoder layer 1,
    ..., the bottom layer L, the embeddings L + 1 -- the most general features, lowest rate."""
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


if __name__ == "__main__":
    # `python schedule.py`: the three schedules' rates over 100 steps with 10 of warmup (C4, C5c)
    peak, total, warmup = 1e-3, 100, 10
    for schedule in ("cosine", "constant", "cyclical"):
        rates = [learning_rate(step, total, peak, warmup, schedule) for step in range(total)]
        assert max(rates) == peak and rates[warmup - 1] == peak  # warmup ends at the peak
        print(f"{schedule:>9}: " + " ".join(f"{rates[s]:.1e}" for s in range(0, total, 10)))
    print("self-check passed")
