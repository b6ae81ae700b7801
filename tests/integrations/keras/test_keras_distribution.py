"""Keras distribution, each in a fresh interpreter (the device count is fixed before the backend loads):
``keras.distribution.DataParallel`` on JAX with 2 virtual CPU devices watches the whole global batch;
``tf.distribute.MirroredStrategy`` on 2 logical CPUs works and says, in one note, that it watches one
replica's share of each batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.one_backend  # each case starts its own interpreter on its own backend

COMMON = textwrap.dedent('''
    def run(name, act, nan_at=None):
        keras.utils.set_random_seed(0)
        x = np.random.default_rng(0).normal(size=(256, 8)).astype("float32")
        y = np.random.default_rng(1).uniform(size=(256, 1)).astype("float32")
        if nan_at is not None:
            x[nan_at, 0] = np.nan
        with scope():
            m = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh"),
                                  keras.layers.Dense(1, activation=act)])
            m.compile("sgd", "mse")
        g = BoundGuard(bounds=(0, 1), on_violation="halt", check_every_n_steps=4,
                       alerts_path=os.path.join(out, name, "alerts.jsonl"))
        m.fit(x, y, batch_size=16, epochs=1, callbacks=[g], verbose=0, shuffle=False)
        return {"codes": sorted({a.code for a in g.alerts if a.severity != "info"}),
                "first": sorted({a.code for a in g.alerts if a.step == 1}), "steps": g.step,
                "nan": next((a.step for a in g.alerts if a.code == "nonfinite_output"), None),
                "disabled": g._session.disabled,
                "notes": [a.message for a in g.alerts if a.code == "probe_incomplete"],
                "n": g.last_snapshot.counts if g.last_snapshot else None}

    # the NaN input row 83 is in step 6 (batches of 16, no shuffling)
    result = {"seed": run("seed", None), "halt": run("halt", "sigmoid", nan_at=83), "ok": run("ok", "sigmoid")}
    print("result: " + json.dumps(result))
''')

JAX = textwrap.dedent('''
    import contextlib, json, os, sys, warnings
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    warnings.filterwarnings("ignore")
    import numpy as np, jax, keras
    from boundguard.integrations.keras import BoundGuard
    out = sys.argv[1]
    assert len(jax.devices()) == 2, jax.devices()
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
    scope = contextlib.nullcontext
''') + COMMON

TF = textwrap.dedent('''
    import json, os, sys, warnings
    os.environ["KERAS_BACKEND"] = "tensorflow"
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    warnings.filterwarnings("ignore")
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from boundguard.integrations.keras import BoundGuard
    out = sys.argv[1]
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    scope = strategy.scope
''') + COMMON


def _run(tmp_path, name: str, script: str) -> dict:
    path = tmp_path / f"{name}.py"
    path.write_text(script)
    env = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "XLA_FLAGS")}
    proc = subprocess.run([sys.executable, str(path), str(tmp_path)], capture_output=True, text=True, timeout=240,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("result: ")][-1]
    return json.loads(line[len("result: "):])


def test_jax_data_parallel_watches_the_global_batch(tmp_path):
    r = _run(tmp_path, "jax_dp", JAX)
    seed, halt, ok = r["seed"], r["halt"], r["ok"]
    assert {"output_out_of_range", "missing_output_activation"} <= set(seed["first"]) and not seed["disabled"]
    assert seed["n"]["pred"] == 16  # step 1: the whole global batch, both devices' shares
    # Keras dispatches batch-end hooks asynchronously on JAX: the halt lets one more batch run
    assert halt["nan"] is not None and 6 <= halt["nan"] <= 8 and halt["steps"] == halt["nan"] + 1, halt
    assert ok["codes"] == [] and ok["notes"] == [] and ok["steps"] == 16, ok


def test_tf_mirrored_strategy_works_and_says_what_it_watches(tmp_path):
    r = _run(tmp_path, "tf_mirrored", TF)
    seed, ok = r["seed"], r["ok"]
    assert {"output_out_of_range", "missing_output_activation"} <= set(seed["first"]) and not seed["disabled"]
    assert len(seed["notes"]) == 1 and "2 replicas" in seed["notes"][0] and "one replica's share" in seed["notes"][0]
    assert r["halt"]["codes"] and r["halt"]["steps"] <= 8  # the NaN loss (every replica's) stops the run
    assert ok["codes"] == [] and ok["steps"] == 16 and not ok["disabled"], ok
