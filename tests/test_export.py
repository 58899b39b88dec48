"""Export: in-graph position embeddings equal the model's, each format round-trips with parity,
dynamic sizes and batches match PyTorch, bad requests are one-line errors before any work."""

import numpy as np
import pytest
import torch
from PIL import Image

from dinolab.cli import main
from dinolab.export import ExportModule, export_backbone, interpolated_pos_embed, load_runner, parity
from dinolab.models import build_backbone
from dinolab.models.checkpoints import save_backbone


def tiny(registers: int = 0) -> torch.nn.Module:
    """A 2-block, 32-d ViT/14 storing a 4x4 grid, with the released models' interpolation rules."""
    torch.manual_seed(0)
    return build_backbone("vit_small", patch_size=14, embed_dim=32, depth=2, num_heads=2, img_size=56,
                          init_values=1.0, num_register_tokens=registers, interpolate_antialias=bool(registers),
                          interpolate_offset=0.0 if registers else 0.1).eval()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_backbone(tiny(), path)
    return path


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("grid", [(4, 4), (2, 2), (5, 3), (7, 7), (1, 4)])
def test_pos_embed_in_graph_matches_model(registers, grid):
    model = tiny(registers)
    h, w = grid[0] * 14, grid[1] * 14
    want = model.interpolate_pos_encoding(torch.zeros(1, 1 + grid[0] * grid[1], 32), h, w)
    got = interpolated_pos_embed(model, *grid)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    if grid == (4, 4):  # the stored grid is used as is, as the official shortcut does
        assert torch.equal(got, model.pos_embed)


def _check_dynamic(result, model, tmp_path):
    """The written file at two sizes (one non-square) and two batch sizes equals eager forward_features."""
    runner = load_runner(result.path, result.format, result.output_names)
    for b, h, w in [(1, 28, 28), (3, 70, 42)]:
        x = torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(b))
        got = runner(x)
        assert got["x_norm_clstoken"].shape == (b, 32)
        assert got["x_norm_patchtokens"].shape == (b, h * w // 196, 32)
        assert max(parity(runner, model, x, result.output_names).values()) < 1e-5


def test_onnx_dynamic_register_model(tmp_path):
    model = tiny(registers=4)
    res = export_backbone(model, tmp_path / "m.onnx", "onnx", size=56, patch_tokens=True, log=lambda s: None)
    assert res.dynamic and res.output_names == ["x_norm_clstoken", "x_norm_patchtokens", "x_norm_regtokens"]
    assert list(res.parity) == ["2x56x56", "3x84x84"] and res.max_diff < 1e-5
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # one self-contained file, no leftovers
    _check_dynamic(res, model, tmp_path)
    regs = load_runner(res.path, "onnx", res.output_names)(torch.randn(2, 3, 42, 56))["x_norm_regtokens"]
    assert regs.shape == (2, 4, 32)


def test_torch_export_dynamic(tmp_path):
    model = tiny()
    res = export_backbone(model, tmp_path / "m.pt2", "torch-export", size=56, patch_tokens=True, log=lambda s: None)
    assert res.output_names == ["x_norm_clstoken", "x_norm_patchtokens"] and res.max_diff < 1e-5
    _check_dynamic(res, model, tmp_path)


def test_static_torch_export_cli_with_images(weights, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):  # not the example's batch of 2: the batch stays symbolic
        Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "m.pt2"
    assert main(["export", "--weights", str(weights), "--format", "torch-export", "--out", str(out), "--size", "28",
                 "--static", "--check-images", str(folder)]) == 0
    text = capsys.readouterr().out
    assert "dynamic batch, fixed 28x28" in text and "parity 3x28x28: x_norm_clstoken" in text and "parity ok" in text
    assert "3x42x42" not in text  # one size only
    program = torch.export.load(str(out)).module()
    assert program(torch.randn(5, 3, 28, 28))[0].shape == (5, 32)
    with pytest.raises(Exception):
        program(torch.randn(1, 3, 42, 42))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_safetensors_cli(weights, tmp_path, capsys, dtype):
    out = tmp_path / "w.safetensors"
    assert main(["export", "--weights", str(weights), "--format", "safetensors", "--out", str(out), "--size", "28",
                 "--patch-tokens", "--dtype", dtype]) == 0
    text = capsys.readouterr().out
    assert "(%s, weights)" % dtype in text and "parity ok: max abs difference 0.00e+00" in text
    again = build_backbone("auto", weights=out)
    assert again.arch_kwargs == tiny().arch_kwargs


def test_tolerance_exceeded_is_exit_2(weights, tmp_path, capsys):
    out = tmp_path / "w.safetensors"
    code = main(["export", "--weights", str(weights), "--format", "safetensors", "--out", str(out), "--size", "28",
                 "--dtype", "bf16", "--tolerance", "-1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "exceeds --tolerance -1" in err


@pytest.mark.parametrize("argv, message", [
    (["--format", "tflite", "--out", "m.tflite"], "unknown format 'tflite'; expected one of onnx, torch-export"),
    (["--format", "onnx", "--out", "m.pt2"], "must end with .onnx for --format onnx"),
    (["--format", "torch-export", "--out", "m.onnx"], "must end with .pt2"),
    (["--format", "onnx", "--out", "m.onnx", "--dtype", "bf16"], "bf16 is not offered for onnx"),
    (["--format", "onnx", "--out", "m.onnx", "--dtype", "int8"], "unknown dtype 'int8'"),
    (["--format", "onnx", "--out", "m.onnx", "--size", "30"], "--size 30 is not a multiple of the patch size 14"),
])
def test_bad_requests_are_one_line(weights, tmp_path, capsys, argv, message):
    argv = [a if not a.startswith("m.") else str(tmp_path / a) for a in argv]
    assert main(["export", "--weights", str(weights), *argv]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.err.count("\n") == 1
    assert "exporting" not in captured.out and not list(tmp_path.iterdir())


def test_missing_weights_and_run(tmp_path, capsys):
    assert main(["export", "--weights", str(tmp_path / "nope.pth"), "--format", "onnx", "--out",
                 str(tmp_path / "m.onnx")]) == 2
    assert "nope.pth does not exist" in capsys.readouterr().err
    assert main(["export", "--run", str(tmp_path), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "no teacher_backbone.safetensors" in capsys.readouterr().err


def test_export_module_without_patch_tokens_is_forward():
    model = tiny(registers=4)
    x = torch.randn(2, 3, 42, 70)
    with torch.inference_mode():
        (cls,) = ExportModule(model)(x)
        torch.testing.assert_close(cls, model(x), atol=1e-5, rtol=0)
