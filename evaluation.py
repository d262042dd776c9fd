"""Evaluation and prediction: what a trained model scores, and what it predicts.

    mlm_evaluation(model, batches)   held-out E4: the mean -log P(x_t | x~) over every masked token
    classify(model, rows, labels)    accuracy, macro-F1 and the mean cross-entropy of E3
    linear_softmax(x, y)             the baselines' classifier on fixed features (TF-IDF, pixels)
    evaluate(init, data)             either of the two on a file, for a run folder
                                     (`ptft.py evaluate`)
    fill_mask(init, text)            E4's softmax at every [MASK] (`ptft.py fill-mask`)
    generate(init, prompt)           C8: a causal run writes on, one token at a time
                                     (`ptft.py generate`)

Run `python evaluation.py RUN TEXT_WITH_[MASK]` to see a pre-training run fill in a blank.
"""

import sys

import numpy as np
import torch
import torch.nn.functional as F

import data
from checkpoint import open_model
from common import IGNORE_INDEX, InputError
from model import mlm_loss
from options import GenerateOptions, autocast, pick_device

# ----------------------------------------------------------------------------------------
# The two measures: held-out E4 and a classifier's scores
# ----------------------------------------------------------------------------------------


@torch.no_grad()
def mlm_evaluation(model, batches, device, precision="fp32"):
    """Held-out MLM loss (mean over all masked tokens, E4) and NSP accuracy."""
    was_training = model.training
    model.eval()
    total_loss, total_masked, nsp_correct, nsp_total = 0.0, 0, 0, 0
    for batch in batches:
        batch = to_tensors(batch, device)
        with autocast(device, precision):
            sequence_output, pooled = model.encoder(batch["input_ids"], batch["segment_ids"],
                                                    batch["attention_mask"])
            scores = model.mlm_scores(sequence_output, batch["mlm_labels"])
            nsp_predictions = model.nsp_head(pooled).argmax(-1)
        targets = batch["mlm_labels"][batch["mlm_labels"] != IGNORE_INDEX]
        total_loss += mlm_loss(scores, targets, num_masked_total=1).item()  # E4's sum over M
        total_masked += targets.numel()
        nsp_correct += (nsp_predictions == batch["nsp_labels"]).sum().item()
        nsp_total += len(batch["nsp_labels"])
    model.train(was_training)
    return {"mlm_loss": total_loss / max(total_masked, 1),
            "nsp_accuracy": nsp_correct / max(nsp_total, 1)}


def linear_softmax(x_train, y_train, num_classes, l2, steps, lr):
    """The non-neural baselines' classifier (TF-IDF words, raw pixels) on fixed features x (n, D):
    softmax(W x + b), cross-entropy + l2 * ||W||^2, full-batch Adam from zero -- a convex
    problem, so the optimizer matters little. Returns predict(x_test) -> the argmax classes."""
    weight = torch.zeros(x_train.shape[1], num_classes, requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(x_train @ weight + bias, y_train) + l2 * (weight ** 2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    @torch.no_grad()
    def predict(x_test):
        return (x_test @ weight + bias).argmax(-1).numpy()

    return predict


@torch.no_grad()
def classifier_logits(model, rows, device, batch_size=128, pad_id=0):
    """The classifier's logits f_phi(x) for rows of ids, in eval mode: (len(rows), C) float32,
    on the CPU."""
    model.eval()
    logits = []
    for first in range(0, len(rows), batch_size):
        input_ids, mask = data.pad(rows[first:first + batch_size], pad_id)
        batch_logits = model(torch.from_numpy(input_ids).to(device), None,
                             torch.from_numpy(mask).to(device))
        logits.append(batch_logits.float().cpu())
    return torch.cat(logits) if logits else torch.zeros(0, model.classifier.out_features)


def classify(model, rows, labels, device, batch_size=128, pad_id=0):
    """Accuracy, macro-F1, mean cross-entropy and n over (rows of ids, integer labels)."""
    logits = classifier_logits(model, rows, device, batch_size, pad_id)
    total_loss = F.cross_entropy(logits, torch.tensor(labels), reduction="sum").item()
    predictions, labels = logits.argmax(-1).numpy(), np.array(labels)
    f1s = []
    for label in np.unique(np.concatenate([labels, predictions])):
        true_positive = np.sum((predictions == label) & (labels == label))
        precision = true_positive / max(1, np.sum(predictions == label))
        recall = true_positive / max(1, np.sum(labels == label))
        f1s.append(0.0 if true_positive == 0 else 2 * precision * recall / (precision + recall))
    return {"accuracy": float(np.mean(predictions == labels)), "macro_f1": float(np.mean(f1s)),
            "loss": total_loss / len(labels), "n": int(len(labels))}


def evaluate(init, data_path, device="auto", log=print, base=None):
    """A classifier checkpoint on a TSV -> accuracy, macro-F1, loss, n.
    A pre-training checkpoint on a text corpus -> held-out MLM loss (E4) and NSP accuracy.
    base: the run a task file (finetune --save delta) was fine-tuned from."""
    device = pick_device(device)
    model, tokenizer, checkpoint = open_model(init, log, base)
    model.to(device)
    if checkpoint.get("kind") == "classifier":
        texts, labels = data.read_tsv(data_path)
        label_ids = data.encode_labels(labels, checkpoint["labels"], data_path)
        rows = data.classification_inputs(tokenizer, texts, model.config.max_positions, log,
                                          path=data_path)
        return classify(model, rows, label_ids, device, pad_id=tokenizer.pad_id)
    encoded = data.encode_documents(tokenizer, data.load_corpus([data_path])[1])
    max_length = min(model.config.max_positions, checkpoint.get("run", {}).get("max_length", 128))
    # NSP accuracy only where the run trained its NSP head and the corpus allows B2's pairs
    use_nsp = checkpoint.get("run", {}).get("nsp", True) and data.nsp_possible(encoded)
    batches = data.held_out_batches(encoded, tokenizer, max_length, use_nsp=use_nsp,
                                    causal=model.config.causal)
    result = mlm_evaluation(model, batches, device)
    if model.config.causal:  # C8: the mean -log P(x_t | x_<t); its exp is the perplexity
        result["perplexity"] = float(np.exp(result["mlm_loss"]))
    if not use_nsp:
        del result["nsp_accuracy"]
    result["n"] = int(sum((b["mlm_labels"] != IGNORE_INDEX).sum() for b in batches))
    return result


@torch.no_grad()
def fill_mask(init, text, top_k=5, device="auto", log=print, base=None):
    """The MLM head's prediction at every [MASK] of TEXT: a list with, per [MASK], the top_k
    (token, probability) pairs, best first. The probability is E4's softmax over the vocabulary
    -- the distribution whose log the MLM loss sums over the masked set M."""
    device = pick_device(device)
    notes = []  # open_model's notes, said only if fill-mask goes on (a refusal is one line)
    model, tokenizer, checkpoint = open_model(init, notes.append, base)
    if checkpoint.get("kind") != "pretraining":
        raise InputError(f"{init}: a classifier checkpoint has no MLM head; "
                         "fill-mask needs a pre-trained one")
    if "mlm_head" in checkpoint.get("fresh", []):
        raise InputError(f"{init}: the file has no MLM head weights (a sentence-embedding model?); "
                         "fill-mask needs them")
    if top_k < 1:
        raise InputError(f"--top-k must be positive, got {top_k}")
    input_ids = [tokenizer.cls_id, *tokenizer.encode(text), tokenizer.sep_id]
    if tokenizer.mask_id not in input_ids:
        raise InputError("no [MASK] in the text; write [MASK] where a token should be predicted")
    if len(input_ids) > model.config.max_positions:
        raise InputError(f"the text is {len(input_ids)} tokens long; "
                         f"the model takes at most {model.config.max_positions}")
    for note in notes:
        log(note)
    model.to(device).eval()
    input_ids = torch.tensor([input_ids], device=device)
    sequence_output, _ = model.encoder(input_ids)
    # mlm_scores reads the masked set M off the labels: any value but IGNORE_INDEX marks a position
    masked = torch.where(input_ids == tokenizer.mask_id, input_ids,
                         torch.full_like(input_ids, IGNORE_INDEX))
    # s_theta(x' | x~): (number of [MASK]s, V)
    scores = model.mlm_scores(sequence_output, masked).float()
    # E4: P(x' | x~) = exp(s_theta(x' | x~)) / sum_{x'' in V} exp(s_theta(x'' | x~))
    probabilities = scores.softmax(dim=-1)
    best = probabilities.topk(min(top_k, len(tokenizer)), dim=-1)
    return [[(tokenizer.vocab[i], p) for i, p in zip(ids.tolist(), ps.tolist())]
            for ids, ps in zip(best.indices, best.values)]


@torch.no_grad()
def generate(init, prompt, options=None, log=print):
    """C8: a causal run continues PROMPT one token at a time: x_t ~ P(. | x_<t), the chain rule of
    E2 read forwards. P is the softmax of the tied decoder's scores at the last position, divided by
    `temperature` (below 1: sharper, above: flatter), restricted to the top_k best tokens if given;
    greedy takes the most probable token (no randomness at all). Stops at [SEP] (where the
    training rows end) or after max_new_tokens. options: a GenerateOptions. Returns (the generated
    text, its token ids)."""
    o = options or GenerateOptions()
    o.check()
    device = pick_device(o.device)
    notes = []
    model, tokenizer, checkpoint = open_model(init, notes.append)
    if checkpoint.get("kind") != "pretraining" or not model.config.causal:
        raise InputError(f"{init}: generate needs a causal pre-training run "
                         "(ptft.py pretrain --objective causal)")
    ids = [tokenizer.cls_id, *tokenizer.encode(prompt)]
    if len(ids) >= model.config.max_positions:
        raise InputError(f"the prompt is {len(ids)} tokens long; "
                         f"the model takes at most {model.config.max_positions - 1} "
                         "before the first generated one")
    for note in notes:
        log(note)
    model.to(device).eval()
    generator = torch.Generator().manual_seed(o.seed)  # its own: the same seed, the same text
    new = []
    while len(new) < o.max_new_tokens and len(ids) < model.config.max_positions:
        sequence_output, _ = model.encoder(torch.tensor([ids], device=device))     # (1, T, H)
        token_embedding = model.encoder.embeddings.token.weight
        # s(. | x_<=t) at the last position, through the MLM head tied to the embeddings       (V,)
        scores = model.mlm_head(sequence_output[0, -1:], token_embedding)[0].float().cpu()
        scores[tokenizer.pad_id] = float("-inf")  # never trained as a target
        if o.greedy:
            token = int(scores.argmax())
        else:
            scores = scores / o.temperature
            if o.top_k is not None and o.top_k < len(scores):
                threshold = scores.topk(o.top_k).values[-1]
                scores = scores.masked_fill(scores < threshold, float("-inf"))
            token = int(torch.multinomial(scores.softmax(-1), 1, generator=generator))
        if token == tokenizer.sep_id:
            break
        ids.append(token)
        new.append(token)
    return tokenizer.decode(new), new


def to_tensors(batch, device):
    """numpy arrays (or tensors) -> tensors on `device`; a pinned tensor is copied without
    blocking."""
    return {key: (torch.from_numpy(value) if isinstance(value, np.ndarray) else value)
            .to(device, non_blocking=True)
            for key, value in batch.items()}


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python evaluation.py RUN 'text with [MASK]'")
    for candidates in fill_mask(sys.argv[1], sys.argv[2]):
        print("  ".join(f"{token} {probability:.3f}" for token, probability in candidates))
