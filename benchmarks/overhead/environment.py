"""What a run is measured on: the versions and the machine, the CPU other
processes used meanwhile, and the `tf.distribute` strategy every model is
built under (``--strategy mirrored``)."""

from __future__ import annotations

import contextlib
import os
import platform
from typing import Any

import keras

TF_LOGICAL_CPUS = 2

# The `tf.distribute` strategy every model is built and compiled under, if any
# (`use_mirrored_strategy`).
_strategy: Any = None


def use_mirrored_strategy() -> None:
    """Builds every model under a ``tf.distribute.MirroredStrategy`` over
    ``TF_LOGICAL_CPUS`` logical CPUs, made from the machine's CPU here.

    TensorFlow configures logical devices only before it initialises its
    runtime: this runs before any TensorFlow op.
    """
    global _strategy
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * TF_LOGICAL_CPUS
        )
    except RuntimeError as error:
        raise SystemExit(
            f"--strategy mirrored: TensorFlow was initialised before its CPU "
            f"could be split into {TF_LOGICAL_CPUS} logical devices ({error})"
        ) from error
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    _strategy = tf.distribute.MirroredStrategy(devices)


def strategy_in_use() -> bool:
    """Whether the models are built under `use_mirrored_strategy`'s strategy."""
    return _strategy is not None


def strategy_scope() -> contextlib.AbstractContextManager:
    """The scope models are built and compiled in."""
    return _strategy.scope() if _strategy is not None else contextlib.nullcontext()


def strategy_label(result: dict[str, Any]) -> str:
    """The strategy of a result, for a table's title."""
    if not result.get("strategy"):
        return ""
    return f", MirroredStrategy on {TF_LOGICAL_CPUS} logical CPUs"


def other_cpu_seconds() -> float:
    """CPU seconds used machine-wide (``/proc/stat``) minus this process and children.

    A difference of it over a run shows whether other processes shared the cores.
    """
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    busy = sum(fields[:3]) + sum(fields[5:8])  # user nice system, irq softirq steal
    own = os.times()
    mine = own.user + own.system + own.children_user + own.children_system
    return busy / os.sysconf("SC_CLK_TCK") - mine


def environment() -> dict[str, str]:
    """Versions and machine facts recorded with the results."""
    env = {
        "python": platform.python_version(),
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
        "cpus": str(os.cpu_count()),
        "machine": platform.machine(),
    }
    backend_module = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
    module = __import__(backend_module[keras.backend.backend()])
    env[keras.backend.backend()] = module.__version__
    return env
