"""emvi.optim: the optax step loop and the L-BFGS loop, against closed-form minima."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from emvi import optim


def _quadratic(seed=0, d=5):
    """L(x) = x'Ax / 2 - b'x with A SPD: the minimum A^{-1} b is the float64 oracle."""
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(d, d))
    a = m @ m.T + 0.5 * np.eye(d)
    b = rng.normal(size=d)
    loss = lambda x: 0.5 * x @ jnp.asarray(a) @ x - jnp.asarray(b) @ x
    return loss, a, b


def test_run_lbfgs_in_chunks_stops_at_the_tolerance_near_the_closed_form_minimum():
    loss, a, b = _quadratic()
    # A backtracking line search: the loop is under test, not optax's zoom search, which
    # takes far longer to compile.
    search = optax.scale_by_backtracking_linesearch(max_backtracking_steps=20, store_grad=True)
    opt = optax.lbfgs(linesearch=search)
    x = jnp.zeros(5)
    s = opt.init(x)
    run = jax.jit(lambda x, s: optim.run_lbfgs(loss, opt, x, s, 2, grad_tol=1e-9))
    losses, calls = [float(loss(x))], 0
    while calls < 100:  # chunks of at most 2 steps, each continuing from the last state
        x, s, steps, gnorm = run(x, s)
        calls += 1
        losses.append(float(loss(x)))
        assert 1 <= int(steps) <= 2
        if float(gnorm) < 1e-9:
            break
    assert float(gnorm) < 1e-9 and calls > 1
    assert losses[1] < losses[0]
    # ||x - x*|| <= ||grad|| / lambda_min(A) for a quadratic (grad = A (x - x*)).
    bound = 1e-9 / np.linalg.eigvalsh(a)[0]
    np.testing.assert_allclose(x, np.linalg.solve(a, b), rtol=0, atol=bound)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_run_steps_reaches_the_minimum_in_the_input_dtype(dtype):
    loss, a, b = _quadratic(seed=2, d=3)
    opt = optax.adam(0.1)
    x0 = jnp.zeros(3, dtype)
    lossd = lambda x, t: loss(x.astype(jnp.float64)).astype(dtype)
    x, _, losses = jax.jit(lambda x: optim.run_steps(lossd, opt, x, opt.init(x), 3000))(x0)
    assert x.dtype == dtype and losses.shape == (3000,)
    # Adam at 0.1 ends within its step size of the minimum.
    np.testing.assert_allclose(x, np.linalg.solve(a, b), atol=0.1)
