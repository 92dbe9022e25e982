"""The distillation benchmark's networks (tools/kd_bench_nets.py)."""
import pytest
import torch

from plugins.backbones import get_model
from tools.kd_bench_nets import PatchFaceNet, register


def _params(model):
    return sum(p.numel() for p in model.parameters())


def test_benchmark_networks_embed_a_face_batch_and_the_teacher_is_the_larger():
    register()
    register()                                   # twice: no double registration
    torch.manual_seed(0)
    x = torch.randn(4, 3, 112, 112)
    sizes = {}
    for name in ("kdb_student", "kdb_patch_teacher", "kdb_patch_student"):
        model = get_model(name, num_features=32).eval()
        with torch.no_grad():
            out = model(x)
        assert out.shape == (4, 32) and out.dtype == torch.float32
        assert torch.isfinite(out).all()
        sizes[name] = _params(model)
    # the patch stem's geometry: 112 -> 28 -> 14 -> 7, fc over 128 x 7 x 7 / 16 x 7 x 7
    teacher = get_model("kdb_patch_teacher", num_features=32)
    student = get_model("kdb_patch_student", num_features=32)
    assert teacher.fc.in_features == 128 * 7 * 7 and student.fc.in_features == 16 * 7 * 7
    assert teacher.stem[0].stride == (4, 4) and teacher.stem[0].kernel_size == (4, 4)
    assert sizes["kdb_patch_teacher"] > 10 * sizes["kdb_patch_student"]


def test_patch_net_geometry_follows_its_stages():
    model = PatchFaceNet(4, (8, 16, 32), (1, 1, 2), num_features=8)
    assert model.fc.in_features == 32 * 4 * 4        # 28 -> 14 -> 7 -> 4
    assert len(model.stages) == 4
    assert model(torch.randn(2, 3, 112, 112)).shape == (2, 8)


@pytest.mark.parametrize("widths, depths", [((8, 16), (1,)), ((), ()), ((8, 16), (1, 0))])
def test_patch_net_refuses_stage_lists_that_do_not_match(widths, depths):
    with pytest.raises(ValueError, match="one depth >= 1 per stage width"):
        PatchFaceNet(4, widths, depths)


@pytest.mark.parametrize("kwargs", [{"fp16": True}, {"dropout": 0.1}])
def test_patch_nets_refuse_precision_and_dropout_they_do_not_implement(kwargs):
    register()
    with pytest.raises(ValueError, match="kdb_patch_student is a CPU benchmark network"):
        get_model("kdb_patch_student", num_features=8, **kwargs)


def test_patch_net_refuses_a_batch_of_the_wrong_size():
    with pytest.raises(ValueError):
        PatchFaceNet(4, (8,), (1,))(torch.randn(2, 3, 64, 64))
