"""The structured masks and the halting arithmetic against plain-loop definitions.

The model never builds the dense T(K+1) x T(K+1) mask; it runs K+1 passes with
`stepwise_pass_mask`. These tests prove the passes together are exactly the dense stepwise mask
(docs/method.md), and that exit mass and KV exposure follow docs/method.md as written
out token by token.
"""

import itertools

import torch

from megatron_lcot.model.engine import LatentKVStore, LatentPass
from megatron_lcot.model.halting import LivePacking, exit_mass
from megatron_lcot.model.masking import (
    interleaved_dense_mask,
    interleaved_positions,
    stepwise_dense_mask,
    stepwise_pass_mask,
)


def test_stepwise_dense_mask_is_the_definition():
    T, K = 5, 3
    mask = stepwise_dense_mask(T, K)
    for (t, k), (u, j) in itertools.product(itertools.product(range(T), range(K + 1)), repeat=2):
        assert mask[k * T + t, j * T + u] == (u <= t and j <= k), (t, k, u, j)


def test_stepwise_passes_tile_the_dense_mask():
    """Pass k's mask equals the dense mask's rows of step k over the columns of steps 0..k, and
    the dense mask has nothing in the columns of later steps."""
    T, K = 6, 3
    dense = stepwise_dense_mask(T, K)
    for k in range(K + 1):
        rows = dense[k * T : (k + 1) * T]
        assert torch.equal(stepwise_pass_mask(T, k), rows[:, : (k + 1) * T])
        assert not rows[:, (k + 1) * T :].any()


def test_interleaved_layout_positions_and_mask():
    T, K = 4, 2
    assert interleaved_positions(T, K).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    mask = interleaved_dense_mask(T, K)
    # slot (t,k) is index t(K+1)+k; it sees (u,j) iff u < t, or u == t and j <= k
    for t, k, u, j in itertools.product(range(T), range(K + 1), range(T), range(K + 1)):
        assert mask[t * (K + 1) + k, u * (K + 1) + j] == (u < t or (u == t and j <= k))


def test_exit_mass_matches_token_by_token_definition():
    """e(t,k) = r_k (1 - g_k) while the next step runs; the last executed step takes the rest."""
    torch.manual_seed(0)
    K, T = 4, 50
    gates = torch.rand(K, T)
    reach = torch.cat([torch.ones(1, T), torch.cumprod(gates, 0)])  # [K+1, T]
    tau = 0.2
    executed = torch.cummin(reach >= tau, dim=0).values
    mass = exit_mass(reach, executed)
    for t in range(T):
        last = max(k for k in range(K + 1) if executed[k, t])
        for k in range(K + 1):
            if k < last:
                expected = reach[k, t] * (1 - gates[k, t])
            elif k == last:
                expected = reach[k, t]
            else:
                expected = 0.0
            torch.testing.assert_close(mass[k, t], torch.as_tensor(expected), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(mass.sum(0), torch.ones(T))
    assert (executed.sum(0) < K + 1).any() and (executed.sum(0) > 1).any()  # a real mix of stops


def test_kv_reuse_exposes_last_executed_step():
    """A token that does not execute step k exposes, at step k, the keys/values it exposed at
    step k-1; executing tokens (whose keys arrive packed: only they are computed) expose their
    new ones; the store returns steps 0..k in order."""
    T, b, g, d = 3, 2, 1, 4
    store = LatentKVStore()
    store.begin(T)
    k0, v0 = torch.randn(T, b, g, d), torch.randn(T, b, g, d)
    LatentPass(store, 0, 1).expose(1, k0, v0)
    executing = torch.tensor([[True, False], [False, True], [True, True]])
    k1, v1 = torch.randn(T, b, g, d), torch.randn(T, b, g, d)
    live = LivePacking(executing, live=4, widest=2)
    keys, values = LatentPass(store, 1, 2, live).expose(1, live.gather(k1), live.gather(v1))
    assert keys.shape == (2 * T, b, g, d)
    torch.testing.assert_close(keys[:T], k0)
    for t, i in itertools.product(range(T), range(b)):
        source_k, source_v = (k1, v1) if executing[t, i] else (k0, v0)
        torch.testing.assert_close(keys[T + t, i], source_k[t, i])
        torch.testing.assert_close(values[T + t, i], source_v[t, i])
    # a re-run of pass 1 (e.g. activation recompute) overwrites its entry instead of appending
    keys_again, _ = LatentPass(store, 1, 2, live).expose(1, live.gather(k1), live.gather(v1))
    assert keys_again.shape == keys.shape
