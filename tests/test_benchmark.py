"""The benchmark tool and its profile summary, at a size that runs in seconds on a CPU."""
import json

import pytest

from dico_jax.tools import benchmark, profile_summary


# A minute on 2 cores; the other benchmark tests cover the table and the JSON rows.
@pytest.mark.long
def test_benchmark_row_and_profile(tmp_path, monkeypatch, capsys):
    from dico_jax.tools import roofline

    # A CPU has no listed peaks; give it some so the roofline line of the profile runs.
    monkeypatch.setattr(roofline, "chip_peaks", lambda kind, dtype: (1e12, 1e11))
    out = tmp_path / "rows.json"
    rows = benchmark.main(["--models", "DiCo-S", "--res", "8", "--batch", "2", "--repeats", "1",
                           "--depthwise", "shift", "--parts", "train",
                           "--json", str(out), "--profile", str(tmp_path / "prof")])
    (row,) = rows
    assert row["impl"] == "jax" and row["depthwise"] == "shift" and row["scan"] is True
    assert row["train_img_s"] > 0 and row["compile_s"] > 0 and row["mfu"] > 0
    assert row["fwd_img_s"] is None and row["sample250_img_s"] is None
    assert json.loads(out.read_text())[0]["train_img_s"] == row["train_img_s"]

    profile = row["profile"]
    cats = profile["categories"]
    # The traced ops were matched to the program: the network's parts are all there.
    for name in ("matmul", "modulated_layer_norm", "depthwise3x3", "gelu", "channel_attention"):
        assert cats.get(name, {}).get("ms_per_step", 0) > 0, (name, cats)
    assert sum(c["share"] for c in cats.values()) == pytest.approx(1.0)
    assert profile["device_ms_per_step"] > 0
    assert profile["roofline_bound_ms"] > 0
    assert "roofline bound of this program" in capsys.readouterr().out


def test_categorize_reads_scopes_and_op_kinds():
    hlo = profile_summary.parse_hlo("""HloModule m

%fused_computation.1 (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  ROOT %e = f32[8]{0} exponential(%p), metadata={op_name="jit(f)/DiCo/modulated_layer_norm/exp"}
}

ENTRY %main (a: f32[2,8,8,16], k: f32[3,3,1,16]) -> f32[2,8,8,16] {
  %a = f32[2,8,8,16]{3,2,1,0} parameter(0)
  %k = f32[3,3,1,16]{3,2,1,0} parameter(1)
  %conv.1 = f32[2,8,8,16]{3,2,1,0} convolution(%a, %k), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, feature_group_count=16
  %dot.2 = f32[16,16]{1,0} dot(%a, %a), lhs_contracting_dims={0,1,2}, rhs_contracting_dims={0,1,2}
  %fusion.3 = f32[8]{0} fusion(%a), kind=kLoop, calls=%fused_computation.1
  ROOT %add.4 = f32[2,8,8,16]{3,2,1,0} add(%a, %a)
}
""")
    assert profile_summary.categorize(hlo["conv.1"]) == "depthwise_conv"
    assert profile_summary.categorize(hlo["dot.2"]) == "matmul"
    assert profile_summary.categorize(hlo["fusion.3"]) == "modulated_layer_norm"
    assert profile_summary.categorize(hlo["add.4"]) == "other"


def test_benchmark_rejects_a_one_step_sampler(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--sample_steps", "1"])
    assert "--sample_steps must be at least 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark.main(["--parts", "train,forwrd"])
    assert "--parts takes train, forward and sample" in capsys.readouterr().err
