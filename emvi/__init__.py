"""emvi: EM and variational inference as two ways of maximising the same ELBO.

    log p(x) = ELBO(q) + KL(q(z) || p(z | x)).

EM takes q to be the exact posterior (the bound touches the likelihood) and then
raises E_q[log p(x, z)] in closed form; a VAE takes q from an amortized encoder and
raises the Monte Carlo ELBO by gradient steps on encoder and decoder together.
"""

__version__ = "0.1.0"
