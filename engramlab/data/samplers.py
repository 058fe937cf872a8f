"""Samplers over individuals: which biographies fill each training batch.

A sampler decides which individuals' biographies fill each training batch. It is built from a
spec string and is a pure function of (seed, step): ``indices(step, batch_size)`` draws from a
generator seeded by ``(seed, step)`` alone, so a resumed run draws exactly the batches an
uninterrupted one would. Grammar (``SAMPLER_GRAMMAR``)::

    uniform                        every individual equally often
    powerlaw:alpha=0.7             p(rank r) ∝ (r+1)^-alpha over a fixed random order of people
    celebrities:k=10,w=8           k random individuals drawn w times more often than the others
    warmup:size=1000,epochs=2      exact shuffled passes over a random subset of `size` people for
                                   `epochs` epochs (epoch = size sequences), then uniform over all
    sequential:groups=4,steps=500  individuals split into `groups` contiguous index ranges, each
                                   trained (uniformly) for `steps` steps in turn; the last stays on
    replay:old=PATH_OR_N,weight=0.2  fine-tuning with replay, see ReplaySampler

    sampler = make_sampler("powerlaw:alpha=0.7", n_people=1000, seed=0)
    batch = sampler.indices(step=12, batch_size=32)      # np.ndarray (32,) int64
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from engramlab.errors import EngramError

SAMPLER_GRAMMAR = ("uniform | powerlaw:alpha=A | celebrities:k=K,w=W | warmup:size=S,epochs=E | "
                   "sequential:groups=G,steps=T | replay:old=PATH_OR_N,weight=W")

# Tags keep the generator streams of a sampler apart: the fixed layout (permutations) never
# shares a seed with any step's draws. Every seed is a 3-element list so no two can collide.
_LAYOUT, _DRAW, _EPOCH = 0, 1, 2


def _generator(seed: int, tag: int, k: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, tag, k])


def parse_spec(spec: str, grammar: str, kind: str) -> tuple[str, dict[str, str]]:
    """"name:k=v,k=v" -> ("name", {"k": "v"}); "name" -> ("name", {}).

    Shared with ``data.frequencies``, whose zipf spec has the same "name:k=v" form.
    """
    name, _, rest = str(spec).strip().partition(":")
    params: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise EngramError(f"{kind} spec {spec!r}: '{item}' is not key=value; "
                              f"grammar: {grammar}")
        params[key.strip()] = value.strip()
    return name.strip(), params


def spec_number(spec, params, key, grammar, kind, cast=float, low=None, high=None, default=None):
    """Read ``params[key]`` as ``cast`` within [low, high], or raise an EngramError."""
    if key not in params:
        if default is not None:
            return default
        raise EngramError(f"{kind} spec {spec!r} lacks '{key}='; grammar: {grammar}")
    try:
        value = cast(params.pop(key))
    except ValueError:
        raise EngramError(f"{kind} spec {spec!r}: '{key}' must be a {cast.__name__}; "
                          f"grammar: {grammar}") from None
    if (low is not None and value < low) or (high is not None and value > high):
        allowed = f"[{low}, {high}]" if low is not None and high is not None else \
            f">= {low}" if low is not None else f"<= {high}"
        raise EngramError(f"{kind} spec {spec!r}: '{key}'={value} is out of range ({allowed}); grammar: {grammar}")
    return value


class Sampler:
    """Base class: draws from ``self.p`` (probabilities over ``n_indices`` individuals)."""

    def __init__(self, spec: str, n_people: int, seed: int):
        self.spec, self.n_people, self.seed = spec, n_people, seed
        self.n_indices = n_people  # size of the index space; ReplaySampler enlarges it
        self.p = np.full(n_people, 1.0 / n_people)

    def _draw(self, p: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
        # Inverse-CDF draw: O(size log n) per call, unlike rng.choice(p=...) which re-sums p.
        cdf = np.cumsum(p)
        idx = np.searchsorted(cdf, rng.random(size) * cdf[-1], side="right")
        return np.minimum(idx, len(p) - 1).astype(np.int64)

    def indices(self, step: int, batch_size: int) -> np.ndarray:
        """Individuals of the batch at ``step``: np.ndarray (batch_size,) int64."""
        return self._draw(self.p, _generator(self.seed, _DRAW, step), batch_size)

    def probabilities(self, step: int | None = None, batch_size: int = 1) -> np.ndarray:
        """p(individual) of one draw at ``step`` (n_indices,); ``step=None`` means the
        long-run distribution, once any warm-up or schedule is over."""
        return self.p.copy()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, n_people={self.n_people}, seed={self.seed})"


class PowerLawSampler(Sampler):
    """p(order[r]) ∝ (r+1)^-alpha; ``order`` is a fixed random permutation of the individuals."""

    def __init__(self, spec, n_people, seed, alpha: float):
        super().__init__(spec, n_people, seed)
        self.alpha = alpha
        self.order = _generator(seed, _LAYOUT).permutation(n_people)
        weights = np.arange(1, n_people + 1, dtype=np.float64) ** -alpha
        self.p = np.empty(n_people)
        self.p[self.order] = weights / weights.sum()


class CelebritySampler(Sampler):
    """The ``k`` individuals in ``celebrities`` are drawn ``w`` times more often than others."""

    def __init__(self, spec, n_people, seed, k: int, w: float):
        super().__init__(spec, n_people, seed)
        self.celebrities = np.sort(_generator(seed, _LAYOUT).permutation(n_people)[:k])
        weights = np.ones(n_people)
        weights[self.celebrities] = w
        self.p = weights / weights.sum()


class WarmupSampler(Sampler):
    """``epochs`` exact passes over ``subset`` (reshuffled per epoch), then uniform over all.

    Warm-up is counted in sequences (sequence t of the run is position t = step*batch_size + j),
    so a batch that straddles the end of warm-up is part subset, part everyone.
    """

    def __init__(self, spec, n_people, seed, size: int, epochs: int):
        super().__init__(spec, n_people, seed)
        self.size, self.epochs = size, epochs
        self.subset = np.sort(_generator(seed, _LAYOUT).permutation(n_people)[:size])

    def warmup_steps(self, batch_size: int) -> int:
        """Number of steps whose batches hold only subset individuals."""
        return self.size * self.epochs // batch_size

    def indices(self, step, batch_size):
        out = super().indices(step, batch_size)  # uniform draws, used after warm-up
        pos = step * batch_size + np.arange(batch_size)
        warm = pos < self.size * self.epochs
        for epoch in np.unique(pos[warm] // self.size):
            order = self.subset[_generator(self.seed, _EPOCH, int(epoch)).permutation(self.size)]
            sel = warm & (pos // self.size == epoch)
            out[sel] = order[pos[sel] % self.size]
        return out

    def probabilities(self, step=None, batch_size=1):
        if step is None:
            return self.p.copy()
        pos = step * batch_size + np.arange(batch_size)
        warm_share = float(np.mean(pos < self.size * self.epochs))
        p = (1 - warm_share) * self.p
        p[self.subset] += warm_share / self.size
        return p


class SequentialSampler(Sampler):
    """Group g = the g-th of ``groups`` contiguous index ranges, trained during steps
    [g*steps, (g+1)*steps); after the last range the last group stays on."""

    def __init__(self, spec, n_people, seed, groups: int, steps: int):
        super().__init__(spec, n_people, seed)
        self.steps = steps
        self.groups = np.array_split(np.arange(n_people), groups)

    def group_at(self, step: int) -> int:
        return min(step // self.steps, len(self.groups) - 1)

    def indices(self, step, batch_size):
        members = self.groups[self.group_at(step)]
        rng = _generator(self.seed, _DRAW, step)
        return members[rng.integers(0, len(members), batch_size)].astype(np.int64)

    def probabilities(self, step=None, batch_size=1):
        members = self.groups[-1 if step is None else self.group_at(step)]
        p = np.zeros(self.n_people)
        p[members] = 1.0 / len(members)
        return p


class ReplaySampler(Sampler):
    """Fine-tuning on a new population while replaying an old one.

    The index space is (old, new): indices [0, n_old) are the old population, indices
    [n_old, n_old + n_people) are the new one (new person j is index n_old + j). Each draw is an
    old individual with probability ``weight`` (uniform among the old), else a new one (uniform
    among the new). ``old=N`` gives n_old directly, which suits a single world whose first N
    people were trained before and whose remaining n_people are new; ``old=PATH`` takes n_old
    from the world saved at PATH (its people.jsonl).
    """

    def __init__(self, spec, n_people, seed, n_old: int, weight: float):
        super().__init__(spec, n_people, seed)
        self.n_old, self.weight = n_old, weight
        self.n_indices = n_old + n_people
        self.p = np.concatenate([np.full(n_old, weight / max(n_old, 1)),
                                 np.full(n_people, (1 - weight) / n_people)])


def _count_world_people(spec: str, path: str) -> int:
    """How many people the world at ``path`` trains on, read from its world.json header (this
    module sits below ``world``, which loads the whole world and checks it)."""
    world_dir = Path(path)
    if world_dir.is_file():
        world_dir = world_dir.parent
    header = world_dir / "world.json"
    if not header.exists():
        raise EngramError(f"sampler spec {spec!r}: no world at {path} (world.json missing); "
                          f"give old= a world directory from `engram world` or a count")
    try:
        n = json.loads(header.read_text(encoding="utf-8"))["config"]["n_people"]
    except (OSError, ValueError, KeyError, TypeError):
        n = None
    if not isinstance(n, int) or n < 1:
        raise EngramError(f"sampler spec {spec!r}: {header} does not say how many people the world has; "
                          f"regenerate it with `engram world`, or give old= a count")
    return n


def make_sampler(spec: str, n_people: int | None, seed: int = 0) -> Sampler | None:
    """Parse ``spec`` (see SAMPLER_GRAMMAR) into a sampler over ``n_people`` individuals.
    ``n_people=None`` only checks the spec (grammar, types, bounds that do not depend on the
    population) and returns None: a config is checked before its world is known."""
    if not isinstance(seed, int) or seed < 0:
        raise EngramError(f"sampler seed must be a non-negative integer, got {seed!r}")
    if n_people is not None and n_people < 1:
        raise EngramError(f"sampler spec {spec!r}: need at least one individual, got {n_people}")
    name, params = parse_spec(spec, SAMPLER_GRAMMAR, "sampler")
    g = SAMPLER_GRAMMAR

    def num(key, cast=float, low=None, high=None):
        return spec_number(spec, params, key, g, "sampler", cast, low, high)

    if name == "uniform":
        build = lambda: Sampler(spec, n_people, seed)  # noqa: E731
    elif name == "powerlaw":
        alpha = num("alpha", float, 0.0)
        build = lambda: PowerLawSampler(spec, n_people, seed, alpha=alpha)  # noqa: E731
    elif name == "celebrities":
        k, w = num("k", int, 1, n_people), num("w", float, 0.0)
        build = lambda: CelebritySampler(spec, n_people, seed, k=k, w=w)  # noqa: E731
    elif name == "warmup":
        size, epochs = num("size", int, 1, n_people), num("epochs", int, 0)
        build = lambda: WarmupSampler(spec, n_people, seed, size=size, epochs=epochs)  # noqa: E731
    elif name == "sequential":
        groups, steps = num("groups", int, 1, n_people), num("steps", int, 1)
        build = lambda: SequentialSampler(spec, n_people, seed, groups=groups, steps=steps)  # noqa: E731
    elif name == "replay":
        old = params.pop("old", None)
        if old is None:
            raise EngramError(f"sampler spec {spec!r} lacks 'old='; grammar: {g}")
        n_old = int(old) if old.isdigit() else _count_world_people(spec, old)
        weight = num("weight", float, 0.0, 1.0 if n_old else 0.0)
        build = lambda: ReplaySampler(spec, n_people, seed, n_old=n_old, weight=weight)  # noqa: E731
    else:
        raise EngramError(f"unknown sampler spec {spec!r}; grammar: {g}")
    if params:
        raise EngramError(f"sampler spec {spec!r}: unknown key(s) {sorted(params)}; grammar: {g}")
    return None if n_people is None else build()

