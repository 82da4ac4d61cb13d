"""Checkpoints that cannot be read: fallback to the step before, a clear error for sampling,
and resuming with another model named by its config fields."""
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dico_jax import checkpoint as ckpt_lib
from dico_jax.errors import UserError


def _state(step: int):
    rng = np.random.default_rng(step)  # random values: the array files do not compress away
    return {"step": jnp.int32(step), "params": {"w": jnp.asarray(rng.normal(size=(64, 64)),
                                                                 jnp.float32)}}


def _abstract():
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                       sharding=jax.sharding.SingleDeviceSharding(
                                                           jax.devices()[0])), _state(0))


def _write_steps(directory, steps, config=None):
    checkpointer = ckpt_lib.TrainCheckpointer(directory, keep=10, async_save=False)
    for step in steps:
        checkpointer.save(step, _state(step), config=config or {"model": {"name": "DiCo-S"}})
    checkpointer.wait_until_finished()
    checkpointer.close()


def _truncate_array_data(step_dir):
    """Cuts the largest array file of a step short (a copy or write that stopped midway)."""
    files = [os.path.join(root, f) for root, _, names in os.walk(os.path.join(step_dir, "state"))
             for f in names if os.sep + "d" + os.sep in os.path.join(root, f) + os.sep]
    victim = max(files, key=os.path.getsize)
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    return victim


def test_unreadable_newest_step_falls_back_and_is_kept_aside(tmp_path, caplog):
    directory = str(tmp_path / "checkpoints")
    _write_steps(directory, [10, 20])
    _truncate_array_data(os.path.join(directory, "20"))
    checkpointer = ckpt_lib.TrainCheckpointer(directory, keep=10, async_save=False)
    with caplog.at_level(logging.WARNING):
        step, state = checkpointer.restore_newest(_abstract())
    checkpointer.close()
    assert step == 10
    np.testing.assert_array_equal(state["params"]["w"], _state(10)["params"]["w"])
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("checkpoint of step 20" in m and "moved to" in m for m in warning), warning
    # Nothing is deleted: the damaged step waits beside the checkpoints for inspection.
    assert os.path.isdir(str(tmp_path / "checkpoints_damaged" / "20"))
    assert ckpt_lib.saved_steps(directory) == [10]


def test_no_restorable_step_is_an_error_and_an_empty_directory_is_none(tmp_path):
    directory = str(tmp_path / "checkpoints")
    checkpointer = ckpt_lib.TrainCheckpointer(directory, keep=10, async_save=False)
    assert checkpointer.restore_newest(_abstract()) is None
    checkpointer.close()
    _write_steps(directory, [5])
    _truncate_array_data(os.path.join(directory, "5"))
    checkpointer = ckpt_lib.TrainCheckpointer(directory, keep=10, async_save=False)
    with pytest.raises(UserError, match=r"no checkpoint in .*checkpoints can be restored \(steps \[5\]"):
        checkpointer.restore_newest(_abstract())
    checkpointer.close()


def test_restore_to_host_names_the_unreadable_step(tmp_path):
    directory = str(tmp_path / "checkpoints")
    _write_steps(directory, [1, 2])
    _truncate_array_data(os.path.join(directory, "2"))
    with pytest.raises(UserError, match=r"checkpoint of step 2 in .*checkpoints cannot be read "
                                        r"\(.*\); pass --step with one of \[1\]"):
        ckpt_lib.restore_to_host(directory, items=("params",))
    state, step = ckpt_lib.restore_to_host(directory, 1, items=("params",))
    assert step == 1


def test_other_model_is_named_by_its_config_fields():
    saved = {"model": {"name": "DiCo-S", "hidden_size": 64, "depths": [1, 1, 1, 1, 1],
                       "num_classes": 10}, "diffusion": {"learn_sigma": True}}
    same = {"model": {"name": "DiCo-S", "hidden_size": 64, "depths": (1, 1, 1, 1, 1),
                      "num_classes": 10, "scan": False}}
    ckpt_lib.check_same_model(saved, same, "ckpt/40")  # scan does not change the weights
    other = {"model": {"name": "DiCo-S", "hidden_size": 128, "depths": None, "num_classes": 10}}
    with pytest.raises(UserError, match=r"ckpt/40 holds another model .*config.model.hidden_size: "
                                        r"checkpoint 64, this run 128; config.model.depths: "
                                        r"checkpoint \[1, 1, 1, 1, 1\], this run \[5, 4, 4, 4, 4\]"):
        ckpt_lib.check_same_model(saved, other, "ckpt/40")


@pytest.fixture
def small_disk(small_tmpfs):
    return small_tmpfs("300k")  # room for one small checkpoint, not two


def test_disk_full_during_a_save_is_one_error_and_keeps_the_previous_step(small_disk):
    directory = os.path.join(small_disk, "checkpoints")
    rng = np.random.default_rng(0)

    def big(step):  # 150 KB of incompressible values
        return {"step": jnp.int32(step),
                "params": {"w": jnp.asarray(rng.normal(size=(150 * 256,)), jnp.float32)}}

    checkpointer = ckpt_lib.TrainCheckpointer(directory, keep=3)
    checkpointer.save(1, big(1))
    checkpointer.wait_until_finished()
    with pytest.raises(UserError, match=r"saving a checkpoint in .*checkpoints failed: no space "
                                        r"left on device; the checkpoint of step 1 is intact"):
        checkpointer.save(2, big(2))
        checkpointer.wait_until_finished()
    checkpointer.close()
    state, step = ckpt_lib.restore_to_host(directory, items=("params",))
    assert step == 1 and state["params"]["w"].shape == (150 * 256,)
