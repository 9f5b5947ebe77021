"""Slow-mode quality metrics against exact answers: KSG mutual information (Gaussian and circular
closed forms), ROC AUC (Mann-Whitney, binormal closed form), TICA / VAMP-2 / implied timescales on
an AR(1) process whose eigenfunctions and eigenvalues are known, and deeptime as a cross-check."""

import numpy as np
import pytest
from scipy.signal import lfilter
from scipy.stats import norm

from openflow.analysis import basin_separation_auc, mutual_information, roc_auc
from openflow.cv import TICA, implied_timescales, tica, vamp2_score

TWO_PI = 2 * np.pi
# KSG (k = 3) on 10^4 samples: statistical error ~0.01 nats, bias below that for these densities
# (Kraskov et al., PRE 69, 066138, 2004); 0.03 nats is 3 standard errors.
MI_TOLERANCE = 0.03


def wrap(angle):
    return np.angle(np.exp(1j * angle))  # (-pi, pi]


def gaussian_mi(covariance, n_x):
    """Exact I(x; y) of a joint Gaussian whose first n_x variables are x, nats."""
    det = np.linalg.det
    return 0.5 * np.log(det(covariance[:n_x, :n_x]) * det(covariance[n_x:, n_x:]) / det(covariance))


# ----------------------------------------------------------------------------- mutual information


@pytest.mark.parametrize("rho", [0.0, 0.6, 0.9])
def test_mi_of_bivariate_gaussian_matches_closed_form(rho):
    rng = np.random.default_rng(1)
    x = rng.normal(size=10_000)
    y = rho * x + np.sqrt(1 - rho**2) * rng.normal(size=x.size)
    assert mutual_information(x, y) == pytest.approx(-0.5 * np.log(1 - rho**2), abs=MI_TOLERANCE)


def test_mi_of_multivariate_gaussian_matches_closed_form():
    rng = np.random.default_rng(2)
    mixing = np.array([[1.0, 0.0, 0.0], [0.5, 1.0, 0.0], [0.8, -0.6, 0.7]])
    covariance = mixing @ mixing.T
    samples = rng.normal(size=(10_000, 3)) @ mixing.T
    exact = gaussian_mi(covariance, 2)
    assert mutual_information(samples[:, :2], samples[:, 2]) == pytest.approx(exact, abs=MI_TOLERANCE)


def test_mi_of_two_circular_variables_matches_closed_form():
    # x uniform on the circle, y = x + N(0, s^2) wrapped: I = ln(2 pi) - h(noise); the wrapped normal's
    # mass beyond +-pi is 2e-7 at s = 0.6, so h(noise) = ln(2 pi e s^2) / 2 to ~1e-6
    rng = np.random.default_rng(3)
    s = 0.6
    x = rng.uniform(-np.pi, np.pi, 10_000)
    y = wrap(x + s * rng.normal(size=x.size))
    exact = np.log(TWO_PI) - 0.5 * np.log(TWO_PI * np.e * s**2)
    estimate = mutual_information(x, y, period_x=TWO_PI, period_y=TWO_PI)
    assert estimate == pytest.approx(exact, abs=MI_TOLERANCE)
    # on the torus, turning both angles moves no distance: the estimate is unchanged (not so on a line)
    turned = wrap(x + 2.5), wrap(y + 2.5)
    assert mutual_information(*turned, period_x=TWO_PI, period_y=TWO_PI) == pytest.approx(estimate, abs=1e-9)
    assert abs(mutual_information(*turned) - mutual_information(x, y)) > 1e-4


def test_mi_of_wrapped_variable_equals_unwrapped_exactly():
    # y spans less than pi around the cut at +-pi: its minimum-image distances are the unwrapped ones,
    # so the estimator sees the same neighbourhoods
    rng = np.random.default_rng(4)
    x = rng.uniform(-1.2, 1.2, 3000)
    y = np.pi + x + rng.uniform(-0.3, 0.3, x.size)
    wrapped = wrap(y)
    assert (wrapped < 0).any() and (wrapped > 0).any()
    reference = mutual_information(x, y)
    assert reference > 1.0
    assert mutual_information(x, wrapped, period_y=TWO_PI) == pytest.approx(reference, abs=1e-9)
    assert mutual_information(wrapped, x, period_x=TWO_PI) == pytest.approx(reference, abs=1e-9)  # symmetric
    assert mutual_information(x + 100.0, y - 7.0) == pytest.approx(reference, abs=1e-9)  # translation
    assert mutual_information(wrapped + 3 * TWO_PI, x, period_x=TWO_PI) == pytest.approx(reference, abs=1e-9)


@pytest.mark.parametrize(
    "x, y, kwargs, message",
    [
        (np.zeros(10), np.zeros(11), {}, "differ in length"),
        (np.arange(3.0), np.arange(3.0), {}, "more samples than k"),
        (np.array([0.0, np.nan, 1.0, 2.0, 3.0]), np.arange(5.0), {}, "non-finite"),
        (np.arange(5.0), np.arange(5.0), {"k": 0}, "k must be"),
        (np.arange(5.0), np.arange(5.0), {"k": 1.5}, "k must be"),
        (np.arange(5.0), np.arange(5.0), {"period_y": 0.0}, "period_y"),
        (np.zeros((5, 2, 2)), np.arange(5.0), {}, "x must be"),
    ],
)
def test_mi_rejects_bad_input(x, y, kwargs, message):
    with pytest.raises(ValueError, match=message):
        mutual_information(x, y, **kwargs)


# ----------------------------------------------------------------------------- ROC AUC


def test_auc_of_perfect_and_reversed_separation():
    labels = np.repeat([0, 1], 50)
    scores = labels + np.random.default_rng(5).uniform(0, 0.9, labels.size)
    assert roc_auc(scores, labels) == 1.0
    assert roc_auc(-scores, labels) == 0.0
    assert basin_separation_auc(scores, labels) == basin_separation_auc(-scores, labels) == 1.0


@pytest.mark.parametrize("shift", [0.5, 1.5])
def test_auc_of_two_gaussians_matches_binormal_closed_form(shift):
    rng = np.random.default_rng(6)
    n = 4000
    scores = np.concatenate([rng.normal(size=n), shift + rng.normal(size=n)])
    labels = np.repeat([False, True], n)
    exact = norm.cdf(shift / np.sqrt(2))
    q1, q2 = exact / (2 - exact), 2 * exact**2 / (1 + exact)  # Hanley & McNeil (1982) standard error
    standard_error = np.sqrt((exact * (1 - exact) + 2 * (n - 1) * (q1 - exact**2 + q2 - exact**2)) / n**2)
    assert roc_auc(scores, labels) == pytest.approx(exact, abs=4 * standard_error)


def test_auc_counts_ties_as_half():
    # pairs (positive, negative): (2, 1) 1, (2, 2) 1/2, (3, 1) 1, (3, 2) 1 -> 3.5 / 4
    assert roc_auc([1.0, 2.0, 2.0, 3.0], [0, 0, 1, 1]) == 0.875
    assert roc_auc(np.ones(7), [0, 1, 0, 1, 1, 0, 1]) == 0.5
    rng = np.random.default_rng(7)
    scores, labels = rng.integers(0, 5, 300).astype(float), rng.integers(0, 2, 300)
    positive, negative = scores[labels == 1][:, None], scores[labels == 0][None, :]
    brute_force = np.mean((positive > negative) + 0.5 * (positive == negative))
    assert roc_auc(scores, labels) == pytest.approx(brute_force, abs=1e-12)
    assert roc_auc(scores, 2 * labels - 1) == roc_auc(scores, labels.astype(bool)) == roc_auc(scores, labels)


@pytest.mark.parametrize(
    "scores, labels, message",
    [
        ([1.0, 2.0, 3.0], [1, 1, 1], "two classes"),
        ([1.0, 2.0, 3.0], [-1, 0, 1], "two classes"),
        ([1.0, 2.0, 3.0], [0, 1], "shape"),
        ([1.0, np.nan, 3.0], [0, 1, 1], "non-finite"),
    ],
)
def test_auc_rejects_bad_input(scores, labels, message):
    with pytest.raises(ValueError, match=message):
        roc_auc(scores, labels)


# ----------------------------------------------------------------------------- TICA, VAMP-2

RATES = np.array([0.95, 0.8, 0.3])  # AR(1) coefficient of each latent eigenfunction, per frame
FRAME_TIME = 0.1  # ps between frames
N_FRAMES = 200_000


@pytest.fixture(scope="module")
def process():
    """Independent stationary unit-variance AR(1) latents z (T, 3), observed as x = z M^T + c.

    The latents are the exact eigenfunctions of the (reversible) transfer operator in the span of
    the features: eigenvalue RATES**lag, implied timescale -FRAME_TIME / ln(RATES) at every lag.
    """
    rng = np.random.default_rng(8)
    burn_in = 500  # 0.95**500 ~ 1e-11 of the start remains
    noise = rng.normal(size=(N_FRAMES + burn_in, RATES.size))
    latent = np.stack([lfilter([np.sqrt(1 - a**2)], [1, -a], noise[:, i]) for i, a in enumerate(RATES)], 1)[burn_in:]
    mixing = np.array([[1.0, 0.5, 0.2], [0.3, 1.0, -0.4], [0.1, 0.2, 1.0]])
    return latent, latent @ mixing.T + np.array([1.0, -2.0, 3.0])


def autocorrelation_error(a, lag, n=N_FRAMES):
    """Bartlett's standard error of the lag-`lag` autocorrelation estimate of an AR(1) with coefficient a."""
    return np.sqrt(((1 + a**2) * (1 - a ** (2 * lag)) / (1 - a**2) - 2 * lag * a ** (2 * lag)) / n)


def test_tica_recovers_exact_eigenvalues_and_timescales(process):
    latent, x = process
    lag = 2
    model = tica(x, lag)
    assert isinstance(model, TICA) and model.lag == lag and model.eigenvectors.shape == (3, 3)
    tolerance = 4 * autocorrelation_error(RATES, lag)
    np.testing.assert_array_less(np.abs(model.eigenvalues - RATES**lag), tolerance)
    timescales = model.timescales(lag * FRAME_TIME)
    np.testing.assert_allclose(timescales, -lag * FRAME_TIME / np.log(model.eigenvalues), rtol=1e-14)
    exact = -FRAME_TIME / np.log(RATES)
    # d tau / tau = d lambda / (lambda |ln lambda|)
    relative_tolerance = tolerance / (RATES**lag * np.abs(np.log(RATES**lag)))
    np.testing.assert_array_less(np.abs(timescales / exact - 1), relative_tolerance)
    # the slowest component is the slowest latent (sign is arbitrary)
    assert abs(np.corrcoef(model.transform(x)[:, 0], latent[:, 0])[0, 1]) > 0.999
    assert np.isinf(TICA(model.mean, np.array([1.0, -1.0]), model.eigenvectors[:, :2], lag).timescales(1.0)).all()


def test_tica_components_are_whitened_and_decorrelated(process):
    _, x = process
    lag = 3
    model = tica(x, lag)
    now, later = model.transform(x[:-lag]), model.transform(x[lag:])
    n = 2 * now.shape[0]
    np.testing.assert_allclose((now.T @ now + later.T @ later) / n, np.eye(3), atol=1e-10)
    np.testing.assert_allclose((now.T @ later + later.T @ now) / n, np.diag(model.eigenvalues), atol=1e-10)
    assert np.all(np.diff(model.eigenvalues) < 0)
    assert tica(x, lag, dim=2).transform(x).shape == (N_FRAMES, 2)


def test_tica_is_invariant_under_invertible_linear_maps(process):
    _, x = process
    transform = np.array([[2.0, -1.0, 0.3], [0.0, 0.5, 1.0], [1.0, 1.0, 1.0]])
    original, mapped = tica(x, 2), tica(x @ transform + 5.0, 2)
    np.testing.assert_allclose(mapped.eigenvalues, original.eigenvalues, atol=1e-10)
    np.testing.assert_allclose(np.abs(mapped.transform(x @ transform + 5.0)), np.abs(original.transform(x)), atol=1e-7)
    duplicated = tica(np.hstack([x, x[:, :1]]), 2)  # rank-deficient C00: the copy adds nothing
    np.testing.assert_allclose(duplicated.eigenvalues, original.eigenvalues, atol=1e-8)


def test_tica_pools_segments_and_skips_short_ones(process):
    _, x = process
    lag = 2
    first, second = x[:60_000], x[60_000:]
    pooled = tica([first, second], lag)
    np.testing.assert_allclose(tica([second, first], lag).eigenvalues, pooled.eigenvalues, atol=1e-12)
    np.testing.assert_allclose(tica([x, x], lag).eigenvalues, tica(x, lag).eigenvalues, atol=1e-12)
    with_short = tica([first, x[:lag], second, x[5:6]], lag)  # pieces of length <= lag give no pair
    np.testing.assert_array_equal(with_short.eigenvalues, pooled.eigenvalues)
    np.testing.assert_array_equal(with_short.mean, pooled.mean)
    pieces = np.array_split(x, 10)  # drops 9 of ~200 000 pairs
    np.testing.assert_allclose(tica(pieces, lag).eigenvalues, tica(x, lag).eigenvalues, atol=1e-3)


def test_implied_timescales_are_lag_independent_for_a_markov_process(process):
    _, x = process
    lags = [1, 2, 4]
    table = implied_timescales(x, lags, FRAME_TIME, dim=2)
    assert table.shape == (3, 2)
    for row, lag in zip(table, lags):
        np.testing.assert_array_equal(row, tica(x, lag, dim=2).timescales(lag * FRAME_TIME))
        tolerance = 4 * autocorrelation_error(RATES[:2], lag)
        exact = RATES[:2] ** lag
        relative_tolerance = tolerance / (exact * np.abs(np.log(exact)))
        np.testing.assert_array_less(np.abs(row * np.log(RATES[:2]) / -FRAME_TIME - 1), relative_tolerance)
    with pytest.raises(ValueError, match="rank deficient"):
        implied_timescales(np.hstack([x[:, :1], x[:, :1]]), [1], FRAME_TIME, dim=2)


def test_vamp2_score_of_exact_eigenfunctions(process):
    latent, x = process
    lag = 2
    exact = RATES**lag
    tolerance = 4 * np.sqrt(np.sum((2 * exact * autocorrelation_error(RATES, lag)) ** 2))  # d(s^2) = 2 s ds
    assert vamp2_score(latent, lag) == pytest.approx(1 + np.sum(exact**2), abs=tolerance)
    assert vamp2_score(latent, lag, dim=1) == pytest.approx(1 + exact[0] ** 2, abs=tolerance)
    # it rates the span of the features: the mixed observables and their TICA components score the same
    assert vamp2_score(x, lag) == pytest.approx(vamp2_score(latent, lag), abs=1e-10)
    assert vamp2_score(tica(x, lag).transform(x), lag) == pytest.approx(vamp2_score(x, lag), abs=1e-10)
    white_noise = np.random.default_rng(9).normal(size=(20_000, 3))
    assert vamp2_score(white_noise, lag) == pytest.approx(1.0, abs=3e-3)  # E[sum s^2] = d^2 / n


def test_matches_deeptime(process):
    import deeptime  # a test dependency (.[test]): the cross-check always runs

    _, x = process
    lag = 3
    segments = [x[:70_000], x[70_000:150_000], x[150_000:]]
    reference = deeptime.decomposition.TICA(lagtime=lag, epsilon=1e-10, scaling=None).fit(segments).fetch_model()
    ours = tica(segments, lag)
    np.testing.assert_allclose(ours.eigenvalues, reference.singular_values, atol=1e-6)
    np.testing.assert_allclose(np.abs(ours.transform(x)), np.abs(reference.transform(x)), atol=1e-6)
    vamp = deeptime.decomposition.VAMP(lagtime=lag, epsilon=1e-10).fit(segments).fetch_model()
    assert vamp2_score(segments, lag) == pytest.approx(vamp.score(2), abs=1e-6)
    assert vamp2_score(segments, lag, dim=1) == pytest.approx(vamp.score(2, dim=1), abs=1e-6)


@pytest.mark.parametrize(
    "segments, kwargs, message",
    [
        (np.zeros((100, 2, 2)), {}, "must be \\(T, d\\)"),
        (np.zeros(100), {}, "must be \\(T, d\\)"),
        ([np.ones((50, 2)), np.ones((50, 3))], {}, "feature dimension"),
        (np.full((50, 2), np.nan), {}, "non-finite"),
        ([], {}, "empty"),
        (np.ones((50, 2)), {"lag": 0}, "lag must be"),
        (np.ones((50, 2)), {"lag": 1.5}, "lag must be"),
        ([np.ones((3, 2)), np.ones((4, 2))], {"lag": 4}, "no segment is longer"),
        (np.ones((50, 2)), {"dim": 3}, "dim must be"),
        (np.ones((50, 2)), {"epsilon": -1.0}, "epsilon"),
        (np.ones((50, 2)), {}, "constant"),
    ],
)
def test_tica_and_vamp_reject_bad_input(segments, kwargs, message):
    kwargs = {"lag": 1, **kwargs}
    for function in (tica, vamp2_score):
        with pytest.raises(ValueError, match=message):
            function(segments, **kwargs)


def test_model_methods_reject_bad_input(process):
    _, x = process
    model = tica(x[:1000], 1)
    with pytest.raises(ValueError, match="features"):
        model.transform(x[:10, :2])
    with pytest.raises(ValueError, match="lag_time"):
        model.timescales(0.0)
    with pytest.raises(ValueError, match="lags is empty"):
        implied_timescales(x, [], FRAME_TIME, dim=1)
