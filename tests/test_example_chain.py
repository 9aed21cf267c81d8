"""The chain MDP and the value iteration of examples/target_network.py,
against closed forms and an independent policy evaluation."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import target_network  # noqa: E402


def test_transitions_are_distributions_from_non_terminal_states():
    chain = target_network.make_chain(n_states=7, slip=0.2)
    sums = chain.transitions.sum(axis=-1)
    np.testing.assert_allclose(sums[~chain.terminal], 1.0)
    np.testing.assert_array_equal(sums[chain.terminal], 0.0)
    assert chain.terminal.tolist() == [True] + [False] * 5 + [True]


@pytest.mark.parametrize("gamma", [0.5, 0.9])
def test_value_iteration_without_slip_matches_the_closed_form(gamma):
    # Without slip, state s reaches the left end in s - 1 steps after the
    # first and the right end in n - 2 - s: Q(s, a) is the arrival reward
    # when `a` ends the episode, else gamma times the best of the two values
    # of the next state.
    n, left, right = 8, 0.5, 1.0
    chain = target_network.make_chain(
        n_states=n, slip=0.0, reward_left=left, reward_right=right
    )
    q = target_network.value_iteration(chain, gamma)

    def value(state):
        return max(left * gamma ** (state - 1), right * gamma ** (n - 2 - state))

    expected = np.zeros((n, 2))
    for state in range(1, n - 1):
        for action, step in ((0, -1), (1, 1)):
            after = state + step
            if after == 0:
                expected[state, action] = left
            elif after == n - 1:
                expected[state, action] = right
            else:
                expected[state, action] = gamma * value(after)
    np.testing.assert_allclose(q, expected, rtol=0, atol=1e-10)


def test_value_iteration_with_slip_is_the_value_of_its_greedy_policy():
    # Q* is the action value of the greedy policy it defines: solved here as
    # a linear system, Q = R + gamma * P V, V = Q[s, pi(s)], not iterated.
    gamma = 0.85
    chain = target_network.make_chain()
    q = target_network.value_iteration(chain, gamma)
    n = chain.n_states
    policy = q.argmax(axis=1)
    inner = np.flatnonzero(~chain.terminal)
    expected_reward = (chain.transitions * chain.rewards).sum(axis=-1)
    p_policy = chain.transitions[np.arange(n), policy][np.ix_(inner, inner)]
    r_policy = expected_reward[np.arange(n), policy][inner]
    values = np.zeros(n)
    values[inner] = np.linalg.solve(np.eye(len(inner)) - gamma * p_policy, r_policy)
    expected = expected_reward + gamma * chain.transitions @ values
    expected[chain.terminal] = 0.0
    np.testing.assert_allclose(q, expected, rtol=0, atol=1e-10)
    assert target_network.policy(q, chain.terminal) == ".<<>>>>>."
