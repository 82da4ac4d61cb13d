"""The roofline reads FLOPs, HBM bytes and launches off compiled programs."""
import jax
import jax.numpy as jnp
import pytest

from dico_jax.tools import roofline

# A module as XLA:GPU writes it (shapes, custom-call targets and attributes as in its output
# for DiCo), small enough to count by hand.
GPU_HLO = """HloModule jit_step, is_scheduled=true

%gemm_fusion_dot.1_computation (parameter_0: bf16[64,128], parameter_1: bf16[128,32]) -> bf16[64,32] {
  %parameter_0 = bf16[64,128]{1,0} parameter(0)
  %parameter_1 = bf16[128,32]{1,0} parameter(1)
  ROOT %dot.1 = bf16[64,32]{1,0} dot(%parameter_0, %parameter_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_broadcast (param_0: f32[]) -> (f32[4,1024], f32[4,1024]) {
  %constant_1 = f32[] constant(0)
  %broadcast.1 = f32[4,1024]{1,0} broadcast(%constant_1), dimensions={}
  %copy.1 = f32[4,1024]{1,0} copy(%broadcast.1)
  ROOT %tuple.1 = (f32[4,1024]{1,0}, f32[4,1024]{1,0}) tuple(%broadcast.1, %copy.1)
}

ENTRY %main (x: bf16[8,16,16,32], w: bf16[64,3,3,32], a: bf16[64,128], b: bf16[128,32], g: f32[1024]) -> (bf16[8,16,16,32], bf16[64,3,3,32], bf16[64,32], f32[1024]) {
  %x = bf16[8,16,16,32]{3,2,1,0} parameter(0)
  %w = bf16[64,3,3,32]{3,2,1,0} parameter(1)
  %a = bf16[64,128]{1,0} parameter(2)
  %b = bf16[128,32]{1,0} parameter(3)
  %g = f32[1024]{0} parameter(4)
  %cudnn-conv.1 = (bf16[8,16,16,64]{3,2,1,0}, u8[0]{0}) custom-call(%x, %w), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convForward", metadata={op_name="jit(step)/jvp(DiCo)/conv_general_dilated"}
  %y = bf16[8,16,16,64]{3,2,1,0} get-tuple-element(%cudnn-conv.1), index=0
  %cudnn-conv-bw-input.1 = (bf16[8,16,16,32]{3,2,1,0}, u8[0]{0}) custom-call(%y, %w), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convBackwardInput", metadata={op_name="jit(step)/transpose(jvp(DiCo))/conv_general_dilated"}
  %dx = bf16[8,16,16,32]{3,2,1,0} get-tuple-element(%cudnn-conv-bw-input.1), index=0
  %cudnn-conv-bw-filter.1 = (bf16[64,3,3,32]{3,2,1,0}, u8[0]{0}) custom-call(%x, %y), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convBackwardFilter", metadata={op_name="jit(step)/transpose(jvp(DiCo))/conv_general_dilated"}
  %dw = bf16[64,3,3,32]{3,2,1,0} get-tuple-element(%cudnn-conv-bw-filter.1), index=0
  %gemm_fusion_dot.1 = bf16[64,32]{1,0} fusion(%a, %b), kind=kCustom, calls=%gemm_fusion_dot.1_computation, metadata={op_name="jit(step)/transpose(jvp(DiCo))/dico_block/dot_general"}
  %loop_broadcast_fusion = (f32[4,1024]{1,0}, f32[4,1024]{1,0}) fusion(), kind=kLoop, calls=%fused_broadcast
  %allocate = f32[4,1024]{1,0} custom-call(), custom_call_target="AllocateBuffer"
  %all-reduce-start = f32[1024]{0} all-reduce-start(%g), replica_groups={}, to_apply=%fused_broadcast
  %all-reduce-done = f32[1024]{0} all-reduce-done(%all-reduce-start)
  ROOT %tuple = (bf16[8,16,16,32]{3,2,1,0}, bf16[64,3,3,32]{3,2,1,0}, bf16[64,32]{1,0}, f32[1024]{0}) tuple(%dx, %dw, %gemm_fusion_dot.1, %all-reduce-done)
}
"""


def _compiled_text(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


def test_array_bytes_sums_every_array_of_a_shape():
    assert roofline.array_bytes("(bf16[2,3]{1,0}, f32[4]{0}, u8[0]{0})") == 2 * 6 + 4 * 4
    assert roofline.array_bytes("s32[]") == 4
    assert roofline.array_bytes("pred[7]") == 7
    # XLA:TPU's on-chip memory space is not HBM.
    assert roofline.array_bytes("(f32[8,128]{1,0:T(8,128)}, f32[8,128]{1,0:T(8,128)S(1)})") == 4096


def test_matmul_flops_and_bytes_on_the_cpu_compiler():
    a, b = jnp.ones((64, 128)), jnp.ones((128, 32))
    found = roofline.kernels(_compiled_text(lambda a, b: a @ b, a, b))
    total = roofline.summarize(found)
    assert total["flops"] == 2 * 64 * 128 * 32
    # At least the operands read and the result written, once.
    assert total["hbm_bytes"] >= 4 * (64 * 128 + 128 * 32 + 64 * 32)
    assert total["launches"] >= 1 and total["collective_bytes"] == 0


def test_a_scan_counts_its_trips_and_only_the_slices_it_touches():
    def fn(w, x):
        def body(carry, wi):
            y = jnp.tanh(carry * wi)
            return y, y
        return jax.lax.scan(body, x, w)

    w, x = jnp.ones((10, 1000)), jnp.ones((1000,))
    found = roofline.kernels(_compiled_text(fn, w, x))
    in_loop = [k for k in found if k.launches == 10]
    assert in_loop, [(k.name, k.launches) for k in found]
    # Each trip reads one row of w and writes one row of the stacked output: a few KB, not
    # the 40 KB of the whole stack.
    for k in in_loop:
        assert k.bytes < 3 * 4 * 1000 + 64, (k.name, k.bytes)
    # Counting the whole stack on every trip would read 10 x 40 KB alone.
    assert roofline.summarize(found)["hbm_bytes"] < 300_000
    assert any(k.fill and k.bytes >= 4 * 10 * 1000 for k in found)  # the output stack zeroed


def test_gpu_library_calls_count_the_work_of_the_convolution_and_the_gemm():
    found = {k.name: k for k in roofline.kernels(GPU_HLO)}
    # 3x3 taps that land on the 16x16 input (pad 1): 3 * 16 - 2 per dimension.
    conv = 2 * 8 * 64 * 32 * (3 * 16 - 2) ** 2
    for name in ("cudnn-conv.1", "cudnn-conv-bw-input.1", "cudnn-conv-bw-filter.1"):
        assert found[name].flops == conv, name
    assert found["gemm_fusion_dot.1"].flops == 2 * 64 * 32 * 128
    assert found["gemm_fusion_dot.1"].bytes == 2 * (64 * 128 + 128 * 32 + 64 * 32)
    assert found["loop_broadcast_fusion"].fill
    assert found["loop_broadcast_fusion"].bytes == 2 * 4 * 4 * 1024
    assert found["all-reduce-start"].collective
    assert "all-reduce-done" not in found
    assert "allocate" not in found  # reserves memory, moves none


def test_convolution_flops_count_only_taps_on_the_input():
    # XLA:TPU writes a 1x1 kernel gradient as a 'convolution' whose window spans the whole
    # image; each output takes one tap, not 32 x 32 of them.
    attrs = ", window={size=32x32 pad=31_31x31_31 rhs_reversal=1x1}, dim_labels=bf01_o01i->f01b"
    flops = roofline._conv_flops("bf16[416,832,1,1]", "bf16[256,32,32,832]",
                                 "bf16[256,32,32,416]", attrs)
    assert flops == 2 * 256 * 32 * 32 * 416 * 832
    # A plain matrix product written as a convolution without spatial dimensions.
    assert roofline._conv_flops("f32[16,32]", "f32[32,8]", "f32[16,8]",
                                ", dim_labels=bf_io->bf") == 2 * 16 * 8 * 32
    # Stride 2, 3x3, pad 1 on 8 -> 4 outputs per dimension: taps 2+3+3+3 = 11 per dimension.
    assert roofline._conv_flops("f32[1,8,8,4]", "f32[3,3,4,2]", "f32[1,4,4,2]",
                                ", window={size=3x3 stride=2x2 pad=1_1x1_1}, "
                                "dim_labels=b01f_01io->b01f") == 2 * 1 * 2 * 4 * 11 * 11


def test_loops_without_a_known_trip_count_read_it_off_their_condition():
    hlo = """HloModule m

%body (p: (s32[], f32[1000])) -> (s32[], f32[1000]) {
  %p = (s32[], f32[1000]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[1000]{0} get-tuple-element(%p), index=1
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  %y = f32[1000]{0} fusion(%x), kind=kLoop, calls=%tanh
  ROOT %t = (s32[], f32[1000]{0}) tuple(%next, %y)
}

%tanh (a: f32[1000]) -> f32[1000] {
  %a = f32[1000]{0} parameter(0)
  ROOT %b = f32[1000]{0} tanh(%a)
}

%cond (p: (s32[], f32[1000])) -> pred[] {
  %p = (s32[], f32[1000]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(7)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: f32[1000]) -> (s32[], f32[1000]) {
  %x = f32[1000]{0} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[1000]{0}) tuple(%zero, %x)
  ROOT %w = (s32[], f32[1000]{0}) while(%init), condition=%cond, body=%body
}
"""
    found = {k.name: k for k in roofline.kernels(hlo)}
    assert found["y"].launches == 7 and found["y"].bytes == 8000
    assert found["next"].launches == 7


def test_parts_and_passes_come_from_the_source_names():
    found = {k.name: k for k in roofline.kernels(GPU_HLO)}
    assert roofline.part(found["cudnn-conv.1"]) == "matmul & conv"
    assert roofline.direction(found["cudnn-conv.1"]) == "fwd"
    assert roofline.direction(found["cudnn-conv-bw-input.1"]) == "bwd"
    assert roofline.part(found["loop_broadcast_fusion"]) == "buffer fill"
    assert roofline.part(found["all-reduce-start"]) == "collectives"
    k = roofline.Kernel("f", "fusion", 1, 0.0, 1.0,
                        "jit(step)/transpose(jvp(DiCo))/latent/while/body/closed_call/dico_block/"
                        "modulated_layer_norm/mul")
    assert roofline.part(k) == "layer norm"
    assert roofline.part(roofline.Kernel("f", "fusion", 1, 0.0, 1.0, "jit(step)/ema/add")) \
        == "optimizer & EMA"


def test_the_bound_is_the_slower_of_compute_and_memory_per_kernel():
    compute = roofline.Kernel("gemm", "fusion", 2, flops=1e12, bytes=1e9, source="")
    memory = roofline.Kernel("ln", "fusion", 3, flops=0.0, bytes=4e9, source="")
    summary = roofline.summarize([compute, memory], peak_flops=1e15, bandwidth=2e12)
    # gemm: max(1 ms, 0.5 ms) x 2; ln: 2 ms x 3.
    assert summary["bound_s"] == pytest.approx(2e-3 + 6e-3)
    assert summary["flops"] == 2e12 and summary["hbm_bytes"] == 2e9 + 12e9
    assert summary["flops_s"] == pytest.approx(2e-3)
    assert summary["bytes_s"] == pytest.approx(7e-3)
    assert [p["part"] for p in summary["parts"]] == ["other", "matmul & conv"]
    table = roofline.format_parts(summary, batch=64)
    assert "at most 8000 img/s" in table


def test_chip_peaks_per_dtype():
    assert roofline.chip_peaks("NVIDIA H200", "bfloat16") == (989e12, 4.8e12)
    assert roofline.chip_peaks("NVIDIA H200", "float32") == (989e12 / 2, 4.8e12)
    assert roofline.chip_peaks("TPU v5", "float32") == (459e12, 2.765e12)
    assert roofline.chip_peaks("cpu", "float32") is None


def test_bad_hlo_is_refused():
    with pytest.raises(ValueError, match="ENTRY"):
        roofline.kernels("HloModule m\n")


def test_cli_reads_a_gzipped_dump_and_names_bad_input(tmp_path, capsys):
    import gzip

    path = tmp_path / "step.hlo.txt.gz"
    with gzip.open(path, "wt") as f:
        f.write(GPU_HLO)
    summary = roofline.main([str(path), "--device_kind", "NVIDIA H100 80GB HBM3", "--batch", "8"])
    out = capsys.readouterr().out
    assert "matmul & conv" in out and "-> at most" in out
    assert summary["bound_s"] > 0
    roofline.main([str(path)])
    assert "no bound" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        roofline.main([str(tmp_path / "missing.hlo")])
    assert "missing.hlo" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        roofline.main([str(path), "--device_kind", "A100"])
    assert "no peaks known for device kind 'A100'" in capsys.readouterr().err
