import os

import numpy as np
import pytest
import torch

from plugins.classifier_io import load_teacher_classifier
from plugins.distributed import shard_range

C, D = 10, 4


def full_table(seed=0, num_classes=C, dim=D):
    return torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(seed))


def arcface_torch_checkpoint(fc_weight):
    """A checkpoint dict shaped like arcface_torch's save_all_states output for one rank: a tiny
    iresnet-style backbone state, the Partial FC shard, real SGD and LR-scheduler states."""
    backbone = {"conv1.weight": torch.randn(8, 3, 3, 3), "bn1.weight": torch.ones(8),
                "bn1.bias": torch.zeros(8), "bn1.running_mean": torch.zeros(8),
                "bn1.running_var": torch.ones(8), "bn1.num_batches_tracked": torch.tensor(12),
                "prelu.weight": torch.full((8,), 0.25), "fc.weight": torch.randn(D, 8),
                "fc.bias": torch.zeros(D), "features.weight": torch.ones(D),
                "features.bias": torch.zeros(D)}
    params = [torch.nn.Parameter(v.clone()) for k, v in backbone.items() if k.endswith("weight")]
    fc = torch.nn.Parameter(fc_weight.clone())
    optimizer = torch.optim.SGD([{"params": params}, {"params": [fc]}], lr=0.1, momentum=0.9,
                                weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=100, power=2.0)
    (sum(p.sum() for p in params) + fc.sum()).backward()
    optimizer.step()
    scheduler.step()
    return {"epoch": 3, "global_step": 12, "state_dict_backbone": backbone,
            "state_dict_softmax_fc": {"weight": fc_weight.clone()},
            "state_optimizer": optimizer.state_dict(),
            "state_lr_scheduler": scheduler.state_dict()}


def write_shards(directory, table, world):
    os.makedirs(directory, exist_ok=True)
    for rank in range(world):
        start, num_local = shard_range(table.shape[0], rank, world)
        torch.save(arcface_torch_checkpoint(table[start:start + num_local]),
                   os.path.join(directory, f"checkpoint_gpu_{rank}.pt"))
    return directory


@pytest.mark.parametrize("world", [1, 3])
def test_arcface_torch_shards_of_any_world_size(tmp_path, world):
    table = full_table(world)
    directory = write_shards(str(tmp_path / "r50"), table, world)
    got = load_teacher_classifier(directory, C, D)
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    torch.testing.assert_close(got, table, atol=0, rtol=0)
    one_file = os.path.join(directory, f"checkpoint_gpu_{world - 1}.pt")
    torch.testing.assert_close(load_teacher_classifier(one_file, C, D), table, atol=0, rtol=0)


def test_single_file_formats(tmp_path):
    table = full_table(1)
    sources = {
        "cd.pt": table.clone(),
        "dc.pt": table.t().contiguous(),
        "header.pth": {"kernel": table.t().contiguous()},  # AdaDistill header
        "ddp_header.pth": {"module.kernel": table.t().contiguous()},
        "partial_fc.pt": {"weight": table.clone()},
        "half.pt": table.half(),
        "single_rank_ckpt.pt": arcface_torch_checkpoint(table),
    }
    for name, obj in sources.items():
        torch.save(obj, str(tmp_path / name))
    np.save(str(tmp_path / "cd.npy"), table.numpy())
    np.save(str(tmp_path / "dc.npy"), table.t().numpy().astype(np.float64))
    for name in list(sources) + ["cd.npy", "dc.npy"]:
        got = load_teacher_classifier(str(tmp_path / name), C, D)
        assert got.shape == (C, D) and got.dtype == torch.float32 and got.is_contiguous(), name
        tol = 1e-3 if name == "half.pt" else 0
        torch.testing.assert_close(got, table, atol=tol, rtol=tol, msg=name)


def test_square_table_needs_an_explicit_layout(tmp_path):
    table = full_table(2, num_classes=D)
    path = str(tmp_path / "square.pt")
    torch.save(table.t().contiguous(), path)
    with pytest.raises(ValueError, match=r"square\.pt: tensor is square \[4, 4\].*layout='CD'"):
        load_teacher_classifier(path, D, D)
    torch.testing.assert_close(load_teacher_classifier(path, D, D, layout="DC"), table)
    torch.testing.assert_close(load_teacher_classifier(path, D, D, layout="CD"), table.t())
    with pytest.raises(ValueError, match="layout must be one of"):
        load_teacher_classifier(path, D, D, layout="row")


def test_shard_errors(tmp_path):
    directory = write_shards(str(tmp_path / "r50"), full_table(3), 3)
    with pytest.raises(ValueError, match=r"checkpoint_gpu_0\.pt: state_dict_softmax_fc\.weight "
                                         r"has shape \[4, 4\], expected \[4, 5\]"):
        load_teacher_classifier(directory, C, 5)
    with pytest.raises(ValueError, match=r"checkpoint_gpu_1\.pt: state_dict_softmax_fc\.weight "
                                         r"has shape \[3, 4\], expected \[4, 4\] \(rank 1 of 3 "
                                         r"for num_classes=12"):
        load_teacher_classifier(directory, 12, D)
    os.remove(os.path.join(directory, "checkpoint_gpu_1.pt"))
    with pytest.raises(ValueError, match=r"found ranks \[0, 2\] but \['checkpoint_gpu_1\.pt'\] "
                                         r"missing"):
        load_teacher_classifier(directory, C, D)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"empty: no checkpoint_gpu_\{rank\}\.pt files found"):
        load_teacher_classifier(str(empty), C, D)
    broken = write_shards(str(tmp_path / "broken"), full_table(4), 1)
    ckpt = torch.load(os.path.join(broken, "checkpoint_gpu_0.pt"), weights_only=True)
    del ckpt["state_dict_softmax_fc"]
    torch.save(ckpt, os.path.join(broken, "checkpoint_gpu_0.pt"))
    with pytest.raises(ValueError, match=r"checkpoint_gpu_0\.pt: key 'state_dict_softmax_fc' "
                                         r"missing \(found \['epoch', 'global_step'"):
        load_teacher_classifier(broken, C, D)
    ckpt["state_dict_softmax_fc"] = {"kernel": torch.zeros(D, C)}
    torch.save(ckpt, os.path.join(broken, "checkpoint_gpu_0.pt"))
    with pytest.raises(ValueError, match=r"key 'state_dict_softmax_fc\.weight' missing "
                                         r"\(found \['kernel'\]\)"):
        load_teacher_classifier(broken, C, D)


class NotATensor:
    pass


def test_single_file_errors(tmp_path):
    def save(name, obj):
        path = str(tmp_path / name)
        torch.save(obj, path)
        return path

    with pytest.raises(ValueError, match=r"header\.pth: kernel has shape \[4, 10\], expected "
                                         r"\[5, 10\] \(layout DC, num_classes=10, "
                                         r"embedding_size=5\)"):
        load_teacher_classifier(save("header.pth", {"kernel": torch.zeros(D, C)}), C, 5)
    with pytest.raises(ValueError, match=r"fc\.pt: weight has shape \[10, 4\], expected "
                                         r"\[11, 4\]"):
        load_teacher_classifier(save("fc.pt", {"weight": torch.zeros(C, D)}), 11, D)
    with pytest.raises(ValueError, match=r"t\.pt: tensor has shape \[9, 4\], expected "
                                         r"\[num_classes, embedding_size\] = \[10, 4\] or the "
                                         r"transpose \[4, 10\]"):
        load_teacher_classifier(save("t.pt", torch.zeros(9, D)), C, D)
    with pytest.raises(ValueError, match=r"exactly one of the keys .* found none among keys "
                                         r"\['bias', 'scale'\]"):
        load_teacher_classifier(save("other.pt", {"bias": torch.zeros(C), "scale": 1.0}), C, D)
    with pytest.raises(ValueError, match=r"found both kernel and weight"):
        load_teacher_classifier(save("both.pt", {"kernel": torch.zeros(D, C),
                                                 "weight": torch.zeros(C, D)}), C, D)
    with pytest.raises(ValueError, match=r"list\.pt: expected a tensor or a dict.*found list"):
        load_teacher_classifier(save("list.pt", [torch.zeros(C, D)]), C, D)
    with pytest.raises(ValueError, match=r"int\.pt: kernel must be a floating-point tensor, "
                                         r"found torch\.int64 tensor"):
        load_teacher_classifier(save("int.pt", {"kernel": torch.zeros(D, C, dtype=torch.long)}),
                                C, D)
    with pytest.raises(ValueError, match=r"object\.pt: cannot be read with "
                                         r"torch\.load\(weights_only=True\)"):
        load_teacher_classifier(save("object.pt", {"kernel": NotATensor()}), C, D)
    np.save(str(tmp_path / "labels.npy"), np.zeros((C, D), dtype=np.int32))
    with pytest.raises(ValueError, match=r"labels\.npy: array must be floating point"):
        load_teacher_classifier(str(tmp_path / "labels.npy"), C, D)
    np.save(str(tmp_path / "pickled.npy"), np.array([{"kernel": 1}], dtype=object))
    with pytest.raises(ValueError, match=r"pickled\.npy: not a plain numeric \.npy array"):
        load_teacher_classifier(str(tmp_path / "pickled.npy"), C, D)
    np.save(str(tmp_path / "wrong.npy"), np.zeros((C, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"wrong\.npy: array has shape \[10, 3\], expected "
                                         r".* = \[10, 4\] or the transpose \[4, 10\]"):
        load_teacher_classifier(str(tmp_path / "wrong.npy"), C, D)
    with pytest.raises(FileNotFoundError, match="teacher classifier not found"):
        load_teacher_classifier(str(tmp_path / "missing.pth"), C, D)
    with pytest.raises(ValueError, match="num_classes and embedding_size must be >= 1"):
        load_teacher_classifier(str(tmp_path / "fc.pt"), 0, D)
