"""Aggregation maths as small pure functions on adapter states (``{key: tensor}``) and weights.

A and B are averaged separately, entry by entry (FedAvg of the LoRA factors, as FL-TAC and FedIT do),
not as the product BA: the mean of products is not the product of means, and the factors are what
clients train and send.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import laplacian
from sklearn.cluster import KMeans, SpectralClustering
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score
from sklearn.neighbors import kneighbors_graph

from fltac.wire import State


def weighted_mean(states: list[State], weights: list[float]) -> State:
    """sum_i w_i s_i / sum_i w_i, key by key: one weighted sum over the stacked tensors (float32 BLAS, whose
    blocked accumulation keeps the relative error near 1e-7 even over thousands of adapters), cast back to
    each tensor's dtype."""
    if not states:
        raise ValueError("weighted_mean of no states")
    if len(weights) != len(states):
        raise ValueError(f"weighted_mean got {len(states)} states but {len(weights)} weights")
    w = torch.tensor(weights, dtype=torch.float64)
    if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
    w = w / w.sum()
    w = w.float()
    return {k: torch.tensordot(w, torch.stack([s[k].float() for s in states]), dims=1).to(states[0][k].dtype)
            for k in states[0]}


def flatten(state: State, keys: list[str], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tensors under ``keys`` (in that order) as one vector of ``dtype``."""
    return torch.cat([state[k].reshape(-1).to(dtype) for k in keys])


def random_projection(dim: int, out_dim: int, seed: int) -> torch.Tensor:
    """A seeded Gaussian matrix ``[dim, out_dim]`` scaled by ``1/sqrt(out_dim)``: ``x @ R`` keeps squared
    distances in expectation, and within a factor ``1 +- eps`` for n points once ``out_dim`` is of order
    ``log(n) / eps^2`` (Johnson-Lindenstrauss), whatever ``dim`` is."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(dim, out_dim, generator=g) / out_dim ** 0.5


def kmeans_labels(features: np.ndarray, k: int, seed: int, n_init: int) -> np.ndarray:
    """K-means cluster id of each row of ``features`` (k capped at the number of rows)."""
    k = min(k, len(features))
    if k == 1:
        return np.zeros(len(features), dtype=np.int64)
    return KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(features).astype(np.int64)


def spectral_labels(features: np.ndarray, k: int, seed: int, n_init: int, n_neighbors: int | None = None) -> np.ndarray:
    """Spectral clustering's cluster id of each row of ``features`` (k capped at the number of rows).

    The rows are joined to their ``n_neighbors`` nearest others (Euclidean; on unit vectors the order of
    cosine similarity) in a symmetric connectivity graph. Default: ``ceil(sqrt(n))``, but at most
    ``ceil(n / k) - 1`` (the other members of a cluster of mean size, so a row's neighbours can all lie
    in its own cluster) and at least 2; never above ``n - 1``. K-means
    (``n_init`` restarts, ``random_state = seed``) on the first k eigenvectors of its normalised Laplacian gives
    the labels (Ng, Jordan and Weiss 2001; von Luxburg 2007). Unlike K-means on the rows, it separates groups
    of unequal size that are close in a few directions but chained by their neighbours. With no more
    rows than clusters, or at most three rows, there is no graph worth cutting and :func:`kmeans_labels` answers.
    """
    n = len(features)
    if k == 1 or k >= n or n <= 3:  # no graph to cut: K-means (one cluster each when k >= n)
        return kmeans_labels(features, k, seed, n_init)
    neighbors = n_neighbors or max(2, min(math.ceil(math.sqrt(n)), math.ceil(n / k) - 1))
    neighbors = min(n - 1, neighbors)
    model = SpectralClustering(n_clusters=k, affinity="nearest_neighbors", n_neighbors=neighbors,
                               random_state=seed, n_init=n_init, assign_labels="kmeans")
    with warnings.catch_warnings():  # a graph in pieces is fine: its pieces are then clusters of their own
        warnings.filterwarnings("ignore", message="Graph is not fully connected")
        return model.fit_predict(features).astype(np.int64)


def match_to_previous(new_centers: np.ndarray, old_centers: np.ndarray) -> np.ndarray:
    """Slot id for each new cluster: a one-to-one matching minimising the total squared distance
    between new cluster centres and the previous round's slot adapters (Hungarian algorithm), so a
    task keeps its slot id across rounds. With more clusters than slots, the clusters left out of the
    matching (those whose best assignment costs most) get -1: no previous slot is theirs."""
    cost = ((new_centers[:, None, :] - old_centers[None, :, :]) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(cost)
    out = np.full(len(new_centers), -1, dtype=np.int64)
    out[rows] = cols
    return out


def auto_neighbors(n: int) -> int:
    """Neighbours per row of the graph an automatic K is read from: ``ceil(ln n) + 1`` (at least 2, at most
    ``n - 1``). A k-nearest-neighbour graph needs k of order log n to be connected within a cluster (von
    Luxburg 2007, section 8.1); unlike the spectral labeller's default it cannot depend on K, which is
    what is being chosen. Gives 5 for the 39 to 40 submissions of the text5 default (docs/fltac.md)."""
    return max(2, min(n - 1, math.ceil(math.log(n)) + 1))


def laplacian_spectrum(features: np.ndarray, n_neighbors: int) -> np.ndarray:
    """The eigenvalues, ascending, of the symmetric normalised Laplacian ``I - D^-1/2 W D^-1/2`` of the rows'
    k-nearest-neighbour graph (``W`` the symmetrised connectivity, 0.5 (A + A^T) with each row its own
    neighbour: the graph scikit-learn's :class:`SpectralClustering` builds). As many eigenvalues near 0 as
    the graph has nearly separate pieces."""
    graph = kneighbors_graph(features, n_neighbors, mode="connectivity", include_self=True)
    return np.linalg.eigvalsh(laplacian(0.5 * (graph + graph.T), normed=True).toarray())


def eigengap_k(features: np.ndarray, max_k: int, n_neighbors: int | None = None) -> tuple[int, list[float]]:
    """(K, the gaps ``lambda_(k+1) - lambda_k`` for k = 1 .. max_k): the number of clusters whose eigengap in
    :func:`laplacian_spectrum` is largest (von Luxburg 2007, section 8.3), K = 1 .. ``min(max_k, n - 1)``.
    ``n_neighbors`` (``server.spectral_neighbors``) is capped at ``n - 1``.

    K = 1 is decided like any other K: when the first gap is the largest, the graph is one piece no cut
    separates better than it holds together. ``n_neighbors``: null = :func:`auto_neighbors`."""
    n = len(features)
    max_k = min(max_k, n - 1)
    if max_k < 1:
        return 1, []
    spectrum = laplacian_spectrum(features, min(n - 1, n_neighbors) if n_neighbors else auto_neighbors(n))
    gaps = np.diff(spectrum[: max_k + 1])
    return int(np.argmax(gaps)) + 1, [float(g) for g in gaps]


def silhouette_k(features: np.ndarray, max_k: int, labels_for) -> tuple[int, list[float]]:
    """(K, the mean silhouettes for k = 2 .. max_k): the clustering ``labels_for(k)`` with the largest mean
    silhouette (cosine distance; Rousseeuw 1987), K = 2 .. ``min(max_k, n - 1)``. A silhouette needs two
    clusters, so K = 1 is never chosen; with fewer than 3 rows, K = 1."""
    n = len(features)
    scores = []
    for k in range(2, min(max_k, n - 1) + 1):
        labels = labels_for(k)
        scores.append(float(silhouette_score(features, labels, metric="cosine")) if len(np.unique(labels)) > 1
                      else -1.0)
    return (int(np.argmax(scores)) + 2 if scores else 1), scores


def clustering_scores(true: list[int], pred: list[int]) -> dict[str, float]:
    """Clustering accuracy under the best one-to-one matching of clusters to tasks (Hungarian), ARI and NMI."""
    true_a, pred_a = np.asarray(true), np.asarray(pred)
    tasks, clusters = np.unique(true_a), np.unique(pred_a)
    counts = np.array([[np.sum((true_a == t) & (pred_a == c)) for c in clusters] for t in tasks])
    rows, cols = linear_sum_assignment(-counts)
    return {
        "clustering_accuracy": float(counts[rows, cols].sum() / len(true_a)),
        "ari": float(adjusted_rand_score(true_a, pred_a)),
        "nmi": float(normalized_mutual_info_score(true_a, pred_a)),
    }
