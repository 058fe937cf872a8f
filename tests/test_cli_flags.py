"""Every flag the ``engram`` verbs had before their options were generated from the configs.

The lists below were taken from ``engram <verb> --help`` before the change and are written out by
hand on purpose: a flag may be added, never dropped or renamed, and its default stays. For a
``--x/--no-x`` switch both names are listed; the value is whether that name's meaning holds when
neither is given (``--keep-wrong: False`` = by default wrong facts are not kept)."""

import pytest
import typer
from typer.testing import CliRunner

from engramlab.cli import app

REQUIRED = object()
SWITCH = object()  # marks a flag that takes no value (checked separately)

FLAGS = {
    "circuit": {
        "--model": REQUIRED, "-m": REQUIRED, "--facts": REQUIRED, "-f": REQUIRED, "--relation": None, "-r": None,
        "--limit": None, "-n": None, "--out": REQUIRED, "-o": REQUIRED, "--overwrite": False, "--method": 'eap-ig',
        "--steps": 5, "--ig-rule": 'right', "--metric": 'logit_diff', "--rule": 'topn', "--top-n": None,
        "--threshold": None, "--target-faithfulness": 0.9, "--max-fraction": 0.1, "--ablation": 'corrupted',
        "--score-ablation": None, "--split": 0.5, "--template": 0, "--batch-size": 8, "--mover-ratio": 10.0,
        "--relation-ratio": 0.1, "--keep-wrong": False, "--eapig-json": False, "--draw": True, "--no-draw": False,
        "--seed": 0, "--dtype": 'float32', "--device": 'cpu',
    },
    "dkn": {
        "--model": REQUIRED, "-m": REQUIRED, "--facts": REQUIRED, "-f": REQUIRED, "--relation": None, "-r": None,
        "--limit": None, "-n": None, "--out": REQUIRED, "-o": REQUIRED, "--overwrite": False, "--template": 0,
        "--known-rank": 1, "--threshold": 0.2, "--max-candidates": 24, "--steps": 20, "--baseline": 'zero',
        "--max-span": 3, "--fold-norm": True, "--no-fold-norm": False, "--norm-scale": 'none',
        "--methods": 'persistence,pairs,hierarchical,dbscan,kmeans', "--method": 'persistence', "--quantile": 0.9,
        "--clustering": 'quantile', "--distance-quantile": 0.2, "--edge-fraction": 0.5, "--birth-quantile": 0.5,
        "--linkage": 'average', "--dbscan-eps": None, "--dbscan-min-samples": 3, "--kmeans-k": None,
        "--outliers": 'singleton', "--t-low": 0.05, "--t-high": 0.3, "--max-subsets": 512, "--subset-samples": 64,
        "--positions": 'last', "--robustness": True, "--no-robustness": False, "--attenuate": 0.0,
        "--enhance": 2.0, "--batch-layers": None, "--evolvability": False, "--evolve-new": 8, "--evolve-steps": 30,
        "--evolve-lr": 0.001, "--evolve-arms": 'dkn,kn,random,kn_all,full', "--batch-size": 64, "--seed": 0,
        "--dtype": 'float32', "--device": 'cpu',
    },
    "inspect": {
        "--model": REQUIRED, "-m": REQUIRED, "--dtype": 'float32', "--device": 'cpu', "--seq-len": 8, "--layer": 0,
        "--json": False, "--out": None, "-o": None, "--overwrite": False,
    },
    "neurons": {
        "--model": REQUIRED, "-m": REQUIRED, "--facts": REQUIRED, "-f": REQUIRED, "--relation": None, "-r": None,
        "--limit": None, "-n": None, "--out": REQUIRED, "-o": REQUIRED, "--overwrite": False,
        "--paraphrases": False, "--no-paraphrases": True, "--steps": 20, "--ig-rule": 'right',
        "--baseline": 'zero', "--objective": 'prob', "--site": 'neurons', "--threshold": 0.2, "--refine": 'fact',
        "--p-start": None, "--min-prompts": None, "--max-neurons": 5, "--min-neurons": 2, "--relation-share": 0.1,
        "--max-rank": 100, "--batch-layers": None, "--random-repeats": 3, "--n-compare": 20, "--seed": 0,
        "--dtype": 'float32', "--device": 'cpu',
    },
    "recall": {
        "--model": REQUIRED, "-m": REQUIRED, "--facts": REQUIRED, "-f": REQUIRED, "--relation": None, "-r": None,
        "--limit": None, "-n": None, "--template": 0, "--batch-size": 16, "--out": REQUIRED, "-o": REQUIRED,
        "--overwrite": False, "--seed": 0, "--dtype": 'float32', "--device": 'cpu',
    },
    "sweep": {
        "--out": REQUIRED, "-o": REQUIRED, "--grid": REQUIRED, "-g": REQUIRED, "--preset": 'tiny', "-p": 'tiny',
        "--model-config": 'tiny', "--steps": 2000, "--batch-size": 32, "--lr": 0.001, "--eval-every": 50,
        "--eval-people": 100, "--eval-templates": 2, "--eval-context": 'sentence', "--checkpoints": 'none',
        "--plateau-exit": 0.1, "--schedule": 'constant', "--full-runs": False, "--device": 'cpu',
    },
    "train": {
        "--world": None, "-w": None, "--model-config": 'tiny', "--out": REQUIRED, "-o": REQUIRED, "--init": None,
        "--tokenizer": None, "--steps": 2000, "--batch-size": 32, "--lr": 0.001, "--min-lr-ratio": 0.1,
        "--schedule": 'cosine', "--warmup-steps": 0, "--weight-decay": 0.1, "--beta1": 0.9, "--beta2": 0.95,
        "--grad-clip": 1.0, "--sampler": 'uniform', "--eval-every": 50, "--eval-people": 100,
        "--eval-templates": 2, "--eval-context": 'sentence', "--eval-template-choice": 'random',
        "--checkpoints": 'dense:24', "--old-world": None, "--patch-attention-from": None, "--patch-window": None,
        "--plateau-exit": 0.1, "--plateau-reach": 0.05, "--stop-at-plateau-end": False, "--resume": False,
        "--overwrite": False, "--seed": 0, "--device": 'cpu',
    },
    "world": {
        "--preset": 'tiny', "-p": 'tiny', "--out": REQUIRED, "-o": REQUIRED, "--seed": 0, "--overwrite": False,
        "--n-people": None, "-N": None, "--n-heldout": None, "--disjoint-from": None, "--set": None,
    },
}

# The flags that take no value (switches); every other flag takes one.
SWITCHES = {"--overwrite", "--keep-wrong", "--eapig-json", "--draw", "--no-draw", "--fold-norm", "--no-fold-norm",
            "--robustness", "--no-robustness", "--evolvability", "--json", "--paraphrases", "--no-paraphrases",
            "--full-runs", "--stop-at-plateau-end", "--resume"}


def _command(verb):
    return typer.main.get_command(app).commands[verb]


def _param(verb, flag):
    """(parameter, whether ``flag`` is its --no-x / secondary name)."""
    for p in _command(verb).params:
        if flag in p.opts:
            return p, False
        if flag in getattr(p, "secondary_opts", []):
            return p, True
    return None, None


def _default(p, secondary: bool):
    if p.required:
        return REQUIRED
    d = p.default
    if secondary:  # --no-x of --x/--no-x: its meaning holds by default when --x is off by default
        return not d
    return d


def test_every_verb_is_still_there():
    assert set(FLAGS) <= set(typer.main.get_command(app).commands)


CASES = [(verb, flag, default) for verb, flags in FLAGS.items() for flag, default in flags.items()]


@pytest.mark.parametrize("verb, flag, default", CASES, ids=[f"{v}{f}" for v, f, _ in CASES])
def test_the_flag_exists_with_its_default(verb, flag, default):
    p, secondary = _param(verb, flag)
    assert p is not None, f"engram {verb} lost {flag}"
    got = _default(p, secondary)
    if default is REQUIRED:
        assert got is REQUIRED, f"{verb} {flag}: no longer required"
        return
    assert got is not REQUIRED, f"{verb} {flag}: now required"
    if isinstance(default, float):
        assert got == pytest.approx(default) and not isinstance(got, bool), f"{verb} {flag}: default {got!r}"
    else:
        assert got == default and type(got) is type(default), f"{verb} {flag}: default {got!r}, was {default!r}"
    is_switch = bool(getattr(p, "is_flag", False))
    assert is_switch == (flag in SWITCHES), f"{verb} {flag}: {'became' if is_switch else 'is no longer'} a switch"


@pytest.mark.parametrize("verb, flag, default", CASES, ids=[f"{v}{f}" for v, f, _ in CASES])
def test_the_flag_is_accepted_on_the_command_line(verb, flag, default):
    value = [] if flag in SWITCHES else [str(default) if default not in (None, REQUIRED) else "1"]
    r = CliRunner().invoke(app, [verb, flag, *value, "--help"])
    assert r.exit_code == 0, r.output
