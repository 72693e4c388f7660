"""The reference epoch: a yardstick for wall times measured on different machines.

The same TensorFlow code runs its convolutions several times slower on one CPU than on the next (two 2-core
machines of the same family differed by 4x), so a wall time alone says little about a change. Every timing
the project reports is therefore also given as a multiple of one **reference epoch**: the seconds of one epoch
of a bare Keras ``fit`` of a fixed U-Net on fixed, in-memory random data, measured in the same process or run.

The reference network is the demo's first U-Net (depth 4, 16 filters, batch norm, 64 x 64 x 1 input) trained
with Adam and binary cross-entropy, batch 16, 25 steps (400 patches). These numbers are the yardstick's
definition: never change them, or figures of different dates stop comparing.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mammoseg.model.unet import build_unet

# The yardstick's definition (see the module docstring): frozen.
REFERENCE_NETWORK = {"depth": 4, "filters": 16, "batch_norm": True, "max_filters": None}
REFERENCE_SIDE = 64  # px, square, one channel
REFERENCE_BATCH = 16
REFERENCE_STEPS = 25  # batches per epoch: 400 patches
REFERENCE_WARMUP_EPOCHS = 1  # tracing and the first allocations are not part of an epoch
REFERENCE_EPOCHS = 3  # measured epochs; the reported figure is their median (a shared machine has slow spells)

# The vector extensions that decide how fast TensorFlow's CPU kernels run, in the order they matter.
VECTOR_FLAGS = ("avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "avx2", "fma", "avx")


@dataclass(frozen=True)
class ReferenceEpoch:
    """One measurement of the reference epoch.

    seconds : median wall seconds of one epoch (float, > 0).
    epochs : the individual epochs' seconds.
    cpu : the processor's model name, vector extensions and the cores TensorFlow could use.
    """

    seconds: float
    epochs: tuple[float, ...]
    cpu: str

    def multiple(self, seconds: float) -> float:
        """``seconds`` as a multiple of the reference epoch."""
        return seconds / self.seconds

    def describe(self, seconds: float) -> str:
        """``'123 s = 6.2 reference epochs'``."""
        return f"{seconds:.0f} s = {self.multiple(seconds):.1f} reference epochs"

    def as_dict(self) -> dict:
        return asdict(self)


def cpu_description() -> str:
    """The CPU's model name, its relevant vector extensions and the logical cores visible, for example
    ``'AMD EPYC (avx2 fma avx), 2 cores'``. Reads ``/proc/cpuinfo`` where it exists (Linux)."""
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and value.strip():
                model = value.strip()
            elif key == "flags":
                flags = set(value.split())
            if model and flags:
                break
    vector = " ".join(flag for flag in VECTOR_FLAGS if flag in flags) or "no AVX"
    return f"{model} ({vector}), {os.cpu_count()} cores"


def epoch_seconds(epochs: int = REFERENCE_EPOCHS, seed: int = 0, *, filters: int = REFERENCE_NETWORK["filters"],
                  jit_compile: bool = False) -> tuple[float, ...]:
    """Wall seconds of each of ``epochs`` epochs of the reference fit, after one warm-up epoch.

    ``filters`` and ``jit_compile`` (XLA) vary the network's width and its compilation, for benchmarks that set
    a lever against the yardstick; the defaults are the reference epoch itself. Runs on whatever device TensorFlow
    picks (the CPU on a machine without a GPU) and leaves the process's TensorFlow state (precision policy, op
    determinism) as it finds it, except for the Keras random seed.
    """
    import keras
    import numpy as np

    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    n = REFERENCE_BATCH * REFERENCE_STEPS
    images = rng.random((n, REFERENCE_SIDE, REFERENCE_SIDE, 1), dtype=np.float32)
    masks = (rng.random((n, REFERENCE_SIDE, REFERENCE_SIDE, 1)) > 0.8).astype(np.float32)
    network = {**REFERENCE_NETWORK, "filters": filters}
    model = build_unet((REFERENCE_SIDE, REFERENCE_SIDE, 1), name="reference", **network)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy", jit_compile=jit_compile)

    times: list[float] = []

    class _Clock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.start)

    model.fit(images, masks, batch_size=REFERENCE_BATCH, epochs=REFERENCE_WARMUP_EPOCHS + epochs, shuffle=False,
              verbose=0, callbacks=[_Clock()])
    return tuple(times[REFERENCE_WARMUP_EPOCHS:])


def measure_reference_epoch(epochs: int = REFERENCE_EPOCHS, seed: int = 0) -> ReferenceEpoch:
    """Measure the reference epoch in this process (about ``epochs + 2`` reference epochs of wall time, with the
    warm-up and TensorFlow's import)."""
    import statistics

    measured = epoch_seconds(epochs, seed)
    return ReferenceEpoch(float(statistics.median(measured)), measured, cpu_description())


def read_reference(path: str | Path) -> ReferenceEpoch:
    """A measurement written by ``python -m mammoseg.timing --json`` (for example by ``make test`` before the
    suite)."""
    import json

    values = json.loads(Path(path).read_text())
    return ReferenceEpoch(float(values["seconds"]), tuple(float(s) for s in values["epochs"]), str(values["cpu"]))


def main(argv: list[str] | None = None) -> None:
    """``python -m mammoseg.timing [--seconds | --json]``: measure and print this machine's reference epoch
    (``--seconds``: the number alone; ``--json``: seconds, epochs and CPU, which :func:`read_reference` reads)."""
    import json
    import sys

    args = sys.argv[1:] if argv is None else argv
    reference = measure_reference_epoch()
    if "--seconds" in args:
        print(f"{reference.seconds:.3f}")
    elif "--json" in args:
        print(json.dumps(reference.as_dict()))
    else:
        print(f"reference epoch: {reference.seconds:.2f} s (epochs {', '.join(f'{s:.2f}' for s in reference.epochs)})"
              f" on {reference.cpu}")


if __name__ == "__main__":
    main()
