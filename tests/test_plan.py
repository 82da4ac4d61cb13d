"""The ahead-of-time plan: the real sharded train step compiled for a target, per-chip memory."""
import importlib.util
import json
import os
import subprocess
import sys

import jax
import pytest

from dico_jax.tools import plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import digits as digits_config  # noqa: E402


def small_config():
    config = digits_config.get_config()
    config.global_batch_size = 16
    config.mesh = {"data": 1, "fsdp": 8}
    config.fsdp_min_size = 256  # split most kernels of this small model
    return config


@pytest.mark.slow
def test_plan_splits_the_state_over_fsdp_and_adds_up_memory():
    row = plan.plan_train_step(small_config(), jax.devices())
    assert row["chips"] == 8 and row["mesh"] == {"slice": 1, "data": 1, "fsdp": 8}
    assert row["batch_per_chip"] == 2 and row["resolution"] == 8
    # Params, EMA and two AdamW moments in fp32, plus the step counters.
    assert 16 * row["params"] <= row["state_bytes"] < 16 * row["params"] + 1024
    # Kernels are split 8 ways; biases, norms and small kernels stay whole on every chip.
    assert row["state_bytes"] / 8 < row["state_bytes_per_chip"] < row["state_bytes"] / 3
    # XLA's arguments are this chip's state shard and batch shard; the state is donated, so
    # the new state is written over it.
    assert row["state_bytes_per_chip"] <= row["argument_bytes"] < row["state_bytes_per_chip"] * 1.1
    assert row["alias_bytes"] >= 0.9 * row["state_bytes_per_chip"]
    assert row["total_bytes"] == (row["argument_bytes"] + row["output_bytes"] - row["alias_bytes"]
                                  + row["temp_bytes"] + row["generated_code_bytes"])
    assert row["temp_bytes"] > 0 and row["compile_s"] > 0
    assert row["fits"] is None and row["chip_memory_bytes"] is None  # a CPU reports no limit
    assert "   1 x 8  " in plan.format_table([row])


# Under a minute but a full compile; the train-step plans cover the tool.
@pytest.mark.long
def test_forward_plan_holds_the_params_and_does_a_third_of_the_training_work():
    config = small_config()
    config.mesh = {"data": 8, "fsdp": 1}
    train_row = plan.plan_train_step(config, jax.devices())
    forward_row = plan.plan_train_step(config, jax.devices(), step="forward")
    assert forward_row["step"] == "forward" and forward_row["params"] == train_row["params"]
    assert 4 * forward_row["params"] <= forward_row["state_bytes"] < 4 * forward_row["params"] + 64
    # Backward is twice the forward's matmul work; the diffusion loss adds little.
    ratio = train_row["step_flops"] / forward_row["step_flops"]
    assert 2.8 < ratio < 3.3, ratio
    assert forward_row["step_hbm_bytes"] < train_row["step_hbm_bytes"]
    with pytest.raises(ValueError, match="'train' or 'forward'"):
        plan.plan_train_step(config, jax.devices(), step="sample")


def test_variants_cover_every_combination_with_typed_values():
    config = small_config()
    rows = list(plan.variants(config, ["remat=none,full", "batch_per_chip=2,4",
                                       "model.scan=false", "mesh.fsdp=4"], num_devices=8))
    assert len(rows) == 4
    labels = [label for label, _ in rows]
    assert labels[0] == {"remat": "none", "batch_per_chip": "2", "model.scan": "false",
                         "mesh.fsdp": "4"}
    for label, c in rows:
        assert c.remat == label["remat"]
        assert c.global_batch_size == 8 * int(label["batch_per_chip"])
        assert c.model.scan is False and c.mesh.fsdp == 4
    assert config.remat == "none" and config.model.scan is True  # the base is untouched

    with pytest.raises(ValueError, match="no field 'model.depthh'"):
        list(plan.variants(config, ["model.depthh=3"], 8))
    with pytest.raises(ValueError, match="expected true or false"):
        list(plan.variants(config, ["model.scan=maybe"], 8))
    with pytest.raises(ValueError, match="expected FIELD=V1,V2"):
        list(plan.variants(config, ["remat"], 8))


def test_chip_memory_comes_from_the_device_or_the_table():
    class Compiled:
        device_kind = "TPU v5 lite"

        def memory_stats(self):
            raise RuntimeError("compile-only device")

    assert plan.chip_memory_bytes(Compiled()) == int(15.75 * 2**30)
    assert plan.chip_memory_bytes(jax.devices()[0]) is None


@pytest.mark.slow
def test_plan_cli_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "plan.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "dico_jax.tools.plan", "--config=configs/digits.py",
         "--cpu_devices=4", "--config.mesh.fsdp=2", "--vary=remat=none,full", "--breakdown",
         f"--json={out}", f"--hlo_dir={tmp_path / 'hlo'}"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "target: 4 x cpu" in proc.stdout and "img/s <=" in proc.stdout
    rows = json.loads(out.read_text())
    assert [r["remat"] for r in rows] == ["none", "full"]
    assert all(r["mesh"] == {"slice": 1, "data": 2, "fsdp": 2} and r["batch_per_chip"] == 16 for r in rows)
    # depthwise_impl="auto" is resolved for the target (here a CPU: the shifted form).
    assert all(r["depthwise"] == "shift" for r in rows) and " scan/shift " in proc.stdout
    # Rematerializing every block keeps fewer activations for the backward pass, and runs
    # the forward pass again in the backward one.
    assert rows[1]["temp_bytes"] < rows[0]["temp_bytes"]
    assert rows[1]["step_flops"] > rows[0]["step_flops"] > 0
    # FSDP gathers parameters and reduces gradients: collectives, counted apart from HBM.
    assert all(r["step_hbm_bytes"] > 0 and r["step_collective_bytes"] > 0 for r in rows)
    # No peaks known for a CPU: FLOPs and bytes, but no bound.
    assert all("bound_images_per_s" not in r for r in rows)
    assert "matmul & conv" in proc.stdout and "layer norm" in proc.stdout
    # The compiled programs are kept; the roofline tool reads them back to the same totals.
    from dico_jax.tools import roofline

    summary = roofline.main([str(tmp_path / "hlo" / "row_1.hlo.txt.gz")])
    assert summary["flops"] == rows[1]["step_flops"]


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="compiling for a TPU topology needs libtpu beside the environment "
                    "(dico_jax.tools.plan names the pip command)")
def test_plan_for_a_tpu_topology_without_a_tpu(tmp_path):
    env = dict(os.environ)
    env.pop("JAX_PLATFORMS", None)
    out = tmp_path / "plan.json"
    proc = subprocess.run(
        [sys.executable, "-m", "dico_jax.tools.plan", "--config=configs/digits.py",
         "--topology=v5e:2x2", "--config.mesh.fsdp=2", f"--json={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    assert row["device"] == "TPU v5 lite" and row["chips"] == 4
    assert row["depthwise"] == "conv"  # "auto" as a TPU runs it, not as this CPU host would
    assert row["chip_memory_bytes"] == int(15.75 * 2**30) and row["fits"] is True


@pytest.mark.parametrize("topology,command", [
    pytest.param("v5e:2x2", f"pip install --target DIR '{plan.libtpu_requirement()}'",
                 marks=pytest.mark.skipif(importlib.util.find_spec("libtpu") is not None,
                                          reason="libtpu is installed")),
    pytest.param("h200", "pip install --no-deps --target DIR "
                 + " ".join(f"'{r}'" for r in plan.cuda_plugin_requirements()),
                 marks=pytest.mark.skipif(importlib.util.find_spec("jax_cuda12_plugin") is not None,
                                          reason="JAX's CUDA plugin is installed")),
])
def test_topology_without_its_compiler_says_what_to_install(topology, command):
    proc = subprocess.run(
        [sys.executable, "-m", "dico_jax.tools.plan", "--config=configs/digits.py",
         f"--topology={topology}"], cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert command in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("dico_jax.tools.plan: error: ")


def test_compiler_packages_follow_this_jax():
    assert plan.libtpu_requirement().startswith("libtpu")
    assert plan.cuda_plugin_requirements()[0] == f"jax-cuda12-plugin=={jax.__version__}"


@pytest.mark.skipif(importlib.util.find_spec("jax_cuda12_plugin") is None,
                    reason="compiling for GPUs without one needs JAX's CUDA plugin beside the "
                    "environment (dico_jax.tools.plan names the pip command)")
def test_plan_for_gpus_without_a_gpu(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_PYTHON_CLIENT_MEM_FRACTION", None)
    out = tmp_path / "plan.json"
    proc = subprocess.run(
        [sys.executable, "-m", "dico_jax.tools.plan", "--config=configs/digits.py",
         "--topology=h100:2", "--config.mesh.fsdp=2", "--config.dtype=bfloat16", "--breakdown",
         "--vary=model.norm_impl=xla,pallas", f"--json={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row, kernels = json.loads(out.read_text())
    assert row["device"] == "NVIDIA H100 80GB HBM3" and row["chips"] == 2
    assert row["depthwise"] == "conv"  # "auto" as a GPU runs it, not as this CPU host would
    assert row["chip_memory_bytes"] == int(81559 * 2**20 * 0.75) and row["fits"] is True
    assert row["bound_images_per_s"] > 0 and 0 < row["bound_mfu"] <= 1
    assert row["step_collective_bytes"] > 0
    assert "at most" in proc.stdout

    # The Pallas layer norms compile for the GPU too, each on its batch shard, and move fewer
    # bytes than XLA's (the roofline counts the Triton kernels' operands and results).
    def layer_norm_bytes(r):
        return sum(p["bytes"] for p in r["roofline"]["parts"] if p["part"] == "layer norm")

    assert kernels["norm"] == "pallas" and "scan/conv/pallas" in proc.stdout
    assert 0 < layer_norm_bytes(kernels) < layer_norm_bytes(row)
    assert kernels["step_hbm_bytes"] < row["step_hbm_bytes"]


def test_gpu_targets_describe_the_chip():
    text = plan.gpu_target_config("h200")
    assert 'device_description_str: "NVIDIA H200"' in text
    assert f"device_memory_size: {143771 * 2**20}" in text
    assert "memory_bandwidth: 4800000000000" in text
    with pytest.raises(ValueError, match="h200:N"):
        plan.target_devices("h200:x")


@pytest.mark.parametrize("name,kind", [("H200", "gpu"), ("h100:2", "gpu"), ("V5E:2x2", "tpu"),
                                       ("v6e:2x2", "tpu")])
def test_topology_names_any_case(name, kind):
    assert plan.parse_topology(name) == (kind, name.lower())


def test_unknown_topology_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown chip 'a100'.*v5e.*h200"):
        plan.parse_topology("A100")


def test_compiler_out_of_memory_becomes_a_row():
    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
               "temporaries (33.21G) exceeds available HBM (31.25G).\n  detail")
    fields = plan.out_of_memory_fields(message)
    assert fields["fits"] is False and "\n" not in fields["error"]
    assert fields["temp_needed_bytes"] == int(33.21 * 2**30)
    assert plan.out_of_memory_fields("INVALID_ARGUMENT: bad shape") is None
