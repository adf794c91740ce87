"""`jaxft.models.layers.linear`: every `Dense` (and the tied head) multiplies through it, with a backward
pass written out for XLA on CPU. It must give autodiff's gradients exactly, whichever operand it moves."""

import numpy as np
import pytest


@pytest.mark.parametrize("einsum, x_shape, w_shape", [
    ("BTD,DF->BTF", (2, 5, 3), (3, 7)),          # MLP input projection: x smaller than g, x is moved
    ("BTF,FD->BTD", (2, 5, 7), (7, 3)),          # MLP output projection: g smaller, g is moved
    ("BTD,DNH->BTNH", (2, 5, 6), (6, 3, 4)),     # q/k/v projections
    ("BTNH,NHD->BTD", (2, 5, 3, 4), (3, 4, 6)),  # attention output: two input dims
    ("BTD,DCNH->BTCNH", (2, 5, 6), (6, 3, 2, 4)),  # GPT-2's fused c_attn
    ("BD,DC->BC", (4, 6), (6, 5)),               # BERT's pooler / classifier (no length axis)
    ("BTD,VD->BTV", (2, 5, 6), (11, 6)),         # the tied head: the kernel is the embedding [V, D]
])
def test_linear_backward_equals_autodiff(einsum, x_shape, w_shape):
    import jax
    import jax.numpy as jnp

    from jaxft.models.layers import linear

    kx, kw, kc = jax.random.split(jax.random.key(0), 3)
    x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
    c = jax.random.normal(kc, jax.eval_shape(lambda: jnp.einsum(einsum, x, w)).shape)

    def ours(x, w):
        return jnp.sum(linear(einsum, x, w) * c)

    def plain(x, w):
        return jnp.sum(jnp.einsum(einsum, x, w) * c)

    np.testing.assert_allclose(ours(x, w), plain(x, w), rtol=1e-6)
    for g_ours, g_plain in zip(jax.jit(jax.grad(ours, (0, 1)))(x, w), jax.grad(plain, (0, 1))(x, w)):
        assert g_ours.shape == g_plain.shape
        np.testing.assert_allclose(np.asarray(g_ours), np.asarray(g_plain), rtol=1e-5, atol=1e-5)
