"""anndist's accumulation matches Hugging Face Accelerate's on 2 ranks (full windows)."""
import torch

from support import ROOT, make_model, torchrun


def test_same_final_weights_as_accelerate(tmp_path):
    out = tmp_path / "weights.pt"
    torchrun(ROOT / "tests" / "support" / "scripts" / "accelerate_vs_anndist.py", str(out), nproc=2)
    result = torch.load(out)
    assert result["processes"] == 2  # Accelerate really ran distributed (it needs cpu=True here)
    assert result["steps"] == 2 * 3
    initial = torch.cat([p.detach().reshape(-1) for p in make_model(hidden=32).parameters()])
    assert not torch.allclose(result["anndist"], initial)
    torch.testing.assert_close(result["anndist"], result["accelerate"], rtol=1e-5, atol=1e-6)
