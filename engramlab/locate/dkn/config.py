"""The settings of the degenerate-knowledge-neuron locator and of its evolvability experiment.

``DKNConfig`` (``find_degenerate_neurons``), ``ClusterConfig`` (``engramlab.locate.dkn.clustering``)
and ``EvolveConfig`` (``engramlab.locate.dkn.evolvability``), with the names they choose from. Only
the standard library and ``engramlab.config`` are imported, so the command line builds
``engram dkn``'s flags (and refuses a bad value) without loading torch or scipy; the modules that
do the work re-export every name here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engramlab.config import check, option, validate
from engramlab.locate.neurons.config import BASELINES  # DKN candidates are coarse knowledge neurons

# -- clustering (engramlab.locate.dkn.clustering) --------------------------------------------------
METHODS = ("persistence", "pairs", "hierarchical", "dbscan", "kmeans")
CLUSTERINGS = ("quantile", "reference")  # parameterisations of "persistence"
OUTLIER_POLICIES = ("singleton", "drop")
LINKAGES = ("single", "complete", "average", "weighted")


@dataclass
class ClusterConfig:
    """Parameters of every clustering method (each reads only its own)."""

    quantile: float = option(0.9, "Persistence/hierarchical: keep clusters more persistent than this quantile "
                             "of the merge distances.",
                             range=(0, 1))
    clustering: str = option("quantile", "Persistence parameterisation: quantile (engramlab: single linkage cut "
                             "at the quantile of the deaths) | reference (the published NTC; add outliers "
                             "drop for its clusters only).",
                             choices=CLUSTERINGS)
    distance_quantile: float = option(0.2, "Reference NTC: keep edges shorter than this quantile of the distances.",
                                      range=(0, 1))
    edge_fraction: float = option(0.5, "Reference NTC: sweep only this shortest fraction of the kept edges.",
                                  range=(0, 1))
    birth_quantile: float = option(0.5, "Reference NTC: a cluster's persistence must exceed this quantile of the births.",
                                   range=(0, 1))
    linkage: str = option("average", "Hierarchical clustering linkage.", choices=LINKAGES)
    dbscan_eps: float | None = option(None, "DBSCAN radius (None: the persistence threshold of the same graph).",
                                      range=(0, None), open_low=True)
    dbscan_min_samples: int = option(3, "DBSCAN core size.", range=(1, None))
    kmeans_k: int | None = option(None, "k-means k (None: as many clusters as persistence finds).",
                                  range=(1, None), integer=True)
    outliers: str = option("singleton", "Unconnected neurons and DBSCAN noise: singleton | drop (same for "
                          "every method).", choices=OUTLIER_POLICIES)
    seed: int = 0

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        validate(self)


# -- the locator (engramlab.locate.dkn.find) ------------------------------------------------------
POSITIONS = ("last", "all")
NORM_SCALES = ("none", "rms")


@dataclass
class DKNConfig:
    """Every parameter of ``find_dkns``; defaults are the ``engram dkn`` defaults."""

    # candidates (coarse knowledge neurons)
    threshold: float = option(0.2, "Candidates: attribution > threshold x max.", range=(0, 1))
    max_candidates: int = option(24, "At most this many candidates, the strongest (the graph and the subset "
                                 "search stay small).",
                                 range=(2, None))
    steps: int = option(20, "Integrated-gradients steps m.", range=(1, None))
    baseline: str = option("zero", "IG baseline.", choices=BASELINES)
    batch_layers: int | None = option(None, "Layers per IG batch (default: as many as fit in memory).", range=(1, None),
                                      integer=True)
    template: int = option(0, "Prompt template index.")
    known_rank: int = option(1, "Skip facts whose first target token ranks worse than this (1: only facts the "
                              "model gets right).", range=(1, None))
    # neuron graph
    max_span: int = option(3, "Layers two neurons may be apart and still share an edge.", range=(1, None))
    fold_norm: bool = option(True, "Fold the MLP norm's weight (and LayerNorm centring) into the read vectors.")
    norm_scale: str = option("none", "none | rms: scale every edge into layer j by 1/rms of what layer j's MLP norm "
                             "reads at the fact's last prompt token.",
                             choices=NORM_SCALES)
    # clustering
    methods: tuple[str, ...] = option(METHODS, "Clustering methods to run.", choices=METHODS, many=True)
    method: str = option("persistence", "The method whose numbers are also the top-level summary keys.",
                         choices=METHODS)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    # verification
    t_low: float = option(0.05, "A DKN: suppressing any proper subset drops P(target) by less than this "
                          "(relative)...",
                          range=(0, 1))
    t_high: float = option(0.3, "...and suppressing all of it drops P(target) by more than this.",
                           range=(0, 1))
    max_subsets: int = option(512, "Largest exhaustive subset search; beyond it the search samples and says so.",
                              range=(3, None))
    subset_samples: int = option(64, "Random proper subsets per sampled check.", range=(1, None))
    positions: str = option("last", "Where suppression acts: last (the last prompt token) | all.", choices=POSITIONS)
    batch_size: int = option(64, "Neuron sets scored per forward pass.", range=(1, None))
    # robustness analysis
    robustness: bool = option(True, "Score perturbed queries with each DKN attenuated and enhanced.")
    attenuate: float = option(0.0, "Robustness: scale of attenuated DKN neurons.", range=(0, None))
    enhance: float = option(2.0, "Robustness: scale of enhanced DKN neurons.", range=(0, None))
    seed: int = 0

    def __post_init__(self):
        self.methods = tuple(self.methods)
        self.validate()

    def validate(self) -> None:
        validate(self)
        self.cluster.validate()
        check(self, "method", self.method in self.methods, f"must be one of --methods ({', '.join(self.methods)})")
        check(self, "t_low", self.t_low < self.t_high, f"must be < t_high ({self.t_high})")


# -- evolvability (engramlab.locate.dkn.evolvability) ---------------------------------------------
ARMS = ("dkn", "kn", "random", "kn_all", "random_any", "full")


@dataclass
class EvolveConfig:
    n_new: int = option(8, "New facts to learn.", range=(1, None), flag="--evolve-new")
    steps: int = option(30, "Full-batch optimiser steps per arm.", range=(0, None), flag="--evolve-steps")
    lr: float = option(1e-3, "Adam learning rate, the same for every arm.", range=(0, None), open_low=True,
                       flag="--evolve-lr")
    arms: tuple[str, ...] = option(("dkn", "kn", "random", "kn_all", "full"), "Which parameters each arm trains: dkn | kn, random (matched to the DKN in size and layers) | "
                                   "kn_all (every candidate) | random_any (any layer) | full.",
                                   choices=ARMS, many=True, flag="--evolve-arms")
    seed: int = 0

    def __post_init__(self):
        self.arms = tuple(self.arms)
        self.validate()

    def validate(self) -> None:
        validate(self)
