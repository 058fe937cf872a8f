"""``TrainConfig``: every knob of a training run, and the names and mini-languages it checks.

Only the standard library and ``engramlab.config`` are imported at the top, so the command line
builds ``engram train``'s and ``engram sweep``'s flags (and refuses a bad value) without loading
torch; ``engramlab.train.trainer`` re-exports every name here. ``parse_patch_window`` is the
``--patch-window A:B`` syntax, used at construction and by ``engramlab.train.patching``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engramlab.config import check, option, validate
from engramlab.errors import EngramError

_FIELD = "TrainConfig.patch_window"
_FLAG = "--patch-window"


def parse_patch_window(value, steps: int) -> tuple[int, int] | None:
    """The patched updates [A, B) from "A:B" (A defaults to 0, B to ``steps``), [A, B] or (A, B).

    None or "" -> None (no window given). Raises ``EngramError`` naming the field unless 0 <= A < B.
    """
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            a, b = (int(x) if x else None for x in value.split(":"))
        except ValueError:
            raise EngramError(f"{_FIELD}={value!r} ({_FLAG}): use A:B (steps), e.g. 0:500") from None
        a, b = a or 0, steps if b is None else b
    elif isinstance(value, (list, tuple)) and len(value) == 2 and \
            all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        a, b = value  # a window already parsed (a manifest gives it back as a JSON list)
    else:
        raise EngramError(f"{_FIELD}={value!r} ({_FLAG}): use A:B (steps), e.g. 0:500")
    if not 0 <= a < b:
        raise EngramError(f"{_FIELD}={value!r} ({_FLAG}): need 0 <= A < B (steps), e.g. 0:500")
    return a, b


SCHEDULES = ("cosine", "constant", "linear")
# How evaluation sentences are presented (``engramlab.train.metrics``).
EVAL_CONTEXTS = ("sentence", "biography")
TEMPLATE_CHOICES = ("random", "first")
# Training precision (``engramlab.train.speed``): tf32 and bf16 need CUDA.
PRECISIONS = ("fp32", "tf32", "bf16")


@dataclass
class TrainConfig:
    """Every knob of a training run (all plain data: saved in manifest.json)."""

    steps: int = option(2000, "Optimiser steps.", range=(0, None))
    batch_size: int = option(32, "Biographies per step.", range=(1, None))
    lr: float = option(1e-3, "Peak learning rate.", range=(0, None), open_low=True)
    min_lr_ratio: float = option(0.1, "cosine/linear decay to lr x min_lr_ratio.", range=(0, 1))
    schedule: str = option("cosine", "Learning-rate schedule.", choices=SCHEDULES)
    warmup_steps: int = option(0, "Linear warm-up steps.", range=(0, None))
    weight_decay: float = option(0.1, "AdamW weight decay.", range=(0, None))
    beta1: float = option(0.9, "AdamW beta1.", range=(0, 1), open_high=True)
    beta2: float = option(0.95, "AdamW beta2.", range=(0, 1), open_high=True)
    grad_clip: float = option(1.0, "Clip the gradient norm to this (0: no clipping).", range=(0, None))
    dropout: float = option(0.0, "Dropout probability while training, at GPT-2's places (embeddings, attention "
                            "probabilities, attention and MLP outputs; GPT-2 used 0.1); off in evaluation.",
                            range=(0, 1), open_high=True)
    sampler: str = option("uniform", "uniform | powerlaw:alpha=A | celebrities:k=K,w=W | warmup:size=S,epochs=E | "
                          "sequential:groups=G,steps=T | replay:weight=W.")
    seed: int = 0
    eval_every: int = option(50, "Evaluate every this many steps.", range=(1, None))
    eval_people: int = option(100, "People per evaluation split (a fixed random subset).", range=(1, None))
    eval_templates: int = option(2, "Templates per (person, attribute) in evaluation.", range=(1, None))
    eval_context: str = option("sentence", "sentence: each evaluation sentence alone; biography: whole "
                               "evaluation-template biographies (the paper).",
                               choices=EVAL_CONTEXTS)
    eval_template_choice: str = option("random", "random: eval_templates drawn per person (seeded); first: lowest "
                                       "indices (before 2026-12).",
                                       choices=TEMPLATE_CHOICES)
    attention_stats: bool = True
    checkpoints: str = option("dense:24", "Checkpoint schedule: dense:N | log:N | every:K | none.")
    plateau_reach: float = option(0.05, "Plateau starts at the first eval within this fraction above the baseline.",
                                  range=(0, None))
    plateau_exit: float = option(0.10, "Plateau ends at the first eval this fraction below the baseline.",
                                 range=(0, 1), open_high=True)
    stop_at_plateau_end: bool = option(False, "End the run once the plateau is over (scaling sweeps); "
                                       "--full-runs: train to steps.", flag="--stop-at-plateau-end/--full-runs")
    device: str = "cpu"
    model_config: str = option("tiny", "tiny | tiny4 | small | paper (+ -gpt2), or a HF config.json / model dir for "
                               "fresh weights.")
    init: str | None = option(None, "Continue training this model SPEC (pretrained model or a run checkpoint) "
                              "instead of fresh weights.")
    tokenizer: str | None = option(None, "Train from scratch with this HF tokenizer (model SPEC) instead of "
                                   "the world's word tokenizer.")
    old_world: str | None = option(None, "Population trained before (retention metrics, replay); default: "
                                   "the init run's world.")
    patch_attention_from: str | None = option(None, "RUN:STEP whose attention patterns the twin uses "
                                              "(stop-gradient).")
    patch_window: tuple[int, int] | None = option(None, "A:B: patch updates [A, B) (default: the whole run).")
    freeze: str | None = option(None, "Hold a parameter region fixed while training: a masks file (.safetensors, as "
                                "engram regions writes them) or an engram regions run directory (its core "
                                "region).")
    freeze_mode: str = option("grad_mask", "How --freeze holds the region: grad_mask (frozen gradients zeroed, "
                              "and the entries written back after each step, so weight decay and moments cannot "
                              "move them) | restore (the reference's: written back after each step only).",
                              choices=("grad_mask", "restore"))
    # -- speed (engramlab.train.speed; docs/training.md): the defaults leave a CPU run as it was
    precision: str = option("fp32", "fp32 | tf32 (CUDA: fp32 weights, TF32 matmuls) | bf16 (CUDA: bf16 autocast "
                            "forward, fp32 weights and optimizer, TF32 elsewhere).", choices=PRECISIONS)
    compile: bool = option(False, "torch.compile the training forward and backward (evaluation runs the plain "
                           "model); the first steps pay the compilation.")
    grad_accum: int = option(1, "Gradient accumulation: split each batch into this many micro-batches (one "
                             "forward/backward each, one optimizer step); the update equals the whole batch's.",
                             range=(1, None))
    peak_tflops: float | None = option(None, "Peak dense TFLOP/s of the device for summary.json's mfu (default: "
                                       "the known-GPU table of engramlab.train.speed; none on a CPU).",
                                       range=(0, None), open_low=True)
    world: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        # Imported here: both parsers need numpy, which --help and a bad flag never should.
        from engramlab.data.samplers import make_sampler
        from engramlab.train.checkpoints import checkpoint_steps

        validate(self)
        check(self, "grad_accum", self.grad_accum <= self.batch_size,
              f"at most batch_size ({self.batch_size}) micro-batches; give a smaller --grad-accum")
        check(self, "precision", self.precision == "fp32" or self.device != "cpu",
              f"{self.precision} runs on CUDA only and device is cpu; use --precision fp32 or --device cuda")
        # torch.compile ignores forward hooks added after compiling, and patching adds its own every step.
        check(self, "compile", not (self.compile and self.patch_attention_from),
              "not with --patch-attention-from (a compiled model would not see its per-step hooks); drop one")
        # The mini-languages are parsed now, so a typo fails before anything is written.
        checkpoint_steps(self.checkpoints, max(self.steps, 1))
        if not self.sampler.startswith("replay"):
            make_sampler(self.sampler, None)  # the world's size bounds it when training starts
        # "A:B" (the command line), [A, B] (a manifest read back) or (A, B) -> (A, B).
        self.patch_window = parse_patch_window(self.patch_window, self.steps)
