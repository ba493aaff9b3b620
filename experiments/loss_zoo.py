"""Loss zoo: robustness, imbalance and embedding losses of jaxmtl.losses on scikit-learn digits.

Three small studies, each a claim from a paper checked at CPU scale (one hand-written MLP,
several seeds trained together under ``vmap``; tables report mean +- std over seeds):

(a) label noise. Symmetric label noise of 0/20/40 % on the training labels; test accuracy of
    cross-entropy, generalized cross-entropy and MAE (the comp-sum family of Mao, Mohri &
    Zhong, "Cross-Entropy Loss Functions: Theoretical Analysis and Applications", ICML 2023)
    and the Z-loss (de Brebisson & Vincent 2016). Claim: losses with tau > 1 (GCE, MAE) are
    more robust to noise than CE; MAE trains slowly.
(b) class imbalance. One digit against the rest with the positives subsampled in training;
    F1 at threshold 0.5 of binary cross-entropy, focal loss (Lin et al. 2017), BCE weighted by
    the DatasetEquity "generalized focal loss" weight of an appearance likelihood
    (Shrivastava et al. 2023) and AnyLoss-F1 (Han, Moniz & Chawla, "AnyLoss", KDD 2024).
    Claims: optimizing F1 directly beats BCE on F1; the GFL weight helps the rare examples.
(c) embeddings. Trained on digits 0-5, evaluated by recall@1 on unseen digits 6-9 (zero-shot
    retrieval, as in the MS-loss paper) and on the seen ones: Multi-Similarity loss (Wang et
    al., CVPR 2019), self-supervised NT-Xent at two temperatures (Wang & Liu, CVPR 2021, with
    the uniformity and tolerance measurements) and ProtoNet episodes with and without the
    Proto-Triplet loss (Mendez-Ruiz et al. 2023). Claims: a smaller temperature gives a more
    uniform but less tolerant embedding; Proto-Triplet helps ProtoNet.

Run: ``python -m experiments.loss_zoo`` (default, a few minutes on 2 CPU cores) or
``python -m experiments.loss_zoo --smoke`` (seconds). Writes under ``runs/loss_zoo/``:
config.json, metrics.jsonl, results.json, summary.md, loss_zoo.png. A finished part is
stored in the run directory and skipped when the same configuration is run again there
(parts are short, so they restart rather than checkpoint mid-way).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxmtl import data as jdata
from jaxmtl import experiment as jexp
from jaxmtl.analysis.embedding import recall_at_k, tolerance, uniformity
from jaxmtl.analysis.equity import appearance_likelihood
from jaxmtl.losses import anyloss as anyloss_lib
from jaxmtl.losses import classification, focal
from jaxmtl.losses.metric import (
    class_prototypes,
    icnn_score,
    l2_normalize,
    multi_similarity_loss,
    nt_xent,
    proto_triplet_loss,
    protonet_logits,
)

NAME = "loss_zoo"
# XLA options for smoke runs, whose time is almost all compilation: a lower backend
# optimization level halves compile time on CPU at the cost of slower (tiny) runs.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@dataclasses.dataclass(frozen=True)
class Config:
    """Loss-zoo settings; the defaults run in a few minutes on 2 CPU cores."""

    smoke: bool = False  # a few training steps, for tests (seconds)
    seeds: tuple[int, ...] = (0, 1, 2)  # one model per seed and method, trained together
    out_dir: str = "runs/loss_zoo"  # where the run directories go (smoke runs: out_dir/smoke)
    resume: str | None = None  # "latest" or a run directory: finished parts are not redone
    hidden: int = 128  # width of the MLP's two hidden layers
    learning_rate: float = 1e-3  # Adam's learning rate, every part
    batch_size: int = 128  # examples per step (parts (a), (b) and NT-Xent)
    log_every: int = 250  # steps per compiled chunk; the chunk's mean loss is logged
    noise_rates: tuple[float, ...] = (0.0, 0.2, 0.4)  # (a) symmetric label-noise rates
    noise_steps: int = 2000  # (a) training steps per model
    gce_q: float = 0.7  # (a) GCE q (comp-sum tau = 1 + q); Zhang & Sabuncu's default
    positive_digit: int = 8  # (b) the positive class of the imbalanced binary task
    positive_keep: float = 0.3  # (b) fraction of training positives kept (about 1:30)
    binary_steps: int = 1000  # (b) training steps per model
    anyloss_scale: float = 73.0  # (b) AnyLoss amplifier L
    focal_gamma: float = 2.0  # (b) focal loss gamma
    dequity_eta: float = 0.3  # (b) DatasetEquity eta; (0.3, 2) is a documented setting
    dequity_gamma: float = 2.0  # (b) DatasetEquity gamma (the README's 5 is flat for p > 0.3)
    dequity_clusters: int = 20  # (b) k-means clusters for the appearance likelihood
    seen_classes: int = 6  # (c) train on digits < seen_classes, unseen ones for zero-shot recall
    embed_dim: int = 32  # (c) embedding dimension (the MLP's output)
    embed_steps: int = 1000  # (c) training steps per model
    temperatures: tuple[float, ...] = (0.1, 1.0)  # (c) NT-Xent temperatures compared
    ms_per_class: int = 16  # (c) P x K batches: all seen classes x this many
    episode_way: int = 5  # (c) ProtoNet episodes: classes per episode
    episode_shot: int = 5  # (c) ProtoNet episodes: support examples per class
    episode_query: int = 10  # (c) ProtoNet episodes: query examples per class

    def effective(self) -> Config:
        """The configuration actually run (the smoke option shrinks the training)."""
        if not self.smoke:
            return self
        return dataclasses.replace(
            self,
            noise_steps=100,
            binary_steps=100,
            embed_steps=50,
            log_every=50,
            hidden=64,
            batch_size=64,
        )


# --------------------------------------------------------------------------- model


def apply_mlp(params: list[dict[str, jax.Array]], x: jax.Array) -> jax.Array:
    """ReLU MLP; the last layer is linear."""
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def init_many(
    seeds: tuple[int, ...], sizes: tuple[int, ...], repeat: int = 1, *, zero_last: bool = False
) -> Any:
    """Stacked He-initialized MLP parameters, one model per seed (the seeds repeated ``repeat``
    times, seeds inner). Drawn with NumPy: no compilation, identical for a seed everywhere.

    ``zero_last`` zeroes the output layer (a binary classifier starts at p = 0.5, where
    AnyLoss's amplifier is not saturated; from random logits some seeds start with vanishing
    gradients and never learn)."""
    models = []
    for seed in list(seeds) * repeat:
        rng = np.random.default_rng(seed)
        models.append(
            [
                {
                    "w": (rng.standard_normal((m, n)) * np.sqrt(2.0 / m)).astype(np.float32),
                    "b": np.zeros((n,), np.float32),
                }
                for m, n in itertools.pairwise(sizes)
            ]
        )
        if zero_last:
            models[-1][-1]["w"] = np.zeros_like(models[-1][-1]["w"])
    return jax.tree.map(lambda *leaves: jnp.asarray(np.stack(leaves)), *models)


@jax.jit
def _predict(params: Any, x: jax.Array) -> jax.Array:
    return apply_mlp(params, x)


def predict_many(params: Any, x: np.ndarray) -> np.ndarray:
    """Outputs of each stacked model as NumPy, (M, N, out); one compiled model reused M times
    (slicing and stacking in NumPy: no per-shape compilations of eager ops)."""
    host = jax.tree.map(np.asarray, params)
    count = jax.tree.leaves(host)[0].shape[0]
    return np.stack(
        [np.asarray(_predict(jax.tree.map(lambda a: a[i], host), x)) for i in range(count)]
    )


# --------------------------------------------------------------------------- training engine


def epoch_batches(num: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
    """(steps, batch) indices: a fresh seeded permutation per epoch, remainder dropped."""
    per_epoch = num // batch_size
    rng = np.random.default_rng(seed)
    epochs = -(-steps // per_epoch)
    rows = [rng.permutation(num)[: per_epoch * batch_size].reshape(per_epoch, batch_size)]
    rows += [
        rng.permutation(num)[: per_epoch * batch_size].reshape(per_epoch, batch_size)
        for _ in range(epochs - 1)
    ]
    return np.concatenate(rows)[:steps].astype(np.int32)


def train(
    loss_fn: Callable[..., jax.Array],
    params: Any,
    data: dict[str, jax.Array],
    data_axes: dict[str, int | None],
    schedule: np.ndarray,
    *,
    learning_rate: float,
    log_every: int,
    log: Callable[[dict], None],
    tag: str,
    fast_compile: bool = False,
) -> Any:
    """Adam on M models at once (leading axis M of ``params`` and ``schedule``).

    ``loss_fn(params, data, batch_index, key) -> scalar`` for one model; ``data`` leaves have
    a model axis where ``data_axes`` says 0 (e.g. per-seed noisy labels) and are shared where
    it says None. ``schedule`` is (M, steps, ...) of batch indices. The steps run in jitted
    ``lax.scan`` chunks of ``log_every`` steps; the mean loss of each chunk is logged.
    ``fast_compile`` lowers XLA's optimization level (smoke runs: compile time dominates).
    """
    optimizer = optax.adam(learning_rate)
    models, steps = schedule.shape[:2]

    def one_step(p, s, d, index, model, step):
        # Keys only drive data augmentation; "unsafe_rbg" compiles much faster than threefry.
        key = jax.random.fold_in(jax.random.key(model, impl="unsafe_rbg"), step)
        loss, grads = jax.value_and_grad(loss_fn)(p, d, index, key)
        updates, s = optimizer.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    many = jax.vmap(one_step, in_axes=(0, 0, data_axes, 0, 0, None))

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE if fast_compile else None)
    def chunk(p, s, d, indices, step_numbers):
        def body(carry, inputs):
            p, s = carry
            index, step = inputs
            p, s, loss = many(p, s, d, index, jnp.arange(models, dtype=jnp.uint32), step)
            return (p, s), loss

        xs = (jnp.swapaxes(indices, 0, 1), step_numbers)
        (p, s), losses = jax.lax.scan(body, (p, s), xs)
        return p, s, jnp.mean(losses, axis=0)

    # optax's Adam bias correction mixes float and int32 ("decay ** count"), which strict
    # dtype promotion (as in the test session) rejects; our own code is strict-clean.
    with jax.numpy_dtype_promotion("standard"):
        opt_state = jax.jit(jax.vmap(optimizer.init))(params)
        starts = range(0, steps, log_every)
        for start in tqdm(starts, desc=f"{NAME} {tag}", disable=fast_compile, leave=False):
            stop = min(start + log_every, steps)
            params, opt_state, mean_loss = chunk(
                params,
                opt_state,
                data,
                schedule[:, start:stop],
                np.arange(start, stop, dtype=np.uint32),
            )
            log({"part": tag, "step": stop, "loss": np.round(np.asarray(mean_loss), 5).tolist()})
    return params


# --------------------------------------------------------------------------- data


def load_digits_arrays() -> dict[str, np.ndarray]:
    """Digits from jaxmtl.data as float32 (N, 64) in [0, 1] and int32 labels."""
    ds = jdata.digits()
    out = {}
    for split in ("train", "test"):
        part = getattr(ds, split)
        x = np.asarray(part["x"], np.float32).reshape(len(part["x"]), -1)
        out[f"x_{split}"] = x
        out[f"y_{split}"] = np.asarray(part["y"], np.int32).reshape(-1)
    scale = max(float(out["x_train"].max()), 1.0)  # raw digits are 0..16
    lo = min(float(out["x_train"].min()), 0.0)
    for split in ("train", "test"):
        out[f"x_{split}"] = ((out[f"x_{split}"] - lo) / (scale - lo)).astype(np.float32)
    return out


def symmetric_noise(labels: np.ndarray, rate: float, num_classes: int, seed: int) -> np.ndarray:
    """Each label replaced with probability ``rate`` by a uniformly drawn *other* class."""
    rng = np.random.default_rng([seed, round(rate * 1000)])
    flip = rng.random(labels.shape) < rate
    other = (labels + rng.integers(1, num_classes, labels.shape)) % num_classes
    return np.where(flip, other, labels).astype(np.int32)


# --------------------------------------------------------------------------- (a) label noise


def noise_losses(config: Config) -> dict[str, Callable[[jax.Array, jax.Array], jax.Array]]:
    """Per-example classification losses compared in part (a)."""
    return {
        "CE": lambda logits, y: classification.comp_sum_loss(logits, y, tau=1.0),
        f"GCE (q={config.gce_q})": lambda logits, y: classification.comp_sum_loss(
            logits, y, tau=1.0 + config.gce_q
        ),
        "MAE": lambda logits, y: classification.comp_sum_loss(logits, y, tau=2.0),
        "Z-loss": lambda logits, y: classification.z_loss(logits, y),
    }


def switch_loss(losses: list[Callable]) -> Callable:
    """One model loss choosing among ``losses(outputs, labels, likelihood)`` (each batch
    quantity indexed like the examples) by ``data["loss_id"]``, so that models trained
    with different losses share one compiled, vmapped training loop (under ``vmap`` the
    switch evaluates every branch and selects; the losses are cheap next to the MLP)."""

    def loss_fn(p, d, index, key):
        del key
        out = apply_mlp(p, d["x"][index])
        return jax.lax.switch(d["loss_id"], losses, out, d["y"][index], d["likelihood"][index])

    return loss_fn


def run_noise(config: Config, arrays: dict[str, np.ndarray], log: Callable) -> dict:
    seeds, rates = config.seeds, config.noise_rates
    losses = noise_losses(config)
    num_classes = int(arrays["y_train"].max()) + 1
    x_train, y_train = arrays["x_train"], arrays["y_train"]
    # Models ordered (loss, rate, seed), seed fastest.
    noisy = np.stack([symmetric_noise(y_train, r, num_classes, s) for r in rates for s in seeds])
    per_seed = [
        epoch_batches(len(y_train), config.noise_steps, config.batch_size, s) for s in seeds
    ]
    repeat = len(losses) * len(rates)
    data = {
        "x": jnp.asarray(x_train),
        "y": jnp.asarray(np.concatenate([noisy] * len(losses))),
        "loss_id": jnp.asarray(np.repeat(np.arange(len(losses)), len(rates) * len(seeds))),
        "likelihood": jnp.ones(len(y_train), jnp.float32),  # unused in part (a)
    }
    per_example = [lambda z, y, lik, f=f: jnp.mean(f(z, y)) for f in losses.values()]
    params = train(
        switch_loss(per_example),
        # Not zero_last: equal logits are the Z-loss's singular point (sigma = 0, no gradient).
        init_many(seeds, (x_train.shape[1], config.hidden, config.hidden, num_classes), repeat),
        data,
        {"x": None, "y": 0, "loss_id": 0, "likelihood": None},
        np.stack(per_seed * repeat),
        learning_rate=config.learning_rate,
        log_every=config.log_every,
        log=log,
        fast_compile=config.smoke,
        tag="noise/" + ", ".join(losses),
    )
    logits = predict_many(params, arrays["x_test"])
    correct = np.argmax(logits, -1) == arrays["y_test"][None]
    accuracy = correct.mean(axis=1).reshape(len(losses), len(rates), len(seeds))
    return {
        name: {f"{r:g}": accuracy[i, j].tolist() for j, r in enumerate(rates)}
        for i, name in enumerate(losses)
    }


# --------------------------------------------------------------------------- (b) imbalance


def binary_losses(config: Config) -> dict[str, Callable[..., jax.Array]]:
    """Batch losses ``(logits (B,), labels (B,), likelihood (B,)) -> scalar`` of part (b)."""
    eta, gamma = config.dequity_eta, config.dequity_gamma

    def bce(z, y):
        return optax.losses.sigmoid_binary_cross_entropy(z, y)

    return {
        "CE (BCE)": lambda z, y, lik: jnp.mean(bce(z, y)),
        f"focal (gamma={config.focal_gamma:g})": lambda z, y, lik: jnp.mean(
            focal.sigmoid_focal_loss(z, y, gamma=config.focal_gamma)
        ),
        f"DatasetEquity GFL (BCE, eta={eta:g}, gamma={gamma:g})": lambda z, y, lik: jnp.mean(
            focal.dequity_weighted_loss(bce(z, y), lik, eta=eta, gamma=gamma)
        ),
        "AnyLoss-F1": lambda z, y, lik: anyloss_lib.anyloss_from_logits(
            z, y, metric="f1", scale=config.anyloss_scale
        ),
    }


def pixel_likelihood(x: np.ndarray, config: Config) -> np.ndarray:
    """DatasetEquity appearance likelihood of each training example (labels unused), with
    jaxmtl.analysis.equity's substitutes: PCA(16) of the pixels and k-means (the paper uses
    ResNet features, t-SNE and DBSCAN)."""
    fn = functools.partial(
        appearance_likelihood,
        num_clusters=config.dequity_clusters,
        key=jax.random.key(0),
        num_components=16,
    )
    compiled = jax.jit(fn, compiler_options=FAST_COMPILE if config.smoke else None)
    return np.asarray(compiled(jnp.asarray(x)), np.float32)


def binary_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """F1, precision, recall and balanced accuracy of hard 0/1 predictions."""
    tp = float(np.sum(pred & truth))
    fp = float(np.sum(pred & ~truth))
    fn = float(np.sum(~pred & truth))
    tn = float(np.sum(~pred & ~truth))
    precision = tp / max(tp + fp, 1.0)
    recall = tp / max(tp + fn, 1.0)
    f1 = 2 * tp / max(2 * tp + fp + fn, 1.0)
    balanced = 0.5 * (recall + tn / max(tn + fp, 1.0))
    return {"f1": f1, "precision": precision, "recall": recall, "balanced_accuracy": balanced}


def run_imbalanced(config: Config, arrays: dict[str, np.ndarray], log: Callable) -> dict:
    seeds = config.seeds
    losses = binary_losses(config)
    positive = arrays["y_train"] == config.positive_digit
    keep = np.random.default_rng(1234).random(positive.shape) < config.positive_keep
    chosen = ~positive | keep
    x_train = arrays["x_train"][chosen]
    y_train = positive[chosen].astype(np.float32)
    truth = arrays["y_test"] == config.positive_digit
    likelihood = pixel_likelihood(x_train, config)
    per_seed = [
        epoch_batches(len(y_train), config.binary_steps, config.batch_size, s) for s in seeds
    ]
    data = {
        "x": jnp.asarray(x_train),
        "y": jnp.asarray(y_train),
        "loss_id": jnp.asarray(np.repeat(np.arange(len(losses)), len(seeds))),
        "likelihood": jnp.asarray(likelihood),
    }
    single_logit = [lambda z, y, lik, f=f: f(z[:, 0], y, lik) for f in losses.values()]
    params = train(
        switch_loss(single_logit),
        init_many(
            seeds, (x_train.shape[1], config.hidden, config.hidden, 1), len(losses), zero_last=True
        ),
        data,
        {"x": None, "y": None, "loss_id": 0, "likelihood": None},
        np.stack(per_seed * len(losses)),
        learning_rate=config.learning_rate,
        log_every=config.log_every,
        log=log,
        fast_compile=config.smoke,
        tag="imbalanced/" + ", ".join(losses),
    )
    pred = predict_many(params, arrays["x_test"])[..., 0] > 0
    results: dict[str, Any] = {
        "train_positive_fraction": float(y_train.mean()),
        "test_positive_fraction": float(truth.mean()),
        "positive_mean_likelihood": float(likelihood[y_train > 0].mean()),
        "negative_mean_likelihood": float(likelihood[y_train == 0].mean()),
    }
    for i, name in enumerate(losses):
        rows = [binary_metrics(pred[i * len(seeds) + j], truth) for j in range(len(seeds))]
        results[name] = {k: [m[k] for m in rows] for k in rows[0]}
    return results


# --------------------------------------------------------------------------- (c) embeddings


def pk_batches(labels: np.ndarray, classes: int, per_class: int, steps: int, seed: int):
    """(steps, classes * per_class) indices: every class, ``per_class`` samples each."""
    rng = np.random.default_rng(seed)
    pools = [np.flatnonzero(labels == c) for c in range(classes)]
    out = np.empty((steps, classes * per_class), np.int32)
    for t in range(steps):
        out[t] = np.concatenate([rng.choice(pool, per_class, replace=False) for pool in pools])
    return out


def episodes(labels: np.ndarray, classes: int, way: int, per_class: int, steps: int, seed: int):
    """(steps, way, per_class) indices of ``way`` random classes, ``per_class`` samples each."""
    rng = np.random.default_rng(seed)
    pools = [np.flatnonzero(labels == c) for c in range(classes)]
    out = np.empty((steps, way, per_class), np.int32)
    for t in range(steps):
        for j, c in enumerate(rng.choice(classes, way, replace=False)):
            out[t, j] = rng.choice(pools[c], per_class, replace=False)
    return out


def augment(key: jax.Array, x: jax.Array) -> jax.Array:
    """A random view of 8 x 8 digits (B, 64): +-1 pixel shift, noise 0.1, 2 x 2 erasing (p 0.5).

    The shift is a selection among the 9 statically sliced shifted copies (cheap to compile).
    """
    b = x.shape[0]
    k_draw, k_noise = jax.random.split(key)
    draw = jax.random.uniform(k_draw, (b, 5))
    padded = jnp.pad(x.reshape(b, 8, 8), ((0, 0), (1, 1), (1, 1)))
    shifted = jnp.stack([padded[:, i : i + 8, j : j + 8] for i in range(3) for j in range(3)])
    choice = jnp.floor(draw[:, 0] * 3).astype(jnp.int32) * 3 + jnp.floor(draw[:, 1] * 3).astype(
        jnp.int32
    )
    images = jnp.take_along_axis(shifted, choice[None, :, None, None], axis=0)[0]
    top = jnp.floor(draw[:, 2] * 7)[:, None, None]
    left = jnp.floor(draw[:, 3] * 7)[:, None, None]
    rows = jnp.arange(8, dtype=x.dtype)[None, :, None]
    cols = jnp.arange(8, dtype=x.dtype)[None, None, :]
    patch = (rows >= top) & (rows < top + 2) & (cols >= left) & (cols < left + 2)
    images = jnp.where(patch & (draw[:, 4, None, None] < 0.5), 0.0, images)
    images = images + 0.1 * jax.random.normal(k_noise, images.shape, images.dtype)
    return images.reshape(b, 64)


@dataclasses.dataclass(frozen=True)
class EmbeddingGroup:
    """Methods sharing one compiled training loop: they differ only by a per-model value
    ``hyper`` (a temperature, a loss weight) passed as data, so one compilation trains all."""

    loss_fn: Callable  # (params, data, batch_index, key) -> scalar; data["hyper"] is a scalar
    sampler: str  # "pk" | "random" | "episodes"
    variants: tuple[tuple[str, float], ...]  # (method name, hyper)


def nt_xent_name(temperature: float) -> str:
    return f"NT-Xent tau={temperature:g} (self-sup.)"


def embedding_groups(config: Config) -> list[EmbeddingGroup]:
    """The methods of part (c)."""
    way, shot = config.episode_way, config.episode_shot

    def ms(p, d, index, key):
        del key
        return multi_similarity_loss(apply_mlp(p, d["x"][index]), d["y"][index])

    def contrastive(p, d, index, key):
        k1, k2 = jax.random.split(key)
        x = d["x"][index]
        z1, z2 = apply_mlp(p, augment(k1, x)), apply_mlp(p, augment(k2, x))
        return nt_xent(z1, z2, temperature=d["hyper"])

    def protonet(p, d, index, key):
        del key
        z = apply_mlp(p, d["x"][index.reshape(-1)]).reshape(way, index.shape[1], -1)
        support = z[:, :shot].reshape(way * shot, -1)
        query = z[:, shot:].reshape(-1, z.shape[-1])
        support_labels = jnp.repeat(jnp.arange(way), shot)
        query_labels = jnp.repeat(jnp.arange(way), index.shape[1] - shot)
        prototypes = class_prototypes(support, support_labels, way)
        ce = jnp.mean(
            optax.losses.softmax_cross_entropy_with_integer_labels(
                protonet_logits(query, prototypes), query_labels
            )
        )
        triplet = proto_triplet_loss(query, query_labels, prototypes)
        # hyper = 1: the paper's average (L_CE + L_PT) / 2; hyper = 0: plain ProtoNet.
        return (ce + d["hyper"] * triplet) / (1.0 + d["hyper"])

    temps = tuple((nt_xent_name(t), float(t)) for t in config.temperatures)
    return [
        EmbeddingGroup(ms, "pk", (("multi-similarity", 0.0),)),
        EmbeddingGroup(contrastive, "random", temps),
        EmbeddingGroup(
            protonet, "episodes", (("ProtoNet (CE)", 0.0), ("ProtoNet + Proto-Triplet", 1.0))
        ),
    ]


def _scores(z: jax.Array, labels: jax.Array, unseen: jax.Array, seen: jax.Array) -> dict:
    z = l2_normalize(z)
    return {
        "recall@1 unseen": recall_at_k(z[unseen], labels[unseen], ks=(1,))[0],
        "recall@1 seen": recall_at_k(z[seen], labels[seen], ks=(1,))[0],
        "uniformity": uniformity(z),
        "tolerance": tolerance(z, labels),
        "ICNN unseen": icnn_score(z[unseen], labels[unseen]),
    }


_SCORES = {
    fast: jax.jit(_scores, compiler_options=FAST_COMPILE if fast else None)
    for fast in (False, True)
}


def embedding_scores(
    z: np.ndarray, labels: np.ndarray, seen: int, *, fast_compile: bool = False
) -> dict[str, list[float]]:
    """Per model (leading axis of ``z``), on L2-normalized embeddings: recall@1 on unseen and
    seen test classes, uniformity and tolerance (all test embeddings), ICNN score (unseen)."""
    unseen_idx = np.flatnonzero(labels >= seen)
    seen_idx = np.flatnonzero(labels < seen)
    scores = _SCORES[fast_compile]
    per_model = [scores(zi, labels, unseen_idx, seen_idx) for zi in np.asarray(z)]
    return {k: [float(m[k]) for m in per_model] for k in per_model[0]}


def run_embeddings(config: Config, arrays: dict[str, np.ndarray], log: Callable) -> dict:
    seeds, seen = config.seeds, config.seen_classes
    train_mask = arrays["y_train"] < seen
    x_train = arrays["x_train"][train_mask]
    y_train = arrays["y_train"][train_mask]
    steps = config.embed_steps
    per_episode = config.episode_shot + config.episode_query
    samplers = {
        "pk": lambda s: pk_batches(y_train, seen, config.ms_per_class, steps, s),
        "random": lambda s: epoch_batches(len(y_train), steps, config.batch_size, s),
        "episodes": lambda s: episodes(y_train, seen, config.episode_way, per_episode, steps, s),
    }
    sizes = (x_train.shape[1], config.hidden, config.hidden, config.embed_dim)
    x_test = arrays["x_test"]
    results: dict[str, Any] = {}
    if not config.smoke:  # a reference row; skipped in smoke runs to save a compilation
        raw = embedding_scores(x_test[None], arrays["y_test"], seen)
        results["raw pixels (no training)"] = raw
    for group in embedding_groups(config):
        count = len(group.variants)
        schedule = np.stack([samplers[group.sampler](s) for s in seeds] * count)
        hyper = np.repeat([h for _, h in group.variants], len(seeds)).astype(np.float32)
        data = {"x": jnp.asarray(x_train), "y": jnp.asarray(y_train), "hyper": jnp.asarray(hyper)}
        params = train(
            group.loss_fn,
            init_many(seeds, sizes, count),
            data,
            {"x": None, "y": None, "hyper": 0},
            schedule,
            learning_rate=config.learning_rate,
            log_every=config.log_every,
            log=log,
            fast_compile=config.smoke,
            tag="embeddings/" + ", ".join(name for name, _ in group.variants),
        )
        scores = embedding_scores(
            predict_many(params, x_test), arrays["y_test"], seen, fast_compile=config.smoke
        )
        for v, (name, _) in enumerate(group.variants):
            rows = slice(v * len(seeds), (v + 1) * len(seeds))
            results[name] = {k: values[rows] for k, values in scores.items()}
    return results


# --------------------------------------------------------------------------- report


def claim_table(results: dict) -> dict[tuple[str, str], dict[str, list[float]]]:
    """The per-seed metrics of every arm as the claims read them: ``{(part, method):
    {metric: [value per seed]}}`` (part (a)'s metric ``"acc 0.4"`` is the accuracy at 40 %
    label noise)."""
    table = {
        ("noise", name): {f"acc {rate}": values for rate, values in per_rate.items()}
        for name, per_rate in results["noise"].items()
    }
    for part in ("imbalanced", "embeddings"):
        for name, metrics in results[part].items():
            if isinstance(metrics, dict):
                table[(part, name)] = metrics
    return table


def claims(results: dict, config: Config) -> list[jexp.Claim]:
    """The papers' claims checked on this run, as :class:`jaxmtl.experiment.Claim` s over
    :func:`claim_table` (differences in points, seeds paired)."""
    out = []
    noise, emb = results["noise"], results["embeddings"]
    comp_sum = "comp-sum losses (Mao et al. 2023)"
    top = f"{max(config.noise_rates):g}"
    gce = next(k for k in noise if k.startswith("GCE"))
    if top != "0":
        out += [
            jexp.Claim(
                comp_sum,
                f"{name} (tau > 1) beats CE at {top} symmetric label noise",
                f"acc {top}",
                ("noise", name),
                ("noise", "CE"),
                scale=100,
            )
            for name in (gce, "MAE")
        ]
    if "0" in noise["CE"]:
        text = "MAE (tau = 2) trains slowest: lower clean accuracy than CE"
        out.append(
            jexp.Claim(comp_sum, text, "acc 0", ("noise", "CE"), ("noise", "MAE"), scale=100)
        )
    imb = [k for k in results["imbalanced"] if isinstance(results["imbalanced"][k], dict)]
    ce = ("imbalanced", next(k for k in imb if k.startswith("CE")))
    gfl = ("imbalanced", next(k for k in imb if k.startswith("DatasetEquity")))
    out += [
        jexp.Claim(
            "DatasetEquity (Shrivastava et al. 2023)",
            "the GFL weight raises minority (positive) recall over plain BCE",
            "recall",
            gfl,
            ce,
            scale=100,
        ),
        jexp.Claim(
            "AnyLoss (Han et al. 2024)",
            "AnyLoss-F1 reaches a higher test F1 than BCE under imbalance",
            "f1",
            ("imbalanced", "AnyLoss-F1"),
            ce,
            scale=100,
        ),
    ]
    if len(set(config.temperatures)) >= 2:
        low = ("embeddings", nt_xent_name(min(config.temperatures)))
        high = ("embeddings", nt_xent_name(max(config.temperatures)))
        wang_liu = "contrastive temperature (Wang & Liu 2021)"
        pair = f"tau = {min(config.temperatures):g} vs {max(config.temperatures):g}"
        out += [
            jexp.Claim(
                wang_liu,
                f"smaller tau is more uniform (lower L_unif), {pair}",
                "uniformity",
                low,
                high,
                direction="lower",
                digits=3,
            ),
            jexp.Claim(
                wang_liu,
                f"smaller tau is less tolerant, {pair}",
                "tolerance",
                low,
                high,
                direction="lower",
                digits=3,
            ),
        ]
    proto = "Proto-Triplet (Mendez-Ruiz et al. 2023)"
    with_pt, plain = ("embeddings", "ProtoNet + Proto-Triplet"), ("embeddings", "ProtoNet (CE)")
    out += [
        jexp.Claim(
            proto,
            "adding Proto-Triplet to ProtoNet raises unseen-digit recall@1",
            "recall@1 unseen",
            with_pt,
            plain,
            scale=100,
        ),
        jexp.Claim(
            proto,
            "adding Proto-Triplet raises the ICNN score of unseen-digit embeddings",
            "ICNN unseen",
            with_pt,
            plain,
            digits=3,
        ),
    ]
    others = ["ProtoNet (CE)", "ProtoNet + Proto-Triplet"]
    best = max(others, key=lambda k: np.mean(emb[k]["recall@1 unseen"]))
    out.append(
        jexp.Claim(
            "Multi-Similarity (Wang et al. 2019)",
            f"MS loss beats the best other supervised loss here ({best}) on unseen recall@1",
            "recall@1 unseen",
            ("embeddings", "multi-similarity"),
            ("embeddings", best),
            scale=100,
        )
    )
    return out


def summary_markdown(results: dict, config: Config, seconds: float) -> str:
    n = len(config.seeds)
    lines = [f"# Loss zoo on digits ({n} seed{'s' if n > 1 else ''}, mean ± std)", ""]
    noise_columns = {f"noise {r:g}": (f"{r:g}", 100, 1) for r in config.noise_rates}
    imb = results["imbalanced"]
    binary = {name: m for name, m in imb.items() if isinstance(m, dict)}
    binary_columns = {k: (k, 100, 1) for k in next(iter(binary.values()))}
    embedding_columns = {
        "R@1 unseen": ("recall@1 unseen", 100, 1),
        "R@1 seen": ("recall@1 seen", 100, 1),
        **{k: (k, 1, 3) for k in ("uniformity", "tolerance", "ICNN unseen")},
    }
    lines += [
        "## (a) Symmetric label noise: test accuracy (%)",
        "",
        jexp.markdown_table(jexp.stat_rows(results["noise"], noise_columns, label="loss")),
        "",
    ]
    lines += [
        f"## (b) Digit {config.positive_digit} vs rest: test metrics at threshold 0.5 (%)",
        "",
        f"Positives: {100 * imb['train_positive_fraction']:.1f}% of training examples (kept "
        f"{config.positive_keep:g} of them), {100 * imb['test_positive_fraction']:.1f}% of test. "
        "Mean DatasetEquity appearance likelihood (PCA + k-means of the pixels, "
        "jaxmtl.analysis.equity, for the paper's ResNet + t-SNE + DBSCAN): positives "
        f"{imb['positive_mean_likelihood']:.2f}, "
        f"negatives {imb['negative_mean_likelihood']:.2f}.",
        "",
        jexp.markdown_table(jexp.stat_rows(binary, binary_columns, label="loss")),
        "",
        f"## (c) Embeddings: trained on digits 0-{config.seen_classes - 1}",
        "",
        "Recall@1 (%) on test images of unseen / seen digits; uniformity (t = 2, lower = more "
        "uniform), tolerance (mean same-class cosine) on all test embeddings; ICNN score of "
        "unseen-digit embeddings. NT-Xent is self-supervised (two augmented views, no labels).",
        "",
        jexp.markdown_table(jexp.stat_rows(results["embeddings"], embedding_columns)),
        "",
        "## Paper claims at this scale",
        "",
        jexp.claims_markdown(results["claims"], smoke=config.smoke),
        "",
        f"Wall time {seconds:.0f} s. Command: `python -m experiments.loss_zoo"
        f"{' --smoke' if config.smoke else ''}`.",
        "",
    ]
    return "\n".join(lines)


def plot(results: dict, config: Config, run_dir: jexp.RunDir) -> Path:
    """Writes loss_zoo.png (:func:`figure`) into the run directory; returns its path."""
    return run_dir.savefig(figure(results, config), NAME)


def figure(results: dict, config: Config):
    """The four panels of loss_zoo.png: (a) accuracy against label noise, (b) F1 under
    imbalance, (c) zero-shot recall@1, (d) uniformity against tolerance."""
    fig, axes = jexp.figure(2, 2, size=(7.0, 4.5))
    noise = results["noise"]
    rates = [float(r) for r in next(iter(noise.values()))]
    jexp.plot_curves(
        axes[0, 0],
        rates,
        {name: np.transpose(list(per_rate.values())) for name, per_rate in noise.items()},
        scale=100,
        xlabel="symmetric label-noise rate",
        ylabel="test accuracy (%)",
        title="(a) label noise: test accuracy",
    )
    imb = {k: v for k, v in results["imbalanced"].items() if isinstance(v, dict)}
    emb = results["embeddings"]
    panels = [  # (axes, methods, metric, value label, category label, title), % of 0-100
        (axes[0, 1], imb, "f1", "test F1 at threshold 0.5 (%)", "loss",
         f"(b) imbalance: digit {config.positive_digit} vs rest"),
        (axes[1, 0], emb, "recall@1 unseen", "recall@1 on unseen digits (%)", "embedding",
         f"(c) zero-shot retrieval (trained on digits 0-{config.seen_classes - 1})"),
    ]  # fmt: skip
    for ax, methods, metric, xlabel, ylabel, title in panels:
        values = [m[metric] for m in methods.values()]
        jexp.plot_bars(ax, list(methods), values, scale=100, horizontal=True, limits=(0, 100),
                       xlabel=xlabel, ylabel=ylabel, title=title)  # fmt: skip
    ax = axes[1, 1]
    for name, m in emb.items():
        ax.scatter(np.mean(m["uniformity"]), np.mean(m["tolerance"]), label=name, s=40)
    ax.set(
        xlabel="uniformity L_unif (lower = more uniform)",
        ylabel="tolerance (mean same-class cosine)",
        title="(d) embeddings: uniformity against tolerance",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    n = len(config.seeds)
    title = f"Loss zoo on scikit-learn digits (mean ± std over {n} seed{'s' if n > 1 else ''})"
    return jexp.finish_figure(fig, title, smoke=config.smoke)


# --------------------------------------------------------------------------- entry points


def run(config: Config) -> dict:
    """Runs the three parts and writes the run directory; returns the results dict."""
    start = time.perf_counter()
    effective = config.effective()
    arrays = load_digits_arrays()  # before the run directory: a failure leaves none
    run_dir = jexp.RunDir(config.out_dir, config)
    parts = {"noise": run_noise, "imbalanced": run_imbalanced, "embeddings": run_embeddings}
    results: dict[str, Any] = {"part_seconds": {}, "smoke": effective.smoke}
    stamp = jexp.config_stamp(effective)
    computed = set()
    for name, part in parts.items():

        def compute(part=part, name=name) -> dict:
            computed.add(name)
            part_start = time.perf_counter()
            values = part(effective, arrays, run_dir.log)
            seconds = round(time.perf_counter() - part_start, 2)
            run_dir.log({"part": name, "seconds": seconds})
            return {"seconds": seconds, "results": values}

        # A finished part of this configuration (an interrupted run resumed) is reused.
        stored = run_dir.cached_json(f"part_{name}.json", stamp, compute)
        results[name] = stored["results"]
        results["part_seconds"][name] = stored["seconds"]
    rows = claim_table(results)
    results["claims"] = jexp.check_claims(claims(results, effective), rows, smoke=effective.smoke)
    # Training time of the parts (also when reused from an earlier, interrupted run).
    reused = sum(t for name, t in results["part_seconds"].items() if name not in computed)
    seconds = reused + time.perf_counter() - start
    results["seconds"] = seconds
    run_dir.write_results(results)
    run_dir.write_summary(summary_markdown(results, effective, seconds))
    plot(results, effective, run_dir)
    return results


def main() -> None:
    jexp.cli(Config, run)


if __name__ == "__main__":
    main()
