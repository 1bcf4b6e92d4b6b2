"""The HMM's amortized E-step (hmm.fit_chain_encoder) on models it cannot serve: a clear
error instead of NaN."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emvi import hmm

EMISSION = hmm.Categorical(3)


def _batch_and_params():
    p = hmm.HMMParams(
        jnp.array([0.6, 0.4]),
        jnp.array([[0.9, 0.1], [0.2, 0.8]]),
        hmm.CategoricalParams(jnp.array([[0.8, 0.1, 0.1], [0.1, 0.2, 0.7]])),
    )
    x = np.array([[0, 1, 2, 2, 0], [2, 2, 1, 0, 0]])
    return hmm.make_batch(x, np.array([5, 3]), emission=EMISSION), p


def test_encoder_on_a_model_with_full_support_trains_to_a_finite_elbo():
    batch, p = _batch_and_params()
    amortized, state = hmm.fit_chain_encoder(
        jax.random.key(0), p, batch, emission=EMISSION, hidden=(4,), num_steps=3
    )
    q = amortized.q_of(state.variables, batch)
    gap = hmm.inference_gaps(jax.random.key(0), p, q, batch, emission=EMISSION)["amortized"]
    assert np.all(np.isfinite(gap)) and np.all(gap >= -1e-12)


@pytest.mark.parametrize("where", ["transition", "initial"])
def test_a_zero_probability_in_the_chain_is_a_clear_error(where):
    """A zero in pi or A (maximum-likelihood EM can set one) gives every chain q with finite
    potentials an ELBO of -inf (its paths through that entry have mass in q, not in p):
    before the check, training ran on NaN gradients and every reported gap was NaN."""
    batch, p = _batch_and_params()
    if where == "transition":
        p = p._replace(transition=jnp.array([[1.0, 0.0], [0.2, 0.8]]))
    else:
        p = p._replace(initial=jnp.array([1.0, 0.0]))
    with pytest.raises(ValueError, match=r"-inf or NaN for 2 of 2 sequences.*1 zero entries"):
        hmm.fit_chain_encoder(jax.random.key(0), p, batch, emission=EMISSION, num_steps=2)


def test_a_diverging_encoder_is_a_clear_error():
    batch, p = _batch_and_params()
    with pytest.raises(ValueError, match="diverged"):
        hmm.fit_chain_encoder(
            jax.random.key(0), p, batch, emission=EMISSION, num_steps=2, learning_rate=np.nan
        )
