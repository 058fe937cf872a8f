"""Importance of every parameter of the region tensors over a corpus (Zhang et al., ACL 2024).

Input: ``chunks``, a LongTensor (n_chunks, seq_len) of token ids (full chunks, no padding), read
``batch_size`` chunks at a time. The loss of one batch, L_b, is the mean next-token cross-entropy
over its b * (seq_len - 1) predicted tokens. Scores are float32 tensors shaped like their parameter:

==========  =====================================================================================
method      score of parameter θ
==========  =====================================================================================
snip        |θ ⊙ Σ_b ∇θ L_b|: the gradients are summed over the batches first (the loss is the sum
            over batches of the per-batch mean), then multiplied by θ and the absolute value taken,
            as the reference accumulates them (DeepSpeed backward without a step), so a parameter
            whose gradient changes sign between batches cancels out. Default.
snip-abs    Σ_b |θ ⊙ ∇θ L_b|: absolute per batch, then summed.
wanda       |W| · ‖X_j‖₂ (Sun et al. 2023, locuslab/wanda), for the weight matrix W of a linear layer:
            ‖X_j‖₂ is the 2-norm of input feature j of that layer over every token of the corpus.
            Forward only. (Wanda's code divides ‖X‖² by its number of calibration samples, one
            constant per matrix; it changes no ranking within a matrix.)
==========  =====================================================================================

With ``targets`` (bool (n_chunks, seq_len), ``Corpus.targets``) only the marked tokens are scored:
L_b is the mean cross-entropy over the batch's marked targets (a batch with none is skipped), and
wanda's ‖X_j‖₂ runs over the positions that predict a marked target (position t - 1 for target t),
so template tokens and answer tokens of the same sentences get separate importances.

Streaming: the gradient methods keep one float32 accumulator per tensor (for a float32 model the
parameter's own ``.grad``) and never store a batch's gradients; wanda keeps one float32 vector of
squared norms per linear layer, filled by forward pre-hooks. During a pass only the region tensors
require grad and the model is in eval mode (no dropout); afterwards every ``requires_grad`` flag,
every ``.grad`` and the train/eval mode are as they were, also when the pass raises (Ctrl-C
included). Weights are only ever read.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from engramlab.errors import EngramError
from engramlab.models.adapters import weight_in_axis
from engramlab.progress import progress_bar

METHODS = ("snip", "snip-abs", "wanda")


def region_tensors(lm, include_norms: bool = False) -> dict[str, nn.Parameter]:
    """The tensors regions are made of, by parameter name, in layer order.

    Default: every weight matrix inside the decoder layers (the adapter's ``block_matrices``:
    q/k/v/o and gate/up/down, GPT-2's c_attn/c_proj/c_fc, fused projections); not the embeddings,
    biases, norms, the final norm or the unembedding. ``include_norms`` adds the weight vectors of
    each layer's two residual norms (the reference selects regions with them but freezes and
    perturbs without them); a norm without a weight (OLMo's) adds nothing.
    """
    adapter = lm.adapter
    names = {id(p): n for n, p in lm.model.named_parameters()}
    out: dict[str, nn.Parameter] = {}
    for layer in range(adapter.n_layers):
        params = [m.weight for m in adapter.block_matrices(layer).values()]
        if include_norms:
            params += [w for norm in adapter.block_norms(layer)
                       if isinstance(w := getattr(norm, "weight", None), nn.Parameter)]
        for p in params:
            out[names[id(p)]] = p
    return out


def importance(lm, chunks: torch.Tensor, method: str = "snip", batch_size: int = 8,
               tensors: Mapping[str, nn.Parameter] | Iterable[str] | None = None,
               progress: bool = False, targets: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Scores of ``method`` (see the module docstring) for ``tensors`` (default ``region_tensors``;
    a name -> parameter dict or parameter names), float32 and on the parameters' device.
    ``targets``: the tokens that count (module docstring); None: all."""
    if method not in METHODS:
        raise EngramError(f"importance method {method!r}: choose one of {', '.join(METHODS)}")
    chunks = _check_chunks(lm, chunks, batch_size)
    targets = check_targets(chunks, targets)
    params = _resolve(lm, tensors)
    batches = progress_bar(_batches(chunks, batch_size, lm.device, targets), f"importance ({method})",
                           enabled=progress, total=-(-len(chunks) // batch_size))
    with _preserved(lm.model, params.values()):
        if method == "wanda":
            return _wanda(lm, batches, params)
        return _gradient_scores(lm.model, batches, params, per_batch_abs=method == "snip-abs")


def next_token_loss(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of a batch of chunks (b, seq_len): over its b * (seq_len - 1)
    targets, or over the marked ones (``targets`` bool (b, seq_len), position 0 ignored)."""
    logits = model(input_ids=ids, use_cache=False).logits  # (b, seq_len, vocab)
    labels = ids[:, 1:] if targets is None else ids[:, 1:].masked_fill(~targets[:, 1:], -100)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def check_targets(chunks: torch.Tensor, targets) -> torch.Tensor | None:
    """``targets`` as a bool tensor shaped like ``chunks`` (None stays None)."""
    if targets is None:
        return None
    if not isinstance(targets, torch.Tensor) or targets.shape != chunks.shape:
        raise EngramError(f"targets: a bool mask shaped like the chunks {tuple(chunks.shape)} is needed, got "
                          f"{tuple(getattr(targets, 'shape', ()))}; build the corpus with its targets")
    return targets.bool()


def _gradient_scores(model, batches, params, per_batch_abs: bool) -> dict[str, torch.Tensor]:
    # Summed gradients live in .grad when the parameter is float32 (autograd adds into it);
    # otherwise, and for snip-abs, a float32 buffer takes each batch's contribution.
    in_grad = {n: not per_batch_abs and p.dtype == torch.float32 for n, p in params.items()}
    acc = {n: None if in_grad[n] else torch.zeros(p.shape, dtype=torch.float32, device=p.device)
           for n, p in params.items()}
    with torch.enable_grad():
        for ids, targets in batches:
            if targets is not None and not bool(targets[:, 1:].any()):
                continue  # no marked target in this batch: it adds nothing
            next_token_loss(model, ids, targets).backward()
            for n, p in params.items():
                if in_grad[n] or p.grad is None:
                    continue
                with torch.no_grad():
                    acc[n].add_((p.detach().float() * p.grad.float()).abs_() if per_batch_abs else p.grad)
                p.grad = None
    out = {}
    with torch.no_grad():
        for n, p in params.items():
            g = p.grad if in_grad[n] else acc[n]
            if g is None:  # no batch reached this tensor's gradient
                out[n] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            elif per_batch_abs:
                out[n] = g
            else:
                out[n] = (p.detach().float() * g.float()).abs_()
    return out


def _wanda(lm, batches, params) -> dict[str, torch.Tensor]:
    modules = {id(m.weight): m for layer in range(lm.adapter.n_layers)
               for m in lm.adapter.block_matrices(layer).values()}
    for n, p in params.items():
        if id(p) not in modules:
            raise EngramError(f"importance method 'wanda': tensor {n!r} is not the weight matrix of a linear "
                              "layer in the blocks (norms have no input columns); leave norms out or use snip")
    sq: dict[str, torch.Tensor] = {}
    handles = []
    last: list = [None, None]  # (input, its column sums of squares): q/k/v, gate/up read one tensor
    rows: list = [None]  # the batch's positions that predict a marked target, (b, seq_len) bool (None: all)

    def hook_for(name):
        def hook(module, args):
            x = args[0]  # (b, seq_len, d_in)
            if x is not last[0]:
                flat = (x.detach() if rows[0] is None else x.detach()[rows[0]]).reshape(-1, x.shape[-1]).float()
                last[:] = [x, (flat * flat).sum(0)]
            sq[name].add_(last[1])
        return hook

    try:
        for n, p in params.items():
            m = modules[id(p)]
            sq[n] = torch.zeros(p.shape[weight_in_axis(m)], dtype=torch.float32, device=p.device)
            handles.append(m.register_forward_pre_hook(hook_for(n)))
        with torch.no_grad():
            for ids, targets in batches:
                if targets is not None:  # position t - 1 predicts target t
                    rows[0] = torch.cat([targets[:, 1:], torch.zeros_like(targets[:, :1])], 1)
                lm.model(input_ids=ids, use_cache=False)
    finally:
        last.clear()
        for h in handles:
            h.remove()
    out = {}
    with torch.no_grad():
        for n, p in params.items():
            norm = sq[n].sqrt()
            norm = norm[None, :] if weight_in_axis(modules[id(p)]) == 1 else norm[:, None]
            out[n] = p.detach().float().abs() * norm
    return out


@contextlib.contextmanager
def _preserved(model: nn.Module, params: Iterable[nn.Parameter]) -> Iterator[None]:
    """Only ``params`` require grad, without a .grad, in eval mode; everything put back after."""
    params = list(params)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    grads = [(p, p.grad) for p in params]
    training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for p in params:
            p.grad = None
            p.requires_grad_(True)
        model.eval()
        yield
    finally:
        for p, g in grads:
            p.grad = g
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)


def _batches(chunks: torch.Tensor, batch_size: int, device, targets: torch.Tensor | None = None
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """(ids (b, seq_len), targets (b, seq_len) or None) per batch, on ``device``."""
    for start in range(0, len(chunks), batch_size):
        part = None if targets is None else targets[start: start + batch_size].to(device)
        yield chunks[start: start + batch_size].to(device), part


def _check_chunks(lm, chunks, batch_size) -> torch.Tensor:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise EngramError(f"--batch-size {batch_size!r}: must be a whole number >= 1")
    if not isinstance(chunks, torch.Tensor) or chunks.dim() != 2 or chunks.dtype != torch.long:
        raise EngramError("importance: chunks must be a LongTensor (n_chunks, seq_len) of token ids; "
                          "chunk the corpus first")
    if chunks.shape[0] == 0 or chunks.shape[1] < 2:
        raise EngramError(f"importance: chunks of shape {tuple(chunks.shape)}: need at least one chunk of "
                          ">= 2 tokens; use a longer corpus or a larger --seq-len")
    vocab = lm.adapter.vocab_size
    if int(chunks.min()) < 0 or int(chunks.max()) >= vocab:
        raise EngramError(f"importance: token ids outside [0, {vocab}) in chunks: they were made with another "
                          "tokenizer than this model's")
    return chunks


def _resolve(lm, tensors) -> dict[str, nn.Parameter]:
    if tensors is None:
        return region_tensors(lm)
    named = dict(lm.model.named_parameters())
    if isinstance(tensors, Mapping):
        for n, p in tensors.items():
            if named.get(n) is not p:
                raise EngramError(f"importance: tensor {n!r} is not that parameter of this model; "
                                  "take the tensors from region_tensors(lm)")
        out = dict(tensors)
    else:
        out = {}
        for n in tensors:
            if n not in named:
                raise EngramError(f"importance: no parameter {n!r} in this model; see region_tensors(lm)")
            out[n] = named[n]
    if not out:
        raise EngramError("importance: no tensors to score; pass None for the default region tensors")
    return out
