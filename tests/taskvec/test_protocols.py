"""Addition and negation protocols (Ilharco et al., ICLR 2023; Ortiz-Jimenez et al., 2023)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmtl import taskvec
from tests.taskvec.helpers import float64, mlp_apply, mlp_params, random_like

SIZES = (4, 6, 5)  # features of width 5 read by per-task heads


def test_normalized_accuracy_and_addition_selection_by_hand():
    alphas = jnp.array([0.0, 0.5, 1.0])
    acc = jnp.array([[0.25, 0.75], [0.5, 0.5], [0.75, 0.125]])  # exact binary fractions
    ft = jnp.array([0.5, 1.0])
    np.testing.assert_array_equal(taskvec.normalized_accuracy(acc, ft)[0], [0.5, 0.75])
    # mean normalized accuracies 0.5, 0.5, 0.4375: the first of the tied maxima
    assert int(taskvec.select_addition_alpha(alphas, acc, jnp.array([1.0, 1.0]))) == 0
    assert int(taskvec.select_addition_alpha(alphas, acc, jnp.array([1.0, 0.5]))) == 0
    # normalizing changes the choice: task 1 is hard (fine-tuned 0.5) -> 0.625, 0.75, 0.8125
    assert int(taskvec.select_addition_alpha(alphas, acc, ft)) == 2
    jitted = jax.jit(taskvec.select_addition_alpha)
    assert int(jitted(alphas, acc, ft)) == 2


def test_negation_selection_by_hand():
    alphas = jnp.array([0.0, 0.25, 0.5, 0.75])
    target = jnp.array([0.9, 0.5, 0.2, 0.2])
    control = jnp.array([0.80, 0.79, 0.76, 0.70])
    index, found = taskvec.select_negation_alpha(alphas, target, control, 0.8)
    assert (int(index), bool(found)) == (2, True)  # 0.76 >= 0.95 * 0.8 = 0.76
    index, found = taskvec.select_negation_alpha(alphas, target, control, 0.8, threshold=1.0)
    assert (int(index), bool(found)) == (0, True)
    index, found = taskvec.select_negation_alpha(alphas, target, control - 0.5, 0.8)
    assert not bool(found)


def _heads(seed, num_classes=(3, 4)):
    rng = np.random.default_rng(seed)
    weights = [jnp.asarray(rng.normal(size=(SIZES[-1], c)), jnp.float64) for c in num_classes]
    return [lambda z, w=w: z @ w for w in weights]


def _task_data(seed, num_classes=(3, 4), n=12):
    rng = np.random.default_rng(seed)
    return [
        (
            jnp.asarray(rng.normal(size=(n, SIZES[0])), jnp.float64),
            jnp.asarray(rng.integers(0, c, n), jnp.int32),
        )
        for c in num_classes
    ]


def _accuracy(apply_fn, params, x, y, head):
    return float(np.mean(np.argmax(np.asarray(head(apply_fn(params, x))), -1) == np.asarray(y)))


@pytest.mark.parametrize("mode", ["nonlinear", "linear"])
def test_edit_accuracies_match_one_evaluation_per_setting(mode):
    with float64():
        p0 = mlp_params(0, SIZES, jnp.float64)
        taus = [random_like(s, p0) for s in (1, 2)]
        (x, y), _ = _task_data(3)
        head = _heads(4)[0]
        grid = jnp.asarray(np.random.default_rng(5).normal(size=(6, 2)))
        got = taskvec.edit_accuracies(mlp_apply, p0, taus, grid, x, y, head=head, mode=mode)
        model = mlp_apply if mode == "nonlinear" else taskvec.linearize(mlp_apply, p0)
        want = [_accuracy(model, taskvec.apply(p0, taus, c), x, y, head) for c in grid]
        np.testing.assert_allclose(got, want)


@pytest.mark.parametrize("pad_to", [None, 16])
@pytest.mark.parametrize("mode", ["nonlinear", "linear"])
def test_task_addition_driver_follows_the_protocol(mode, pad_to):
    with float64():
        p0 = mlp_params(0, SIZES, jnp.float64)
        taus = [random_like(s, p0, scale=0.7) for s in (1, 2)]
        heads = _heads(4)
        validation, test = _task_data(5), _task_data(6)
        ft_val, ft_test = jnp.array([0.9, 0.8]), jnp.array([0.85, 0.75])
        alphas = jnp.linspace(0.0, 1.5, 7)
        result = taskvec.task_addition(
            mlp_apply, p0, taus, validation=validation, test=test,
            finetuned_validation_accuracies=ft_val, finetuned_test_accuracies=ft_test,
            alphas=alphas, heads=heads, mode=mode, pad_to=pad_to,
        )  # fmt: skip
        model = mlp_apply if mode == "nonlinear" else taskvec.linearize(mlp_apply, p0)

        def accuracies(data, alpha):
            params = taskvec.apply(p0, taus, alpha)
            return [
                _accuracy(model, params, x, y, h) for (x, y), h in zip(data, heads, strict=True)
            ]

        val = np.array([accuracies(validation, a) for a in np.asarray(alphas)])
        np.testing.assert_allclose(result.validation_accuracies, val)
        best = int(np.argmax((val / np.asarray(ft_val)).mean(axis=1)))
        assert result.index == best and result.alpha == pytest.approx(float(alphas[best]))
        np.testing.assert_allclose(result.test_accuracies, accuracies(test, alphas[best]))
        np.testing.assert_allclose(
            result.test_normalized, np.asarray(accuracies(test, alphas[best])) / ft_test
        )
        np.testing.assert_allclose(result.test_accuracies_alpha_one, accuracies(test, 1.0))


@pytest.mark.parametrize("pad_to", [None, 16])
@pytest.mark.parametrize("mode", ["nonlinear", "linear"])
def test_task_negation_driver_follows_the_protocol(mode, pad_to):
    with float64():
        p0 = mlp_params(0, SIZES, jnp.float64)
        tau = random_like(1, p0, scale=0.1)
        head, control_head = _heads(7)
        # labels = theta_0's own predictions: accuracies start at 1 and fall with alpha, so
        # the control constraint excludes part of the grid
        own = lambda x, h: jnp.argmax(h(mlp_apply(p0, x)), -1).astype(jnp.int32)
        (xv, _), (xcv, _) = _task_data(8, n=40)
        (xt, _), (xct, _) = _task_data(9, n=40)
        yv, ycv, yt, yct = (
            own(xv, head),
            own(xcv, control_head),
            own(xt, head),
            own(xct, control_head),
        )
        alphas = jnp.linspace(0.0, 2.0, 9)
        result = taskvec.task_negation(
            mlp_apply, p0, tau, validation=(xv, yv), control_validation=(xcv, ycv),
            test=(xt, yt), control_test=(xct, yct), alphas=alphas, head=head,
            control_head=control_head, threshold=0.9, mode=mode, pad_to=pad_to,
        )  # fmt: skip
        model = mlp_apply if mode == "nonlinear" else taskvec.linearize(mlp_apply, p0)
        params = lambda a: taskvec.apply(p0, [tau], -a)
        target = np.array([_accuracy(model, params(a), xv, yv, head) for a in alphas])
        control = np.array([_accuracy(model, params(a), xcv, ycv, control_head) for a in alphas])
        reference = _accuracy(mlp_apply, p0, xcv, ycv, control_head)
        feasible = control >= 0.9 * reference
        best = int(np.argmin(np.where(feasible, target, np.inf)))
        np.testing.assert_allclose(result.validation_target, target)
        np.testing.assert_allclose(result.validation_control, control)
        assert result.pretrained_validation_control == pytest.approx(reference)
        assert 0 < feasible.sum() < len(feasible) and best > 0  # the constraint binds
        assert result.index == best and result.found == bool(feasible.any())
        a = float(alphas[best])
        assert result.test_target == pytest.approx(_accuracy(model, params(a), xt, yt, head))
        assert result.test_control == pytest.approx(
            _accuracy(model, params(a), xct, yct, control_head)
        )
        assert result.pretrained_test_target == pytest.approx(
            _accuracy(mlp_apply, p0, xt, yt, head)
        )


def test_bad_inputs_are_reported():
    alphas = jnp.array([0.0, 1.0])
    with pytest.raises(ValueError, match="val_accuracies"):
        taskvec.select_addition_alpha(alphas, jnp.ones((3, 2)), jnp.ones(2))
    with pytest.raises(ValueError, match="accuracies"):
        taskvec.select_addition_alpha(alphas, jnp.ones((2, 3)), jnp.ones(2))
    with pytest.raises(TypeError, match="alphas"):
        taskvec.select_addition_alpha(jnp.array([0, 1]), jnp.ones((2, 2)), jnp.ones(2))
    with pytest.raises(ValueError, match="threshold"):
        taskvec.select_negation_alpha(alphas, jnp.ones(2), jnp.ones(2), 1.0, threshold=0.0)
    with pytest.raises(ValueError, match="control_accuracies"):
        taskvec.select_negation_alpha(alphas, jnp.ones(2), jnp.ones(3), 1.0)
    with pytest.raises(ValueError, match="pretrained_control_accuracy"):
        taskvec.select_negation_alpha(alphas, jnp.ones(2), jnp.ones(2), jnp.ones(2))
    p0 = mlp_params(0, SIZES)
    x = jnp.ones((3, SIZES[0]))
    with pytest.raises(ValueError, match="y"):
        taskvec.edit_accuracies(mlp_apply, p0, [p0], alphas, x, jnp.ones(3))
    with pytest.raises(ValueError, match="validation"):
        taskvec.task_addition(
            mlp_apply, p0, [p0, p0], validation=[(x, jnp.zeros(3, jnp.int32))],
            test=[], finetuned_validation_accuracies=jnp.ones(2),
            finetuned_test_accuracies=jnp.ones(2), alphas=alphas,
        )  # fmt: skip


def test_padded_edit_accuracies_equal_unpadded_and_reject_short_padding():
    """Padding the grid on the host shares one compilation and leaves every value as it was."""
    with float64():
        p0 = mlp_params(0, SIZES, jnp.float64)
        taus = taskvec.stack([random_like(s, p0) for s in (1, 2)])
        (x, y), _ = _task_data(3)
        head = _heads(4)[0]
        grid = jnp.asarray(np.random.default_rng(5).normal(size=(5, 2)))
        plain = taskvec.edit_accuracies(mlp_apply, p0, taus, grid, x, y, head=head)
        pad = taskvec.padded_edit_accuracies
        padded = pad(mlp_apply, p0, taus, grid, x, y, head=head, pad_to=9)
        np.testing.assert_array_equal(padded, np.asarray(plain))
        with pytest.raises(ValueError, match="pad_to"):
            pad(mlp_apply, p0, taus, grid, x, y, head=head, pad_to=4)
