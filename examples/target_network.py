"""Target network: Q-learning with a Polyak-averaged target in a custom loop.

A chain of states 0 .. N-1 whose two ends are terminal: stepping into the
right end pays 1, into the left end 0.5, and an action (left or right) slips
the other way with probability 0.1. With the discount 0.85, the optimal
policy goes left from the first few states and right from the others. A
replay buffer of transitions sampled from the chain trains a Q-network (the
states one-hot, two Q-values out) by minibatch regression on the targets
``y = r + gamma * max_a target(s')`` (DQN without exploration: fitted
Q-iteration on the buffer). The target network is ``ema.averaged_model()``
of an ``EMA(schedule=ConstantSchedule(0.995))`` bound to the Q-network with
``ema.set_model``: Polyak averaging with ``tau = 0.005``, updated by
``ema.update()`` after each optimizer step of the loop, with nothing to
copy. The same training then runs with the Q-network as its own target (no
target network) for comparison.

The loop is written with ``keras.ops`` and ``optimizer.apply``; only the
gradient is backend-specific (a small function per backend). The script
prints, per state, the exact Q-values (value iteration on the chain's model)
beside the learned ones, the greedy policies, and the largest Q error::

    KERAS_BACKEND=jax python examples/target_network.py

``--quick`` trains fewer steps, as CI does.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np
from keras import layers
from keras import ops

import keras_ema

N_STATES = 9
GAMMA = 0.85
SLIP = 0.1
REWARD_LEFT = 0.5
REWARD_RIGHT = 1.0
TAU = 0.005
BUFFER_SIZE = 4096
BATCH_SIZE = 64
LEARNING_RATE = 1e-3
ACTIONS = "<>"  # 0: left, 1: right


@dataclass
class Chain:
    """A finite MDP: `transitions[s, a, s2]` is the probability of `s2`
    after action `a` in state `s`, `rewards[s, a, s2]` what that pays, and
    `terminal[s]` whether `s` ends the episode (its value is 0)."""

    transitions: np.ndarray
    rewards: np.ndarray
    terminal: np.ndarray

    @property
    def n_states(self) -> int:
        return self.transitions.shape[0]


def make_chain(
    n_states: int = N_STATES,
    slip: float = SLIP,
    reward_left: float = REWARD_LEFT,
    reward_right: float = REWARD_RIGHT,
) -> Chain:
    """The chain of the docstring: both ends terminal, paying `reward_left`
    and `reward_right` on arrival; an action goes its way with probability
    `1 - slip` and the other way otherwise."""
    transitions = np.zeros((n_states, 2, n_states))
    rewards = np.zeros((n_states, 2, n_states))
    terminal = np.zeros(n_states, dtype=bool)
    terminal[[0, n_states - 1]] = True
    for state in range(1, n_states - 1):
        for action, step in ((0, -1), (1, 1)):
            transitions[state, action, state + step] += 1.0 - slip
            transitions[state, action, state - step] += slip
    rewards[:, :, 0] = reward_left
    rewards[:, :, n_states - 1] = reward_right
    return Chain(transitions, rewards, terminal)


def value_iteration(chain: Chain, gamma: float, tol: float = 1e-12) -> np.ndarray:
    """The optimal Q-values, `Q[s, a]` (0 in terminal states), by iterating
    the Bellman optimality operator until it moves less than `tol`."""
    q = np.zeros(chain.transitions.shape[:2])
    expected_reward = np.sum(chain.transitions * chain.rewards, axis=-1)
    while True:
        values = np.where(chain.terminal, 0.0, q.max(axis=1))
        updated = expected_reward + gamma * chain.transitions @ values
        updated[chain.terminal] = 0.0
        if np.max(np.abs(updated - q)) < tol:
            return updated
        q = updated


def sample_buffer(chain: Chain, size: int, rng: np.random.Generator) -> dict:
    """`size` transitions from uniformly drawn non-terminal states and
    actions, as arrays `state`, `action`, `reward`, `next_state`, `done`."""
    states = rng.choice(np.flatnonzero(~chain.terminal), size=size)
    actions = rng.integers(0, 2, size=size)
    next_states = np.array(
        [
            rng.choice(chain.n_states, p=chain.transitions[s, a])
            for s, a in zip(states, actions, strict=True)
        ]
    )
    return {
        "state": states,
        "action": actions.astype("int32"),
        "reward": chain.rewards[states, actions, next_states].astype("float32"),
        "next_state": next_states,
        "done": chain.terminal[next_states].astype("float32"),
    }


def one_hot(states: np.ndarray, n_states: int) -> np.ndarray:
    return np.eye(n_states, dtype="float32")[states]


def build_q_network(n_states: int) -> keras.Model:
    """One-hot state -> 64 ReLU -> 64 ReLU -> a Q-value per action."""
    return keras.Sequential(
        [
            keras.Input(shape=(n_states,)),
            layers.Dense(64, activation="relu"),
            layers.Dense(64, activation="relu"),
            layers.Dense(2),
        ],
        name="q_network",
    )


def td_loss(q_values, actions, targets):
    """The squared error of the Q-values of the actions taken."""
    taken = ops.take_along_axis(q_values, ops.expand_dims(actions, 1), axis=1)
    return ops.mean(ops.square(ops.squeeze(taken, 1) - targets))


# One optimizer step on `td_loss`: the backend-specific part of the loop,
# the gradient (and, on TensorFlow, a `tf.function` around the step).


def optimizer_step_tensorflow(q_network: keras.Model, optimizer) -> Callable:
    import tensorflow as tf

    @tf.function
    def step(states, actions, targets):
        with tf.GradientTape() as tape:
            loss = td_loss(q_network(states, training=True), actions, targets)
        grads = tape.gradient(loss, q_network.trainable_variables)
        optimizer.apply(grads, q_network.trainable_variables)

    return step


def optimizer_step_jax(q_network: keras.Model, optimizer) -> Callable:
    import jax

    def loss_of(trainable, non_trainable, states, actions, targets):
        q_values, _ = q_network.stateless_call(
            trainable, non_trainable, states, training=True
        )
        return td_loss(q_values, actions, targets)

    gradient = jax.jit(jax.grad(loss_of))

    def step(states, actions, targets):
        trainable = [v.value for v in q_network.trainable_variables]
        non_trainable = [v.value for v in q_network.non_trainable_variables]
        grads = gradient(trainable, non_trainable, states, actions, targets)
        optimizer.apply(grads, q_network.trainable_variables)

    return step


def optimizer_step_torch(q_network: keras.Model, optimizer) -> Callable:
    def step(states, actions, targets):
        q_network.zero_grad()
        loss = td_loss(q_network(states, training=True), actions, targets)
        loss.backward()
        grads = [v.value.grad for v in q_network.trainable_variables]
        optimizer.apply(grads, q_network.trainable_variables)

    return step


OPTIMIZER_STEPS = {
    "tensorflow": optimizer_step_tensorflow,
    "jax": optimizer_step_jax,
    "torch": optimizer_step_torch,
}


def train(
    chain: Chain, buffer: dict, steps: int, seed: int, use_target: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Trains a Q-network on `buffer`; returns its Q-values on every state
    and, with `use_target`, those of its target network."""
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    q_network = build_q_network(chain.n_states)
    optimizer = keras.optimizers.Adam(LEARNING_RATE)
    optimizer.build(q_network.trainable_variables)
    target = q_network
    if use_target:
        ema = keras_ema.EMA(schedule=keras_ema.ConstantSchedule(1.0 - TAU))
        ema.set_model(q_network)
        target = ema.averaged_model()
    optimizer_step = OPTIMIZER_STEPS[keras.backend.backend()](q_network, optimizer)
    states = one_hot(buffer["state"], chain.n_states)
    next_states = one_hot(buffer["next_state"], chain.n_states)
    for _ in range(steps):
        batch = rng.integers(0, len(states), size=BATCH_SIZE)
        next_values = ops.max(target(next_states[batch]), axis=1)
        discount = GAMMA * (1.0 - buffer["done"][batch])
        targets = ops.stop_gradient(
            ops.add(buffer["reward"][batch], ops.multiply(discount, next_values))
        )
        optimizer_step(states[batch], buffer["action"][batch], targets)
        if use_target:
            ema.update()  # the target moves by tau towards the Q-network
    every_state = np.eye(chain.n_states, dtype="float32")
    online = q_network.predict(every_state, verbose=0)
    averaged = target.predict(every_state, verbose=0) if use_target else None
    return online, averaged


def policy(q: np.ndarray, terminal: np.ndarray) -> str:
    """The greedy action per state (`.` for terminal states)."""
    return "".join(
        "." if end else ACTIONS[int(np.argmax(row))]
        for row, end in zip(q, terminal, strict=True)
    )


def max_error(q: np.ndarray, exact: np.ndarray, terminal: np.ndarray) -> float:
    return float(np.max(np.abs(q - exact)[~terminal]))


def print_q_table(columns: dict[str, np.ndarray], terminal: np.ndarray) -> None:
    names = list(columns)
    print("\nQ(s, left) / Q(s, right) per state:")
    print(f"{'s':>2} | " + " | ".join(f"{name:>15}" for name in names))
    for state in np.flatnonzero(~terminal):
        cells = [
            f"{columns[n][state, 0]:7.4f}/{columns[n][state, 1]:7.4f}" for n in names
        ]
        print(f"{state:>2} | " + " | ".join(cells))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--quick", action="store_true", help="1000 steps (CI's size)")
    args = parser.parse_args()
    if args.quick:
        args.steps = 1000
    return args


def main() -> None:
    args = parse_args()
    print(f"Keras {keras.version()}, backend {keras.backend.backend()}")
    chain = make_chain()
    exact = value_iteration(chain, GAMMA)
    buffer = sample_buffer(chain, BUFFER_SIZE, np.random.default_rng(args.seed))
    online, averaged = train(chain, buffer, args.steps, args.seed, use_target=True)
    alone, _ = train(chain, buffer, args.steps, args.seed, use_target=False)
    columns = {
        "exact": exact,
        "target network": averaged,
        "its Q-network": online,
        "no target": alone,
    }
    print(f"{args.steps} steps, tau {TAU}, gamma {GAMMA}, slip {SLIP}")
    print_q_table(columns, chain.terminal)
    print(f"\n{'':>16} | greedy policy | max |Q - Q*|")
    for name, q in columns.items():
        print(
            f"{name:>16} | {policy(q, chain.terminal):>13} | "
            f"{max_error(q, exact, chain.terminal):.4f}"
        )


if __name__ == "__main__":
    main()
