"""Tests of jaxmtl.losses.metric: hand values, float64 NumPy references, invariances, grads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.test_util import check_grads

from jaxmtl.losses import metric


def _unit_circle(degrees, dtype=jnp.float32):
    a = np.deg2rad(np.asarray(degrees, np.float64))
    return jnp.asarray(np.stack([np.cos(a), np.sin(a)], axis=1), dtype)


def _pk_problem(seed, p=3, k=4, d=5, dtype=np.float64):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(p * k, d)).astype(dtype)
    labels = np.repeat(np.arange(p), k).astype(np.int32)
    return z, labels


_ms_jit = jax.jit(metric.multi_similarity_loss)
_icnn_jit = jax.jit(metric.icnn_score)


def _components(x, y):
    return jnp.stack(metric._icnn_components(x, y, None, None, 4, True, 1e-6))


# ----------------------------------------------------------------- NumPy references


def _ms_reference(sims, labels, alpha, beta, lam, eps):
    """Loop over anchors, written from the paper's Eq. 9-12 (float64)."""
    b = len(labels)
    out = np.zeros(b)
    for i in range(b):
        pos = [j for j in range(b) if labels[j] == labels[i] and j != i]
        neg = [j for j in range(b) if labels[j] != labels[i]]
        if not pos or not neg:
            continue
        min_pos = min(sims[i, j] for j in pos)
        max_neg = max(sims[i, j] for j in neg)
        hard_neg = [j for j in neg if sims[i, j] > min_pos - eps]
        hard_pos = [j for j in pos if sims[i, j] < max_neg + eps]
        if not hard_neg or not hard_pos:
            continue
        pos_sum = sum(np.exp(-alpha * (sims[i, j] - lam)) for j in hard_pos)
        neg_sum = sum(np.exp(beta * (sims[i, j] - lam)) for j in hard_neg)
        out[i] = np.log1p(pos_sum) / alpha + np.log1p(neg_sum) / beta
    return out


def _cosine(z):
    z = np.asarray(z, np.float64)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    return z @ z.T


def _icnn_reference(x, labels, ref=None, ref_labels=None, k=4, drop_self=True, eps=1e-6):
    """The ICNN score written from the paper/code description with sorting (float64)."""
    x = np.asarray(x, np.float64)
    own = ref is None
    pool = x if own else np.asarray(ref, np.float64)
    pool_labels = np.asarray(labels if own else ref_labels)
    labels = np.asarray(labels)
    n = len(x)
    d = np.sqrt(((x[:, None, :] - pool[None, :, :]) ** 2).sum(-1) + eps)
    skip = 1 if drop_self else 0
    pool_size = len(pool)
    gamma_one = k + 1 + skip >= pool_size
    if gamma_one:
        k = pool_size - 1 - skip
    rows_d, rows_s = [], []
    for i in range(n):
        if own and drop_self:
            order = [j for j in np.argsort(d[i], kind="stable") if j != i][: k + 1]
        else:
            order = list(np.argsort(d[i], kind="stable")[skip : skip + k + 1])
        rows_d.append(d[i, order])
        rows_s.append(pool_labels[order] == labels[i])
    dd, ss = np.array(rows_d), np.array(rows_s)
    same_terms, diff_terms = [], []
    largest = max([dd[i, j] for i in range(n) for j in range(k) if not ss[i, j]], default=None)
    for i in range(n):
        diffs = [dd[i, j] for j in range(k + 1) if not ss[i, j]]
        nn_dc = min(diffs) if diffs else np.inf
        r = dd[i, :k] / nn_dc
        r = r / max(1.0, r.max())
        same_k = [r[j] for j in range(k) if ss[i, j]]
        if same_k:
            same_terms.append(np.mean(same_k))
        diff_k = [dd[i, j] / largest for j in range(k) if not ss[i, j]]
        if diff_k:
            diff_terms.append(np.mean(diff_k))
    lambda_same = 1.0 - np.mean(same_terms) if same_terms else 1.0
    lambda_diff = np.mean(diff_terms) if diff_terms else 1.0
    gamma = 1.0 if gamma_one else ss[:, :k].sum(1).mean() / k
    return ((lambda_same + lambda_diff) / 2 + gamma) / 2


# ----------------------------------------------------------------- Multi-Similarity


def test_ms_hand_value():
    z = _unit_circle([0, 30, 60, 90])
    labels = jnp.array([0, 0, 1, 1])
    kw = dict(alpha=2.0, beta=50.0, lam=0.5, eps=0.1)
    per_anchor = jax.jit(
        lambda e: metric.multi_similarity_from_similarities(metric.pairwise_cosine(e), labels, **kw)
    )(z)
    np.testing.assert_allclose(per_anchor, [0.0, 0.562358, 0.562358, 0.0], atol=2e-6)
    np.testing.assert_allclose(metric.multi_similarity_loss(z, labels, **kw), 0.281179, atol=2e-6)


@pytest.mark.parametrize("eps", [0.1, 0.5, np.inf])
def test_ms_matches_reference_float64(x64, eps):
    z, labels = _pk_problem(0)
    kw = dict(alpha=2.0, beta=40.0, lam=0.5, eps=eps)
    got = jax.jit(
        lambda e, y: metric.multi_similarity_from_similarities(metric.pairwise_cosine(e), y, **kw)
    )(jnp.asarray(z), jnp.asarray(labels))
    want = _ms_reference(_cosine(z), labels, **kw)
    assert np.any(want > 0)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_ms_gradient_is_general_pair_weighting(x64):
    z, labels = _pk_problem(1)
    z, labels = jnp.asarray(z), jnp.asarray(labels)
    sims = metric.pairwise_cosine(z)
    grad = jax.jit(jax.grad(lambda s: metric.multi_similarity_from_similarities(s, labels).sum()))(
        sims
    )
    w_pos, w_neg = jax.jit(metric.ms_pair_weights)(z, labels)
    assert float(jnp.sum(w_neg > 0)) > 0 and float(jnp.sum(w_pos > 0)) > 0
    np.testing.assert_allclose(grad, w_neg - w_pos, atol=1e-12)


def test_ms_hinge_limit_for_large_scales(x64):
    z, labels = _pk_problem(2)
    sims = _cosine(z)
    big = dict(alpha=1e5, beta=1e5, lam=0.5, eps=np.inf)  # no mining: all pairs
    f = jax.jit(lambda s, y: metric.multi_similarity_from_similarities(s, y, **big))
    got = f(jnp.asarray(sims), jnp.asarray(labels))
    same = labels[:, None] == labels[None, :]
    np.fill_diagonal(same, False)
    diff = labels[:, None] != labels[None, :]
    hinge_pos = np.maximum(0.0, 0.5 - np.where(same, sims, np.inf).min(1))
    hinge_neg = np.maximum(0.0, np.where(diff, sims, -np.inf).max(1) - 0.5)
    np.testing.assert_allclose(got, hinge_pos + hinge_neg, atol=1e-4)


def test_ms_permutation_equivariance():
    z, labels = _pk_problem(3, dtype=np.float32)
    perm = np.random.default_rng(0).permutation(len(labels))
    f = jax.jit(
        lambda e, y: metric.multi_similarity_from_similarities(metric.pairwise_cosine(e), y)
    )
    base = f(jnp.asarray(z), jnp.asarray(labels))
    permuted = f(jnp.asarray(z[perm]), jnp.asarray(labels[perm]))
    np.testing.assert_allclose(permuted, base[perm], rtol=1e-5, atol=1e-6)


@given(scale=st.floats(1e-3, 1e3))
def test_ms_invariant_to_embedding_scale(scale):
    z, labels = _pk_problem(4, dtype=np.float32)
    base = _ms_jit(jnp.asarray(z), jnp.asarray(labels))
    scaled = _ms_jit(jnp.asarray(z * np.float32(scale)), jnp.asarray(labels))
    np.testing.assert_allclose(scaled, base, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("labels", [[0, 0, 0, 0], [0, 1, 2, 3]])
def test_ms_degenerate_batches_give_zero(labels):
    z = jnp.asarray(np.random.default_rng(5).normal(size=(4, 3)), jnp.float32)
    labels = jnp.array(labels)
    loss, grad = jax.jit(jax.value_and_grad(metric.multi_similarity_loss))(z, labels)
    assert float(loss) == 0.0
    assert np.all(np.asarray(grad) == 0.0)


def test_ms_check_grads_float64(x64):
    z, labels = _pk_problem(6)
    f = lambda e: metric.multi_similarity_loss(e, jnp.asarray(labels), eps=0.3)
    assert float(f(jnp.asarray(z))) > 0
    check_grads(jax.jit(f), (jnp.asarray(z),), order=1, modes=("rev",), eps=1e-6)


def test_ms_extreme_and_bfloat16():
    z, labels = _pk_problem(7, dtype=np.float32)
    labels = jnp.asarray(labels)
    for e in (jnp.asarray(z) * 1e4, jnp.asarray(z) * 1e-6):
        loss, grad = jax.jit(jax.value_and_grad(metric.multi_similarity_loss))(e, labels)
        assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad)))
    ref = _ms_jit(jnp.asarray(z), labels)
    low = _ms_jit(jnp.asarray(z, jnp.bfloat16), labels)
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(float(low), float(ref), rtol=0.05)
    # beta large with similarities close to 1: the exponentials would overflow naively.
    sims = jnp.full((4, 4), 0.999)
    out = jax.jit(
        lambda s: metric.multi_similarity_from_similarities(
            s, jnp.array([0, 0, 1, 1]), beta=1e4, eps=1.0
        )
    )(sims)
    assert np.all(np.isfinite(np.asarray(out)))


def test_ms_errors():
    z = jnp.ones((4, 3))
    with pytest.raises(TypeError, match=r"labels.*integer"):
        metric.multi_similarity_loss(z, jnp.ones(4))
    with pytest.raises(ValueError, match=r"labels.*\(4,\).*\(3,\)"):
        metric.multi_similarity_loss(z, jnp.array([0, 1, 2]))
    with pytest.raises(ValueError, match=r"alpha.*> 0.*-1"):
        metric.multi_similarity_loss(z, jnp.array([0, 0, 1, 1]), alpha=-1.0)
    with pytest.raises(ValueError, match=r"embeddings.*2-D"):
        metric.multi_similarity_loss(jnp.ones(4), jnp.array([0, 0, 1, 1]))
    with pytest.raises(ValueError, match=r"similarities.*square"):
        metric.multi_similarity_from_similarities(jnp.ones((4, 3)), jnp.array([0, 0, 1, 1]))


# ----------------------------------------------------------------- contrastive


def test_info_nce_hand_values():
    taus = jnp.array([0.1, 0.5, 1.0])  # a traced temperature is accepted (e.g. a learned one)
    got = jax.jit(
        jax.vmap(
            lambda t: metric.info_nce_from_similarities(
                jnp.array([0.9]), jnp.array([[0.8, 0.1]]), temperature=t
            )[0]
        )
    )(taus)
    np.testing.assert_allclose(got, [0.313507, 0.703408, 0.856187], atol=2e-6)


def test_info_nce_gradient_identity(x64):
    rng = np.random.default_rng(8)
    pos, neg, tau = jnp.asarray(rng.uniform(-1, 1, 3)), jnp.asarray(rng.uniform(-1, 1, (3, 5))), 0.3
    f = lambda p, n: metric.info_nce_from_similarities(p, n, temperature=tau).sum()
    g_pos, g_neg = jax.jit(jax.grad(f, argnums=(0, 1)))(pos, neg)
    logits = np.concatenate([np.asarray(pos)[:, None], np.asarray(neg)], 1) / tau
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    np.testing.assert_allclose(g_neg, prob[:, 1:] / tau, rtol=1e-12)
    np.testing.assert_allclose(g_pos, -prob[:, 1:].sum(1) / tau, rtol=1e-12)
    np.testing.assert_allclose(-g_pos, g_neg.sum(1), rtol=1e-12)  # pull == total push


def test_info_nce_small_temperature_limit_is_hinge(x64):
    pos, neg = jnp.array([0.5, 0.9]), jnp.array([[0.7, 0.1, 0.2], [0.3, 0.2, 0.1]])
    tau = 1e-3
    got = tau * metric.info_nce_from_similarities(pos, neg, temperature=tau)
    np.testing.assert_allclose(got, [0.2, 0.0], atol=2e-3)


def test_info_nce_in_batch_matches_reference(x64):
    rng = np.random.default_rng(9)
    a, p = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    an = a / np.linalg.norm(a, axis=1, keepdims=True)
    pn = p / np.linalg.norm(p, axis=1, keepdims=True)
    logits = an @ pn.T / 0.2
    want = np.mean(np.log(np.exp(logits).sum(1)) - np.diag(logits))
    nce = jax.jit(lambda *args: metric.info_nce(*args, temperature=0.2))
    got = nce(jnp.asarray(a), jnp.asarray(p))
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # the same negatives given explicitly, per anchor (B, K, D) and as a shared bank (K, D)
    per_anchor = np.stack([np.delete(p, i, axis=0) for i in range(6)])
    got_explicit = nce(jnp.asarray(a), jnp.asarray(p), jnp.asarray(per_anchor))
    np.testing.assert_allclose(got_explicit, want, rtol=1e-12)
    bank = rng.normal(size=(7, 4))
    bn = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    pos = np.sum(an * pn, 1) / 0.2
    full = np.concatenate([pos[:, None], an @ bn.T / 0.2], 1)
    want_bank = np.mean(np.log(np.exp(full).sum(1)) - pos)
    got_bank = nce(jnp.asarray(a), jnp.asarray(p), jnp.asarray(bank))
    np.testing.assert_allclose(got_bank, want_bank, rtol=1e-12)


def test_info_nce_negative_order_and_scale_invariance():
    rng = np.random.default_rng(10)
    a, p, n = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in [(4, 3), (4, 3), (4, 6, 3)])
    nce = jax.jit(metric.info_nce)
    base = nce(a, p, n)
    shuffled = nce(a, p, n[:, ::-1])
    scaled = nce(a * 100.0, p * 0.01, n * 7.0)
    np.testing.assert_allclose(shuffled, base, rtol=1e-5)
    np.testing.assert_allclose(scaled, base, rtol=1e-4)


def test_hard_info_nce_reduces_to_info_nce():
    rng = np.random.default_rng(11)
    a, p = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32), jnp.asarray(rng.normal(size=(5, 3)))
    p = p.astype(jnp.float32)
    n = jnp.asarray(rng.normal(size=(5, 6, 3)), jnp.float32)

    @jax.jit
    def losses(a, p, n):
        kw = dict(temperature=0.5)
        return jnp.stack(
            [
                metric.hard_info_nce(a, p, num_hard=4, **kw),
                metric.info_nce(a, p, **kw),
                metric.hard_info_nce(a, p, n, num_hard=6, **kw),
                metric.info_nce(a, p, n, **kw),
                metric.hard_info_nce(a, p, n, num_hard=2, **kw),
            ]
        )

    hard_all, plain, hard_all_n, plain_n, hard_two = np.asarray(losses(a, p, n))
    np.testing.assert_allclose([hard_all, hard_all_n], [plain, plain_n], rtol=1e-5)
    assert hard_two < plain_n  # only the hardest negatives kept => a smaller loss


def test_hard_info_nce_k1_small_tau_is_hardest_negative_hinge(x64):
    rng = np.random.default_rng(12)
    a, p, n = rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), rng.normal(size=(4, 5, 3))
    tau = 1e-3
    hard = jax.jit(lambda *args: metric.hard_info_nce(*args, temperature=tau, num_hard=1))
    got = tau * hard(jnp.asarray(a), jnp.asarray(p), jnp.asarray(n))
    unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)
    s_pos = np.sum(unit(a) * unit(p), -1)
    s_max = np.einsum("bd,bkd->bk", unit(a), unit(n)).max(1)
    np.testing.assert_allclose(got, np.mean(np.maximum(s_max - s_pos, 0.0)), atol=1e-3)


def test_nt_xent_is_info_nce_in_both_directions(x64):
    rng = np.random.default_rng(13)
    z1, z2 = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    views = np.concatenate([z1, z2])
    losses = []
    for anchors, partners, offset in ((z1, z2, 0), (z2, z1, 4)):
        negs = np.stack([np.delete(views, [offset + i, (offset + i + 4) % 8], 0) for i in range(4)])
        nce = jax.jit(lambda *args: metric.info_nce(*args, temperature=0.3))
        losses.append(nce(jnp.asarray(anchors), jnp.asarray(partners), jnp.asarray(negs)))
    got = jax.jit(lambda u, v: metric.nt_xent(u, v, temperature=0.3))(
        jnp.asarray(z1), jnp.asarray(z2)
    )
    np.testing.assert_allclose(got, np.mean(losses), rtol=1e-12)


def test_contrastive_check_grads_float64(x64):
    rng = np.random.default_rng(14)
    a, p, n = (jnp.asarray(rng.normal(size=s)) for s in [(4, 3), (4, 3), (4, 5, 3)])
    nt = jax.jit(lambda u, v: metric.nt_xent(u, v, temperature=0.2))
    check_grads(nt, (a, p), 1, modes=("rev",))
    check_grads(
        jax.jit(lambda u, v, w: metric.hard_info_nce(u, v, w, temperature=0.2, num_hard=3)),
        (a, p, n),
        1,
        modes=("rev",),
    )


def test_contrastive_extreme_inputs_and_bfloat16():
    pos = jnp.array([1.0, -1.0])
    neg = jnp.array([[-1.0, 1.0], [1.0, 1.0]])
    f = lambda p, n: metric.info_nce_from_similarities(p, n, temperature=0.01).sum()
    value, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(pos, neg)
    assert np.isfinite(float(value)) and all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    big = jnp.asarray(np.random.default_rng(15).normal(size=(4, 3)) * 1e4, jnp.float32)
    nt = jax.jit(lambda u, v: metric.nt_xent(u, v, temperature=0.01))
    assert np.isfinite(float(nt(big, -big)))
    assert np.isfinite(float(jax.jit(metric.info_nce)(big, big * 0.0)))
    g = jax.jit(jax.grad(lambda u: nt(u, u[::-1])))(big)
    assert np.all(np.isfinite(np.asarray(g)))
    low = nt(big.astype(jnp.bfloat16), big[::-1].astype(jnp.bfloat16))
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(float(low), float(nt(big, big[::-1])), rtol=0.05)


def test_contrastive_errors():
    a = jnp.ones((4, 3))
    with pytest.raises(ValueError, match=r"temperature.*> 0.*0.0"):
        metric.info_nce(a, a, temperature=0.0)
    with pytest.raises(ValueError, match=r"positives.*\(4, 3\).*\(4, 2\)"):
        metric.info_nce(a, jnp.ones((4, 2)))
    with pytest.raises(ValueError, match=r"negatives.*expected shape"):
        metric.info_nce(a, a, jnp.ones((3, 5, 3)))
    with pytest.raises(ValueError, match=r"num_hard.*\[1, 3\].*7"):
        metric.hard_info_nce(a, a, num_hard=7)
    with pytest.raises(TypeError, match=r"anchors.*floating"):
        metric.nt_xent(jnp.ones((4, 3), jnp.int32), a)


# ----------------------------------------------------------------- prototypes, Proto-Triplet


def test_prototypes_and_logits_hand_values():
    support = jnp.array([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [0.0, 2.0]])
    protos = metric.class_prototypes(support, jnp.array([0, 0, 1, 1]), 3)
    np.testing.assert_allclose(protos, [[1.0, 0.0], [0.0, 3.0], [0.0, 0.0]])
    logits = metric.protonet_logits(jnp.array([[1.0, 1.0]]), protos[:2], temperature=2.0)
    np.testing.assert_allclose(logits, [[-0.5, -2.5]])


def test_proto_triplet_hand_values():
    queries, protos = jnp.array([[0.2], [0.4], [0.9]]), jnp.array([[0.0], [1.0]])
    loss = jax.jit(metric.proto_triplet_loss)
    per_query = [float(loss(queries[i : i + 1], jnp.array([0]), protos)) for i in range(3)]
    np.testing.assert_allclose(per_query, [0.0, 0.3000004, 1.2999956], atol=1e-6)
    total = loss(queries, jnp.array([0, 0, 0]), protos)
    np.testing.assert_allclose(total, 0.533332, atol=1e-6)


def test_proto_triplet_grads_and_reference(x64):
    rng = np.random.default_rng(16)
    q, p = rng.normal(size=(6, 3)), rng.normal(size=(3, 3))
    y = np.array([0, 1, 2, 0, 1, 2], np.int32)
    d = np.sqrt(((q[:, None] - p[None]) ** 2).sum(-1) + 1e-6)
    d_pos = d[np.arange(6), y]
    d_neg = np.where(np.eye(3, dtype=bool)[y], np.inf, d).min(1)
    want = np.maximum(d_pos - d_neg + 1.0, 0).mean()
    f = lambda u, v: metric.proto_triplet_loss(u, jnp.asarray(y), v, margin=1.0)
    f = jax.jit(f)
    np.testing.assert_allclose(f(jnp.asarray(q), jnp.asarray(p)), want, rtol=1e-12)
    check_grads(f, (jnp.asarray(q), jnp.asarray(p)), 1, modes=("rev",), eps=1e-6)


def test_proto_triplet_errors_and_bfloat16():
    q = jnp.ones((3, 2))
    with pytest.raises(ValueError, match=r"prototypes.*C >= 2"):
        metric.proto_triplet_loss(q, jnp.array([0, 0, 0]), jnp.ones((1, 2)))
    with pytest.raises(ValueError, match=r"margin.*>= 0"):
        metric.proto_triplet_loss(q, jnp.array([0, 0, 0]), jnp.ones((2, 2)), margin=-1.0)
    with pytest.raises(ValueError, match=r"num_classes"):
        metric.class_prototypes(q, jnp.array([0, 0, 0]), 0)
    low = metric.proto_triplet_loss(
        jnp.full((2, 2), 1e4, jnp.bfloat16), jnp.array([0, 1]), jnp.eye(2, dtype=jnp.bfloat16)
    )
    assert low.dtype == jnp.bfloat16 and np.isfinite(float(low))


# ----------------------------------------------------------------- ICNN

_X_LINE = [[0.043], [0.118], [0.291], [0.401], [1.056], [1.096], [1.26], [1.287]]
_Y_LINE = [0, 0, 0, 0, 1, 1, 1, 1]


def test_icnn_hand_values():
    x, y = jnp.array(_X_LINE), jnp.array(_Y_LINE)
    parts = jax.jit(_components)(x, y)
    np.testing.assert_allclose(parts, [0.777528, 0.797878, 0.75], atol=2e-6)
    score, loss = jax.jit(lambda u, v: (metric.icnn_score(u, v), metric.icnn_loss(u, v)))(x, y)
    np.testing.assert_allclose([score, loss], [0.768851, 0.262858], atol=2e-6)


@pytest.mark.parametrize(
    ("n", "k", "with_ref", "drop_self"),
    [(12, 4, False, True), (12, 2, False, False), (5, 4, False, True), (8, 3, True, True),
     (8, 3, True, False)],
)  # fmt: skip
def test_icnn_matches_reference_float64(x64, n, k, with_ref, drop_self):
    rng = np.random.default_rng(n + k)
    x, y = rng.normal(size=(n, 3)), rng.integers(0, 3, n).astype(np.int32)
    ref, ref_y = (rng.normal(size=(7, 3)), rng.integers(0, 3, 7).astype(np.int32))
    args = (jnp.asarray(ref), jnp.asarray(ref_y)) if with_ref else (None, None)
    score = jax.jit(lambda *a: metric.icnn_score(*a, k=k, drop_self=drop_self))
    got = score(jnp.asarray(x), jnp.asarray(y), *args)
    want = _icnn_reference(
        x, y, *((ref, ref_y) if with_ref else (None, None)), k=k, drop_self=drop_self
    )
    np.testing.assert_allclose(got, want, rtol=1e-12)


@given(shift=st.floats(-5, 5), scale=st.floats(0.5, 20))
def test_icnn_translation_and_scale_invariance(shift, scale):
    x = np.random.default_rng(17).normal(size=(10, 2)).astype(np.float32)
    y = jnp.array([0, 1] * 5)
    base = _icnn_jit(jnp.asarray(x), y)
    moved = _icnn_jit(jnp.asarray(x * np.float32(scale) + np.float32(shift)), y)
    assert 0.0 <= float(base) <= 1.0
    np.testing.assert_allclose(moved, base, atol=2e-4)


def test_icnn_separated_clusters_score_high_alternating_low():
    rng = np.random.default_rng(18)
    centres = np.repeat(np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]]), 5, axis=0)
    x = jnp.asarray(centres + rng.normal(scale=0.1, size=(15, 2)), jnp.float32)
    y = jnp.repeat(jnp.arange(3), 5)
    _, _, gamma = jax.jit(_components)(x, y)
    assert float(gamma) == 1.0
    assert float(_icnn_jit(x, y)) > 0.95
    line = jnp.arange(12.0)[:, None]
    assert float(_icnn_jit(line, jnp.array([0, 1] * 6))) < 0.4


def test_icnn_gradients(x64):
    x = jnp.asarray(np.random.default_rng(19).normal(size=(9, 2)))
    y = jnp.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    gamma_grad = jax.jit(jax.grad(lambda u: _components(u, y)[2]))(x)
    assert np.all(np.asarray(gamma_grad) == 0.0)
    check_grads(jax.jit(lambda u: metric.icnn_loss(u, y)), (x,), 1, modes=("rev",), eps=1e-7)


def test_icnn_degenerate_sets_are_finite():
    x = jnp.asarray(np.random.default_rng(20).normal(size=(6, 2)), jnp.float32)
    single_class = jnp.zeros(6, jnp.int32)
    _, lambda_diff, _ = jax.jit(_components)(x, single_class)
    assert float(lambda_diff) == 1.0
    one_shot = jnp.arange(5, dtype=jnp.int32)  # 5-way 1-shot support: no same-class neighbour
    value_and_grad = jax.jit(jax.value_and_grad(metric.icnn_loss))
    for labels, pts in ((single_class, x), (one_shot, x[:5])):
        loss, grad = value_and_grad(pts, labels)
        assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad)))
    low = jax.jit(metric.icnn_loss)(x.astype(jnp.bfloat16) * 1e3, jnp.array([0, 1] * 3))
    assert low.dtype == jnp.bfloat16 and np.isfinite(float(low))


def test_icnn_errors():
    x = jnp.ones((4, 2))
    with pytest.raises(ValueError, match=r"ref, ref_labels"):
        metric.icnn_score(x, jnp.zeros(4, jnp.int32), ref=x)
    with pytest.raises(ValueError, match=r"k: expected a positive int"):
        metric.icnn_score(x, jnp.zeros(4, jnp.int32), k=0)
    with pytest.raises(ValueError, match=r"ref: expected at least"):
        metric.icnn_score(x[:2], jnp.zeros(2, jnp.int32))
