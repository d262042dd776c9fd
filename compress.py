"""C7 -- the document's last, unfinished answer: "large pre-trained models cost a lot to store
and deploy; one can consider ...". The standard remedies' formulas, in one room (deploy.py runs
each as a command that writes a run folder; docs/equations.md writes every formula out):

    distillation_loss, Teacher     a smaller student learns the teacher's softened predictions
    every_other_layer              DistilBERT's student: one teacher layer in two
    to_int8_rows, from_int8_rows   every weight matrix as int8, one scale per row: ~4x less on disk
    prune_smallest_weights         zero the smallest weights of every matrix (magnitude pruning)
    zero_shares                    the zeros as a share of the layer matrices and of the model
    remove_feed_forward_units      remove whole feed-forward units: a smaller dense model
    remove_heads                   remove whole attention heads: a smaller dense model
    LowRankUpdate                  LoRA: a task stores low-rank matrices, not an encoder
    with_int8_arithmetic           a speed device: int8 matmuls on the CPU

Run `python deploy.py` to run every remedy on a small toy world.
"""

import copy
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import IGNORE_INDEX
from model import Classifier, count_parameters

# ----------------------------------------------------------------------------------------
# Distillation: a smaller student, trained on the teacher's soft predictions
# ----------------------------------------------------------------------------------------


def distillation_loss(student_logits, teacher_logits, labels, temperature, alpha):
    """C7, knowledge distillation (Hinton et al. 2015; DistilBERT, Sanh et al. 2019):

        L = alpha * CE(z_s, y) + (1 - alpha) * T^2 * KL( softmax(z_t / T) || softmax(z_s / T) )

    z_s, z_t: student and teacher logits (B, C); y: labels, IGNORE_INDEX on a transfer-set row
    that has none. A temperature T > 1 softens the teacher's distribution, so that how likely it
    finds each WRONG class (which mistakes are nearly right) carries weight; T^2 keeps the soft
    term's gradient at the hard term's scale as T changes. The cross-entropy averages over the
    rows with a label (0 without any), the KL over every row. The teacher's logits are
    constants: no gradient reaches the teacher."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)       # (B, C)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    # KL(p_t || p_s) = sum_c p_t,c * (log p_t,c - log p_s,c), per row; then the mean over rows
    soft = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1).mean()
    labeled = labels != IGNORE_INDEX
    hard = (F.cross_entropy(student_logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
            / labeled.sum().clamp(min=1))
    return alpha * hard + (1 - alpha) * temperature ** 2 * soft


@dataclass
class Teacher:
    """C7, distillation: the teacher's logits for every training row (rows without a label
    included: the transfer set), and the loss's temperature T and mixing weight alpha."""
    logits: torch.Tensor
    temperature: float = 2.0
    alpha: float = 0.5

    def loss(self, student_logits, index, labels):
        """distillation_loss of the student's logits for the training rows `index` (B, C)."""
        teacher_logits = self.logits[torch.from_numpy(index)].to(student_logits.device)
        return distillation_loss(student_logits, teacher_logits, labels,
                                 self.temperature, self.alpha)


def every_other_layer(teacher, config):
    """The student encoder's state: the teacher's embeddings and pooler, and student layer i =
    teacher layer i * L_t // L_s (for half the layers: 0, 2, 4, ...)."""
    state, teacher_layers = {}, teacher.config.num_layers
    for name, value in teacher.encoder.state_dict().items():
        if not name.startswith("layers."):
            state[name] = value
    for i in range(config.num_layers):
        source = f"layers.{i * teacher_layers // config.num_layers}."
        for name, value in teacher.encoder.state_dict().items():
            if name.startswith(source):
                state[f"layers.{i}." + name[len(source):]] = value
    return state



# ----------------------------------------------------------------------------------------
# Quantisation: int8 weight matrices (deploy.quantize writes them; every load reads them back)
# ----------------------------------------------------------------------------------------


def to_int8_rows(weight):
    """Symmetric int8, one scale per row (per output unit of a linear layer, per token of an
    embedding table):

        s_r = max_j |W_rj| / 127,    q_rj = round(W_rj / s_r)  in [-127, 127],    W_rj ~ s_r * q_rj

    so every weight is off by at most s_r / 2. One byte per weight instead of four, plus one
    float per row. A row's own scale keeps one large row from flattening all the others."""
    scale = weight.abs().amax(dim=1).float() / 127
    # an all-zero row: any scale gives q = 0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def from_int8_rows(quantized, scale):
    """W ~ s_r * q_r: the float32 weights back (each within s_r / 2 of the original)."""
    return quantized.float() * scale[:, None]


def quantized_state(state):
    """A state dict -> (the same with every float matrix as int8, {name: its row scales})."""
    quantized, scales = {}, {}
    for name, value in state.items():
        if value.ndim == 2 and value.is_floating_point():
            quantized[name], scales[name] = to_int8_rows(value.float())
        else:
            quantized[name] = value
    return quantized, scales


# ----------------------------------------------------------------------------------------
# Pruning: remove the least important weights or units
# ----------------------------------------------------------------------------------------


def prunable_matrices(model):
    """What pruning removes from: the weight matrices of the encoder's layers (attention's four
    projections, the feed-forward pair). Embeddings, pooler and classifier stay whole; these are
    the matrices train.fit_classifier holds at zero where pruned."""
    return [(name, p) for name, p in model.encoder.layers.named_parameters() if p.ndim == 2]


@torch.no_grad()
def prune_smallest_weights(model, sparsity):
    """Magnitude pruning: in every prunable matrix W, the round(sparsity * |W|) weights of
    smallest |w| set to 0 -- exactly that many per matrix (ties broken by position)."""
    for _, weight in prunable_matrices(model):
        count = round(sparsity * weight.numel())
        smallest = torch.argsort(weight.abs().flatten(), stable=True)[:count]
        weight.view(-1)[smallest] = 0.0
    return model


def zero_fraction(model):
    """The fraction of the prunable weights that are exactly 0."""
    matrices = [p for _, p in prunable_matrices(model)]
    return sum(int((p == 0).sum()) for p in matrices) / max(1, sum(p.numel() for p in matrices))


def zero_shares(model):
    """The zeros of the prunable matrices (zero_fraction) as two shares: of those matrices, and
    of every parameter of the model. "50% pruned" means the first; where the embedding table is
    most of the model (a small model, a large vocabulary) the second is far smaller."""
    matrices = [p for _, p in prunable_matrices(model)]
    zeros = sum(int((p == 0).sum()) for p in matrices)
    return {"zeros_of_layers": zeros / max(1, sum(p.numel() for p in matrices)),
            "zeros_of_model": zeros / max(1, sum(p.numel() for p in model.parameters()))}


@torch.no_grad()
def remove_feed_forward_units(model, fraction):
    """Structured pruning: a feed-forward unit j computes W_out[:, j] * GELU(W_in[j] . x + b_j);
    its importance here is ||W_in[j]|| * ||W_out[:, j]||. The round(fraction * I) least important
    units of every layer go -- rows of W_in and b, columns of W_out -- which computes exactly
    what the full model computes with those columns of W_out set to 0 (tested), in a smaller
    dense model: intermediate_size I - round(fraction * I)."""
    intermediate_size = model.config.intermediate_size
    keep_count = max(1, intermediate_size - round(fraction * intermediate_size))
    state = model.state_dict()
    for i, layer in enumerate(model.encoder.layers):
        importance = (layer.feed_forward_in.weight.norm(dim=1)
                      * layer.feed_forward_out.weight.norm(dim=0))  # (I,)
        kept = importance.argsort(descending=True, stable=True)[:keep_count].sort().values
        prefix = f"encoder.layers.{i}."
        state[prefix + "feed_forward_in.weight"] = layer.feed_forward_in.weight[kept]
        state[prefix + "feed_forward_in.bias"] = layer.feed_forward_in.bias[kept]
        state[prefix + "feed_forward_out.weight"] = layer.feed_forward_out.weight[:, kept]
    return smaller_classifier(model, replace(model.config, intermediate_size=keep_count), state)


@torch.no_grad()
def remove_heads(model, fraction):
    """Structured pruning of attention: head n reads its values through rows n*d..(n+1)*d of W_v
    and writes through the same columns of W_o, so its importance here is ||W_v[n]|| * ||W_o[:,
    n]|| (the FFN units' rule). The round(fraction * h) least important heads of every layer go
    -- their rows of W_q, W_k, W_v (and biases), their columns of W_o -- which computes exactly
    what the full model computes with those columns of W_o set to 0 (tested), in a smaller dense
    model: num_heads h - round(fraction * h), each still d = head_size wide (h * d < H)."""
    heads, size = model.config.num_heads, model.encoder.layers[0].attention.head_size
    keep_count = max(1, heads - round(fraction * heads))
    state = model.state_dict()
    for i, layer in enumerate(model.encoder.layers):
        attention = layer.attention
        importance = (attention.value.weight.view(heads, size, -1).flatten(1).norm(dim=1)
                      * attention.output.weight.view(-1, heads, size).transpose(0, 1)
                      .flatten(1).norm(dim=1))  # (h,)
        kept_heads = importance.argsort(descending=True, stable=True)[:keep_count].sort().values
        kept = (kept_heads[:, None] * size + torch.arange(size)).flatten()  # their h' * d rows
        prefix = f"encoder.layers.{i}.attention."
        for name in ("query", "key", "value"):
            state[prefix + name + ".weight"] = getattr(attention, name).weight[kept]
            state[prefix + name + ".bias"] = getattr(attention, name).bias[kept]
        state[prefix + "output.weight"] = attention.output.weight[:, kept]
    config = replace(model.config, num_heads=keep_count, head_size=size)
    return smaller_classifier(model, config, state)


def smaller_classifier(model, config, state):
    """A Classifier of `config` holding `state` (model's, with some units removed), on model's
    device: what the structured prunings return."""
    smaller = Classifier(config, model.classifier.out_features, model.pool)
    smaller.load_state_dict(state)
    return smaller.to(model.classifier.weight.device)


# ----------------------------------------------------------------------------------------
# LoRA: a frozen encoder plus low-rank updates (Hu et al. 2021)
# ----------------------------------------------------------------------------------------


class LowRankUpdate(nn.Module):
    """A frozen layer plus a trainable low-rank update (LoRA's equation, Hu et al. 2021):

        y = W x + b + (alpha / r) B (A x)      W: (out, in) frozen; A: (r, in), B: (out, r) trained

    B starts at zero, so at the start the layer computes exactly what the frozen one did; a task
    then stores r * (in + out) numbers per layer instead of out * in. alpha / r (the paper's
    scale; alpha = r by default, a scale of 1) keeps the update's size from growing with r, so
    a rate tuned at one rank holds at another. The token-embedding table E (V, H) takes the same
    update read by row instead of multiplied: token i's vector is E_i + (alpha / r) B_i A.
    merged() folds the update back: W' = W + (alpha / r) B A (merged_weight), one plain layer,
    so the fine-tuned model is an ordinary checkpoint."""

    def __init__(self, layer, rank, alpha=None):
        super().__init__()
        out_features, in_features = layer.weight.shape  # nn.Linear (out, in); nn.Embedding (V, H)
        self.frozen = layer.requires_grad_(False)
        self.A = nn.Parameter(torch.randn(rank, in_features) / math.sqrt(in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        self.scale = 1.0 if alpha is None or rank == 0 else alpha / rank

    def forward(self, x):
        if isinstance(self.frozen, nn.Embedding):  # x: token ids (B, T) -> (B, T, H)
            return self.frozen(x) + self.scale * (self.B[x] @ self.A)
        return self.frozen(x) + self.scale * ((x @ self.A.t()) @ self.B.t())

    def merged(self):
        merged = copy.deepcopy(self.frozen).requires_grad_(True)
        with torch.no_grad():
            merged.weight.copy_(merged_weight(self.frozen.weight, self.A, self.B, self.scale))
        return merged


@torch.no_grad()
def merged_weight(weight, A, B, scale):
    """W' = W + scale * B A, always computed on the CPU in float32: a task file's A and B,
    merged into its base when it is loaded (checkpoint.py), give the very bits the fine-tuned
    model was merged to, wherever it trained."""
    return weight.detach().float().cpu() + scale * (B.detach().float().cpu()
                                                    @ A.detach().float().cpu())


# which linear layers of every encoder layer get an update: LoRA's own choice (query and value),
# or every one (the four attention projections and the feed-forward pair); "+embeddings" adds an
# update of the token-embedding table, "+embedding-table" trains the embedding layer whole
# (train.classifier_to_fine_tune): what a frozen table costs LoRA, at the table's bytes
LORA_TARGETS = {"q,v": ("attention.query", "attention.value"),
                "all": ("attention.query", "attention.key", "attention.value", "attention.output",
                        "feed_forward_in", "feed_forward_out")}
LORA_TARGETS["all+embeddings"] = LORA_TARGETS["all+embedding-table"] = LORA_TARGETS["all"]


def add_low_rank_updates(model, rank, alpha=None, targets="q,v"):
    """A LowRankUpdate on the `targets` (LORA_TARGETS) of every layer of a Classifier, and with
    "all+embeddings" on its token-embedding table."""
    for layer in model.encoder.layers:
        for path in LORA_TARGETS[targets]:
            parent, _, name = path.rpartition(".")
            owner = layer.get_submodule(parent) if parent else layer
            setattr(owner, name, LowRankUpdate(getattr(owner, name), rank, alpha))
    if targets == "all+embeddings":
        embeddings = model.encoder.embeddings
        embeddings.token = LowRankUpdate(embeddings.token, rank, alpha)


def merge_low_rank_updates(model):
    """Every LowRankUpdate replaced by its merged nn.Linear: the state dict's names are BERT's
    again. What was merged stays readable as model.merged_low_rank, {the layer's name: (A, B,
    scale)} -- what a task file keeps instead of the merged weights (finetune --save delta)."""
    updates = [(name, module) for name, module in model.named_modules()
               if isinstance(module, LowRankUpdate)]
    merged_low_rank = {}
    for name, module in updates:
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent), attribute, module.merged())
        merged_low_rank[name] = (module.A.detach().cpu(), module.B.detach().cpu(), module.scale)
    if updates:
        model.merged_low_rank = merged_low_rank


def where_the_bytes_are(config, num_labels=8):
    """C7: a classifier's parameters by part -- {"parameters", "embeddings", "layers", "head"
    (pooler + classifier), "half the layers" (DistilBERT's student), and LoRA's A and B at rank 4
    for each of LORA_TARGETS}, counted on the meta device (nothing is allocated, so BERT-base
    costs nothing)."""
    with torch.device("meta"):
        model = Classifier(config, num_labels)
    total = count_parameters(model)
    embeddings = count_parameters(model.encoder.embeddings)
    layers = count_parameters(model.encoder.layers)
    parts = {"parameters": total, "embeddings": embeddings, "layers": layers,
             "head": total - embeddings - layers, "half the layers": total - layers // 2}
    for targets in ("q,v", "all", "all+embeddings"):  # (+embedding-table: "embeddings" whole)
        with torch.device("meta"):
            lora = Classifier(config, num_labels)
            add_low_rank_updates(lora, 4, targets=targets)
        parts[f"LoRA r=4 ({targets})"] = sum(p.numel() for name, p in lora.named_parameters()
                                             if name.endswith((".A", ".B")))
    return parts


# ----------------------------------------------------------------------------------------
# A speed device, set apart: int8 arithmetic on the CPU
# ----------------------------------------------------------------------------------------


def with_int8_arithmetic(model):
    """A copy of `model` whose linear layers multiply in int8 on the CPU -- PyTorch's dynamic
    quantisation: weights int8 per output channel, each batch's activations quantised on the
    fly, int32 accumulation -- or None where this torch no longer has those kernels (they are
    deprecated). quantize's reading path stores int8 and computes in float32; this one buys
    time where the matmuls are large enough (the C7 table measures it). tests/test_compress.py
    checks its outputs stay within the int8 tolerance of the float model's."""
    import copy
    import warnings

    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation notice, once per layer
        return quantize_dynamic(copy.deepcopy(model).cpu().eval(),
                                {torch.nn.Linear: per_channel_dynamic_qconfig})


if __name__ == "__main__":
    # `python compress.py`: each formula on random numbers -- distillation against its written-out
    # KL, int8 rows within half a step, pruning's exact count, LoRA merging into the same layer
    from model import make_config

    torch.manual_seed(0)
    student, teacher, labels = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    soft = (F.softmax(teacher / 2, -1)
            * (F.log_softmax(teacher / 2, -1) - F.log_softmax(student / 2, -1))).sum(-1).mean()
    expected = 0.5 * F.cross_entropy(student, labels) + 0.5 * 4 * soft
    print(f"distillation loss {distillation_loss(student, teacher, labels, 2.0, 0.5):.4f}"
          f" (written out {expected:.4f})")
    weight = torch.randn(64, 32)
    quantized, scale = to_int8_rows(weight)
    error = (from_int8_rows(quantized, scale) - weight).abs().max().item()
    print(f"int8 rows: largest error {error:.4f}, half a step {scale.max().item() / 2:.4f}")
    assert error <= scale.max().item() / 2 + 1e-6
    model = Classifier(make_config("tiny", vocab_size=100, max_positions=16), num_labels=3).eval()
    ids = torch.randint(5, 100, (2, 16))
    before = model(ids)
    add_low_rank_updates(model, 4)
    for layer in model.encoder.layers:
        torch.nn.init.normal_(layer.attention.query.B)
    updated = model(ids)
    merge_low_rank_updates(model)
    print(f"LoRA: merged model differs from W + BA by"
          f" {(model(ids) - updated).abs().max().item():.1e}"
          f" (and from the start by {(updated - before).abs().max().item():.1e})")
    prune_smallest_weights(model, 0.5)
    print(f"pruned: {zero_fraction(model):.0%} of the layer matrices are zero")
    # where the bytes are (docs/claims.md, C7): the real-text model here and BERT-base
    for name, config in (("tiny, vocab 8192", make_config("tiny", vocab_size=8192)),
                         ("base, vocab 30522", make_config("base", vocab_size=30522,
                                                           max_positions=512))):
        parts = where_the_bytes_are(config)
        assert sum(parts[key] for key in ("embeddings", "layers", "head")) == parts["parameters"]
        print(f"{name}: {parts['parameters'] / 1e6:.2f} M parameters; " + ", ".join(
            f"{key} {parts[key] / parts['parameters']:.2%}" for key in list(parts)[1:]))
    print("self-check passed")
