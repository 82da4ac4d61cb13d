"""The released-checkpoint sequence of docs/evaluation.md, end to end on tiny random weights:
`convert from-torch` of an official-format file, `sample` with guidance 1.4 through a diffusers
VAE, `evaluate` against an ADM-format reference batch with a pytorch-fid-format Inception."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from dico_jax import evaluate  # noqa: E402
from dico_jax.convert import __main__ as convert  # noqa: E402
from dico_jax.convert.torch_reference import TorchDiCo, randomize_  # noqa: E402
from tests.test_evaluation import _TorchFIDInception  # noqa: E402

# Several minutes on a 2-core machine (a full Inception-v3 compile): each step has its default-suite
# test (test_convert_cli, test_sample, test_evaluation); this one chains them as documented.
pytestmark = [pytest.mark.torch, pytest.mark.long]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_inception(path):
    torch.manual_seed(0)
    model = _TorchFIDInception()
    with torch.no_grad():
        model.train()
        model(torch.rand(2, 3, 299, 299) * 2 - 1)  # batch statistics into the norms
    torch.save(model.eval().state_dict(), path)


def _tiny_vae(path):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2,
                                  block_out_channels=(32, 64), layers_per_block=1,
                                  norm_num_groups=8, latent_channels=4)
    vae.save_pretrained(path)


def test_released_checkpoint_converts_samples_and_evaluates(tmp_path):
    # The released file is the EMA state_dict of DiCo-XL at 3.75M steps; here a tiny DiCo.
    released = str(tmp_path / "dico-xl-256-3750000.pt")
    torch.save(randomize_(TorchDiCo(16, (1, 1, 1, 1, 1), in_channels=4, num_classes=10),
                          seed=0).state_dict(), released)
    vae, inception = str(tmp_path / "sd-vae-ft-ema"), str(tmp_path / "pt_inception.pth")
    _tiny_vae(vae)
    _tiny_inception(inception)
    # ADM's reference batch format: arr_0 uint8 images and the pool/spatial statistics.
    rng = np.random.default_rng(0)
    reference = str(tmp_path / "VIRTUAL_imagenet256_labeled.npz")
    np.savez(reference, arr_0=rng.integers(0, 256, (10, 64, 64, 3), dtype=np.uint8),
             mu=np.zeros(2048), sigma=np.eye(2048), mu_s=np.zeros(2023), sigma_s=np.eye(2023))

    ckpt = str(tmp_path / "ckpt" / "dico-xl-3750k")
    assert convert.main(["from-torch", "--model", "DiCo-S", "--src", released, "--out", ckpt,
                         "--step", "3750000", "--model-overrides", '{"hidden_size": 16, "depths": [1, 1, 1, 1, 1]}']) == 0
    assert "3750000" in os.listdir(ckpt)

    samples = str(tmp_path / "samples.npz")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run(
        [sys.executable, "-m", "dico_jax.sample", f"--checkpoint={ckpt}", f"--vae_weights={vae}",
         f"--out={samples}", "--config.sampling.num_samples=8", "--config.sampling.batch_size=8",
         "--config.sampling.cfg_scale=1.4", "--config.sampling.sampler=ddpm",
         "--config.sampling.respacing=4", "--config.seed=0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step 3750000" in done.stdout and "cfg 1.4" in done.stdout
    with np.load(samples) as f:
        assert f["arr_0"].shape == (8, 64, 64, 3) and f["arr_0"].dtype == np.uint8

    out = str(tmp_path / "metrics.json")
    result = evaluate.main(["--samples", samples, "--ref", reference, "--inception-weights", inception,
                            "--batch-size", "10", "--out", out,
                            # The same FID from symmetric eigendecompositions: scipy's sqrtm of
                            # 8-sample 2048-d covariances takes minutes on a small CPU.
                            "--fid-method", "eigh"])
    assert json.load(open(out)) == result
    assert (result["num_samples"], result["num_reference"]) == (8, 10)
    for key in ("fid", "sfid", "is", "precision", "recall"):
        assert np.isfinite(result[key]), key
    assert result["fid"] > 0 and 0.0 <= result["precision"] <= 1.0 and 0.0 <= result["recall"] <= 1.0
