"""Clustering the knowledge neurons of one fact by how strongly the weights connect them.

Every method takes the fact's *neuron graph* as a symmetric distance matrix ``dist`` of shape
(n, n): ``dist[a, b]`` is the distance of the direct connection between neurons a and b, ``inf``
where there is none, 0 on the diagonal (``engramlab.locate.dkn.neuron_distances`` builds it).
Every method returns clusters as lists of node indices, sorted.

==============  ==============================================================================
method          rule
==============  ==============================================================================
persistence     0-dimensional persistent homology of the graph filtered by distance, in one of
                two parameterisations (``clustering``):

                ``quantile`` (default, engramlab's rule): every neuron is born at 0; sweeping
                the edges in increasing distance, an edge that joins two components kills one
                of them (it dies at that distance). A cluster is kept when its persistence
                (death - birth) exceeds the ``quantile`` of all finite deaths, which is the same
                as joining every edge up to that threshold (single linkage cut there).

                ``reference`` (the published Neurological Topology Clustering of the DKN code):
                keep the edges shorter than the ``distance_quantile`` (0.2) of the finite
                distances and sweep only the shortest ``edge_fraction`` (50 %) of them; a neuron
                is born at the distance of its first merge (0 if it never merges); a component
                is kept when its persistence, the longest kept edge minus its birth, exceeds the
                ``birth_quantile`` (median) of every neuron's birth, and it has > 1 neuron.
                Neurons outside the kept clusters are noise (see outliers below).
pairs           the earlier AMIG rule: every neuron is its own cluster and a DKN has at most two
                of them (the search is told so by ``max_dkn_clusters``).
hierarchical    agglomerative clustering (``linkage``, default average) of the shortest-path
                distances, cut at the ``quantile`` of its merge heights. With ``linkage="single"``
                it equals ``persistence`` (single linkage is 0-dim persistence).
dbscan          DBSCAN on the shortest-path distances; ``eps`` defaults to the persistence
                threshold, so it differs from persistence only by asking for dense cores
                (``min_samples`` neurons within eps, the neuron itself counted).
kmeans          k-means on a classical-MDS embedding of the shortest-path distances; ``k``
                defaults to the number of persistence clusters, so only the boundaries differ.
==============  ==============================================================================

Outliers are handled the same way for every method: a neuron with no connection to any other
(an isolated node of the graph) never enters a clustering method, and DBSCAN's noise points and
the neurons the reference NTC keeps in no cluster join it; ``outliers="singleton"`` keeps each
such neuron as a cluster of its own, ``"drop"`` leaves it out of every cluster. The published NTC
keeps only its clusters, i.e. ``clustering="reference"`` with ``outliers="drop"``.

The baselines' derived defaults (DBSCAN's ``eps``, k-means' ``k``) always come from the
``quantile`` parameterisation, so ``clustering`` changes the persistence clusters only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage as scipy_linkage
from scipy.cluster.vq import kmeans2
from scipy.sparse.csgraph import connected_components, shortest_path
from scipy.spatial.distance import squareform

from engramlab.errors import EngramError
from engramlab.locate.dkn.config import (CLUSTERINGS, LINKAGES, METHODS, OUTLIER_POLICIES,  # noqa: F401 (re-exported)
                                         ClusterConfig)


# -- 0-dim persistent homology ----------------------------------------------------------------
def persistence_diagram(dist: np.ndarray) -> np.ndarray:
    """Birth/death pairs of the graph's 0-dim homology, shape (n, 3): (birth, death, node).

    Births are all 0 (every neuron exists from the start). Edges are swept in increasing distance
    with a union-find; when an edge joins two components the smaller one dies (ties: the one
    whose oldest node has the larger index), and ``node`` is that component's representative.
    Components that never die (one per connected component of the graph) have death ``inf``.
    """
    n = dist.shape[0]
    parent = list(range(n))
    size = [1] * n

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]  # path halving keeps the sweep near-linear
            a = parent[a]
        return a

    death = np.full(n, np.inf)
    rows, cols = np.triu_indices(n, k=1)
    weights = dist[rows, cols]
    finite = np.isfinite(weights)
    order = np.argsort(weights[finite], kind="stable")
    for a, b, w in zip(rows[finite][order], cols[finite][order], weights[finite][order]):
        ra, rb = root(int(a)), root(int(b))
        if ra == rb:
            continue  # a 1-cycle, not a 0-dim event
        survivor, dying = (ra, rb) if (size[ra], -ra) >= (size[rb], -rb) else (rb, ra)
        parent[dying] = survivor
        size[survivor] += size[dying]
        death[dying] = w
    return np.stack([np.zeros(n), death, np.arange(n, dtype=float)], axis=1)


def persistence_threshold(dist: np.ndarray, quantile: float) -> float:
    """The distance at which clusters stop merging: ``quantile`` of the finite deaths (0 if none)."""
    deaths = persistence_diagram(dist)[:, 1]
    deaths = deaths[np.isfinite(deaths)]
    return float(np.quantile(deaths, quantile)) if deaths.size else 0.0


def persistence_labels(dist: np.ndarray, quantile: float) -> np.ndarray:
    """Cluster labels (n,): the components joined by every edge no longer than the threshold.

    A component alive at the threshold is exactly a cluster whose persistence exceeds it, so this
    keeps the clusters more persistent than ``quantile`` of all deaths.
    """
    tau = persistence_threshold(dist, quantile)
    adjacency = np.isfinite(dist) & (dist <= tau)
    return connected_components(adjacency, directed=False)[1]


@dataclass
class ReferenceNTC:
    """The published NTC on one graph: the numbers behind ``reference_labels``."""

    labels: np.ndarray  # (n,) cluster label, -1 for neurons in no kept cluster
    births: np.ndarray  # (n,) distance of each neuron's first merge, 0 if it never merged
    distance_threshold: float  # edges strictly shorter than this are kept
    n_edges_kept: int  # edges below the threshold
    n_edges_swept: int  # int(edge_fraction * n_edges_kept) shortest of them, fed to the union-find
    last_edge: float  # the longest kept edge (swept or not): persistence = last_edge - birth
    birth_threshold: float  # ``birth_quantile`` of ``births`` over every neuron


def reference_ntc(dist: np.ndarray, distance_quantile: float = 0.2, edge_fraction: float = 0.5,
                  birth_quantile: float = 0.5) -> ReferenceNTC:
    """Neurological Topology Clustering as the published DKN code parameterises it.

    With the finite off-diagonal distances d (upper triangle of ``dist`` (n, n)):

        tau   = quantile(d, distance_quantile)            kept edges E = {e : d_e < tau}, ascending
        sweep the first floor(edge_fraction * |E|) edges of E with a union-find; when an edge
              joins two components, each endpoint that was still alone is born at d_e
        keep a component C with |C| > 1 and  max(E) - birth(C) > quantile(births, birth_quantile)

    ``births`` has one entry per neuron (0 for those that never merged, isolated ones included),
    as in the reference. birth(C) is the earliest birth among C's members (the elder rule of
    persistent homology): the reference reads the birth of whichever node its union-find left as
    root, which depends on its rank tie-breaks; on the cases checked by hand both agree.
    """
    n = dist.shape[0]
    rows, cols = np.triu_indices(n, k=1)
    weights = dist[rows, cols]
    finite = np.isfinite(weights)
    births = np.zeros(n)
    empty = ReferenceNTC(np.full(n, -1), births, 0.0, 0, 0, 0.0, 0.0)
    if not finite.any():
        return empty
    tau = float(np.quantile(weights[finite], distance_quantile))
    keep = finite & (weights < tau)  # strictly shorter, as the reference
    order = np.argsort(weights[keep], kind="stable")
    edges = list(zip(rows[keep][order], cols[keep][order], weights[keep][order]))
    if not edges:
        empty.distance_threshold = tau
        return empty
    swept = edges[:int(edge_fraction * len(edges))]

    parent = list(range(n))

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    size = [1] * n
    for a, b, w in swept:
        ra, rb = root(int(a)), root(int(b))
        if ra == rb:
            continue
        for node, r in ((int(a), ra), (int(b), rb)):
            if size[r] == 1:
                births[node] = w
        parent[rb] = ra
        size[ra] += size[rb]

    last = float(edges[-1][2])
    threshold = float(np.quantile(births, birth_quantile))
    labels = np.full(n, -1)
    members: dict[int, list[int]] = {}
    for node in range(n):
        members.setdefault(root(node), []).append(node)
    label = 0
    for group in members.values():
        if len(group) > 1 and last - births[group].min() > threshold:
            labels[group] = label
            label += 1
    return ReferenceNTC(labels, births, tau, len(edges), len(swept), last, threshold)


# -- baselines ----------------------------------------------------------------------------------
def path_distances(dist: np.ndarray) -> np.ndarray:
    """Shortest-path distances (n, n) through the graph; ``inf`` between disconnected parts."""
    graph = np.where(np.isfinite(dist), dist, 0.0)  # csgraph reads 0 as "no edge"
    # A true zero-length edge would vanish; nudge it to the smallest positive float instead.
    graph[np.isfinite(dist) & (dist == 0) & ~np.eye(len(dist), dtype=bool)] = np.finfo(float).tiny
    return shortest_path(graph, method="D", directed=False)


def _finite_stand_in(paths: np.ndarray) -> tuple[np.ndarray, float]:
    """Replace ``inf`` by twice the largest finite distance (methods that need a full metric)."""
    finite = paths[np.isfinite(paths)]
    far = 2.0 * float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    return np.where(np.isfinite(paths), paths, far), far


def hierarchical_labels(dist: np.ndarray, quantile: float, method: str = "average") -> np.ndarray:
    """Agglomerative clustering of the path distances, cut at ``quantile`` of the merge heights.

    Merges between disconnected parts happen at the stand-in distance and are excluded from the
    quantile, as infinite deaths are for persistence.
    """
    n = dist.shape[0]
    if n < 2:
        return np.zeros(n, dtype=int)
    full, far = _finite_stand_in(path_distances(dist))
    tree = scipy_linkage(squareform(full, checks=False), method=method)
    heights = tree[:, 2][tree[:, 2] < far]
    cut = float(np.quantile(heights, quantile)) if heights.size else 0.0
    return fcluster(tree, t=cut, criterion="distance") - 1


def dbscan_labels(dist: np.ndarray, eps: float, min_samples: int) -> np.ndarray:
    """DBSCAN on the path distances: labels (n,), -1 for noise.

    A core neuron has at least ``min_samples`` neurons (itself included) within ``eps``; cores
    within eps of each other share a cluster; a non-core neuron joins the cluster of its nearest
    core within eps, or is noise.
    """
    paths = path_distances(dist)
    near = paths <= eps
    core = near.sum(axis=1) >= min_samples
    labels = np.full(dist.shape[0], -1)
    if core.any():
        core_ids = np.flatnonzero(core)
        labels[core_ids] = connected_components(near[np.ix_(core_ids, core_ids)], directed=False)[1]
        for a in np.flatnonzero(~core):
            reach = core_ids[near[a, core_ids]]
            if reach.size:
                labels[a] = labels[reach[np.argmin(paths[a, reach])]]
    return labels


def mds_embedding(paths: np.ndarray, dims: int = 8) -> np.ndarray:
    """Classical MDS: points (n, <=dims) whose Euclidean distances approximate ``paths``."""
    full, _ = _finite_stand_in(paths)
    n = full.shape[0]
    centering = np.eye(n) - 1.0 / n
    gram = -0.5 * centering @ (full**2) @ centering
    values, vectors = np.linalg.eigh(gram)
    keep = np.argsort(values)[::-1][:dims]
    keep = keep[values[keep] > 1e-12 * max(values.max(), 1e-300)]
    if keep.size == 0:
        return np.zeros((n, 1))
    return vectors[:, keep] * np.sqrt(values[keep])


def kmeans_labels(dist: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k-means (k-means++ start) on the MDS embedding of the path distances."""
    n = dist.shape[0]
    k = max(1, min(k, n))
    if k == 1:
        return np.zeros(n, dtype=int)
    points = mds_embedding(path_distances(dist))
    _, labels = kmeans2(points, k, minit="++", rng=np.random.default_rng(seed))
    return labels


# -- one entry point with the shared outlier handling --------------------------------------------
def cluster_neurons(dist: np.ndarray, method: str, config: ClusterConfig | None = None) -> list[list[int]]:
    """Clusters (lists of node indices) of the neuron graph ``dist`` (n, n) by ``method``."""
    config = config or ClusterConfig()
    config.validate()
    if method not in METHODS:
        raise EngramError(f"clustering method {method!r}: choose from {', '.join(METHODS)}")
    dist = np.asarray(dist, dtype=float)
    off_diagonal = np.isfinite(dist) & ~np.eye(len(dist), dtype=bool)
    connected = np.flatnonzero(off_diagonal.any(axis=1))
    sub = dist[np.ix_(connected, connected)]

    if len(connected) == 0:
        labels = np.zeros(0, dtype=int)
    elif method == "persistence" and config.clustering == "reference":
        # The whole graph: the reference's median birth counts the isolated neurons' zeros too.
        labels = reference_ntc(dist, config.distance_quantile, config.edge_fraction,
                               config.birth_quantile).labels[connected]
    elif method == "persistence":
        labels = persistence_labels(sub, config.quantile)
    elif method == "pairs":
        labels = np.arange(len(connected))
    elif method == "hierarchical":
        labels = hierarchical_labels(sub, config.quantile, config.linkage)
    elif method == "dbscan":
        eps = config.dbscan_eps if config.dbscan_eps is not None else persistence_threshold(sub, config.quantile)
        labels = dbscan_labels(sub, eps, config.dbscan_min_samples)
    else:
        k = config.kmeans_k or len(set(persistence_labels(sub, config.quantile).tolist()))
        labels = kmeans_labels(sub, k, config.seed)

    clusters: dict[int, list[int]] = {}
    outliers = [int(a) for a in np.flatnonzero(~off_diagonal.any(axis=1))]
    for node, label in zip(connected.tolist(), labels.tolist()):
        if label < 0:
            outliers.append(node)
        else:
            clusters.setdefault(label, []).append(node)
    out = [sorted(c) for c in clusters.values()]
    if config.outliers == "singleton":
        out += [[a] for a in outliers]
    return sorted(out)
