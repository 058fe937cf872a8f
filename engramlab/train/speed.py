"""The device-specific pieces of training at GPU speed: precision, TF32, the fused optimizer,
``torch.compile``, pinned host batches, and model FLOPs utilisation (MFU).

Everything here is a no-op on the CPU with the default options (``precision=fp32``,
``compile=False``), so a CPU run stays bit-identical to one made before these options existed.

``precision`` (``TrainConfig.precision``):

- ``fp32``: fp32 weights and matmuls (no TF32, torch's default, also on CUDA).
- ``tf32``: fp32 weights; CUDA matmuls and convolutions in TF32 (10-bit mantissa inputs, fp32
  accumulation) on tensor cores.
- ``bf16``: fp32 master weights and optimizer state; the forward pass under
  ``torch.autocast(bfloat16)`` (matmuls in bf16, fp32 accumulation; softmax, norms and the loss
  stay fp32), TF32 for the fp32 matmuls that remain. No loss scaling: bf16 has fp32's exponent
  range, so gradients do not underflow the way fp16's do.

``tf32`` and ``bf16`` need a CUDA device (``check_precision``: one ``EngramError`` line otherwise):
the CPU has no TF32, and bf16 autocast on a CPU is slower than fp32 on most of them.

MFU (Chowdhery et al. 2022, PaLM, appendix B): achieved model FLOP/s over the device's peak,

    mfu = 6 * n_params * tokens / seconds / (peak_tflops * 1e12)

6 = 2 FLOPs (multiply + add) per parameter per token in the forward pass, and twice that in the
backward pass (gradients of activations and of weights). ``n_params`` counts every parameter
once (tied embeddings once); ``tokens`` are the real (unpadded) tokens trained on; attention's
``12 * layers * d_model * seq`` per token is left out (small at these sequence lengths), so
this slightly understates the true utilisation.
"""

from __future__ import annotations

import re
from contextlib import nullcontext

import torch

from engramlab.errors import EngramError

from engramlab.train.config import PRECISIONS  # noqa: F401 (re-exported)

# Peak dense TFLOP/s (no 2:4 sparsity) per CUDA device, (bf16, tf32, fp32), from NVIDIA's product
# datasheets (H100/H200, A100, L40S, L4, A10; the sheets print the tensor-core figures "with
# sparsity": the dense figure is half). The SXM figure is the board at its full power limit.
# Matched in order against ``torch.cuda.get_device_name()`` (case-insensitive): the first pattern
# found in the name wins, so the specific boards come before the family.
PEAK_TFLOPS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    (r"H[12]00 NVL", (835.0, 418.0, 60.0)),  # H100 NVL / H200 NVL (PCIe cards)
    (r"H100.*PCIe", (756.0, 378.0, 51.0)),
    (r"GH200|H200|H100", (989.0, 494.7, 67.0)),  # SXM (and Grace Hopper); H100 SXM reports "H100 80GB HBM3"
    (r"A100", (312.0, 156.0, 19.5)),  # SXM and PCIe alike
    (r"L40S", (362.0, 183.0, 91.6)),
    (r"\bL4\b", (121.0, 60.0, 30.3)),
    (r"\bA10\b", (125.0, 62.5, 31.2)),  # not A10G (AWS), whose clocks differ
)


def is_cuda(device: torch.device) -> bool:
    return torch.device(device).type == "cuda"


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse ``tf32`` / ``bf16`` off CUDA, and ``bf16`` on a GPU without bf16 (pre-Ampere)."""
    if precision == "fp32":
        return
    if not is_cuda(device):
        raise EngramError(f"TrainConfig.precision={precision!r} (--precision): {precision} runs on CUDA only and "
                          f"this run is on {torch.device(device).type}; use --precision fp32 or --device cuda")
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise EngramError(f"TrainConfig.precision='bf16' (--precision): {torch.cuda.get_device_name(device)} has no "
                          "bf16; use --precision tf32 or fp32")


def set_matmul_precision(precision: str, device: torch.device) -> None:
    """TF32 matmuls and convolutions on CUDA for ``tf32`` and ``bf16``, fp32 matmuls (torch's
    default) for ``fp32``; nothing on the CPU, where these flags do not apply. Process-wide torch
    flags: the last trainer made in a process decides them."""
    if not is_cuda(device):
        return
    tf32 = precision in ("tf32", "bf16")
    torch.backends.cuda.matmul.allow_tf32 = tf32  # False is torch's default: fp32 stays as it always was
    if tf32:
        torch.backends.cudnn.allow_tf32 = True  # (torch's default already; cuDNN runs no op of these models)


def autocast(precision: str, device: torch.device):
    """The context of the training forward pass: bf16 autocast with ``bf16`` (CUDA), else none."""
    if precision == "bf16":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


def adamw_kwargs(device: torch.device) -> dict:
    """``fused=True`` on CUDA (one kernel for every parameter's update instead of a few per
    tensor); nothing on the CPU, whose default (for-each) implementation stays as it was."""
    return {"fused": True} if is_cuda(device) else {}


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on ``device``; from pinned host memory the copies are asynchronous
    (``non_blocking``), so they overlap the work already queued on the GPU."""
    return {k: v.to(device, non_blocking=v.is_pinned()) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def pin(batch: dict, device: torch.device, keys) -> dict:
    """The batch with its ``keys`` entries in page-locked host memory when it is bound for CUDA
    (what makes a ``non_blocking`` copy asynchronous); unchanged otherwise."""
    if not is_cuda(device):
        return batch
    return {k: v.pin_memory() if k in keys and isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def peak_tflops(device: torch.device, precision: str, given: float | None = None) -> float | None:
    """Peak dense TFLOP/s for MFU: ``given`` (``--peak-tflops``) if set; else the table's entry
    for this CUDA device and precision (``fp32``: the plain fp32 peak, ``tf32``: TF32 tensor
    cores, ``bf16``: bf16 tensor cores); None for a CPU or a device the table does not know."""
    if given is not None:
        return float(given)
    if not is_cuda(device):
        return None
    return table_peak(torch.cuda.get_device_name(device), precision)


def table_peak(device_name: str, precision: str) -> float | None:
    """``PEAK_TFLOPS``'s figure for a CUDA device name, or None when no pattern matches."""
    column = {"bf16": 0, "tf32": 1, "fp32": 2}[precision]
    for pattern, peaks in PEAK_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return peaks[column]
    return None


def mfu(n_params: int, tokens: int, seconds: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation ``6 * n_params * tokens / seconds / (peak * 1e12)``; None without a
    peak or a positive time."""
    if peak is None or not seconds > 0:
        return None
    return 6.0 * n_params * tokens / seconds / (peak * 1e12)


def compiled(model: torch.nn.Module, enabled: bool):
    """``torch.compile(model)`` when ``enabled`` (it shares the model's parameters; the model
    itself stays uncompiled for evaluation, hooks and ``save_pretrained``), else the model."""
    return torch.compile(model) if enabled else model
