"""Bundled backbones: registry, layouts identical to arcface_torch / AdaDistill, fp16, loading,
and the fork resolver.  Heavy networks are only built on the meta device."""
import contextlib
import functools
import io
import re
import sys
import textwrap

import pytest
import torch
from torch import nn

import plugins.backbones as backbones
from plugins.backbones import (_registry, get_model, list_models, load_backbone_weights,
                               register_model, resolve_model)
from plugins.backbones import iresnet as iresnet_module
from plugins.backbones._common import trunk_autocast
from plugins.backbones.iresnet import IResNet
from plugins.backbones.loading import fitting_networks, network_signature

# Reference figures of the upstream code (arcface_torch backbones/iresnet.py and mobilefacenet.py;
# AdaDistill backbones/mobilefacenet.py), D = 512: parameters counted as sum(p.numel() for p in
# model.parameters()), number of state_dict entries, and the sha256 of the lines
# f"{key}:{list(shape)}" joined by "\n" in state_dict order (pins every key name, shape and order).
REFERENCE = {
    "r18": (24_025_600, 187, "d9f69b379fff9d14"),
    "r34": (34_139_328, 331, "e43288b7e1973e3d"),
    "r50": (43_590_848, 475, "8a7b2043935693ba"),
    "r100": (65_156_160, 925, "f51836816fed9d96"),
    "r200": (118_833_920, 1807, "f1a6f59ada1bc4b9"),
    "mbf": (2_059_520, 333, "c1a7c38ace0a164f"),
    "mbf_large": (6_314_880, 606, "f2e26827106cd8fe"),
    "mobilefacenet": (1_199_488, 331, "893c22cfaf198f78"),
}
# The brief's rounded figures, checked to 1 % independently of the exact ones above.
PUBLISHED_PARAMS = {"r18": 24.0e6, "r50": 43.6e6, "r100": 65.2e6, "mbf": 2.06e6,
                    "mbf_large": 6.31e6, "mobilefacenet": 1.20e6}
DEMO_ONLY = {"tiny_s", "tiny_t"}
HEAVY = {"r34", "r50", "r100", "r200", "mbf_large"}  # meta device only in these tests
CHEAP = [name for name in list_models() if name not in HEAVY]


def _meta(name, **kwargs):
    with torch.device("meta"):
        return get_model(name, **kwargs)


def _layout_digest(model):
    import hashlib
    lines = [f"{k}:{list(v.shape)}" for k, v in model.state_dict().items()]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def _randomise_statistics(model, seed=0):
    """Non-trivial BN statistics and PReLU slopes, so eval-mode outputs depend on every buffer."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(torch.rand(module.running_mean.shape, generator=gen) - .5)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + .5)
            if isinstance(module, nn.PReLU):
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) * 0.5)
    return model.eval()


def _faces(n=2, seed=0):
    return torch.rand(n, 3, 112, 112, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------- registry

def test_registry_names_and_wildcards():
    assert list_models()[:8] == ["r18", "r34", "r50", "r100", "r200", "mbf", "mbf_large",
                                 "mobilefacenet"]
    assert set(list_models()) == set(REFERENCE) | DEMO_ONLY
    assert list_models("r*") == ["r18", "r34", "r50", "r100", "r200"]
    assert list_models("tiny_?") == ["tiny_s", "tiny_t"]


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as info:
        get_model("r1000")
    message = str(info.value)
    assert "unknown backbone 'r1000'" in message
    for name in list_models():
        assert name in message


def test_register_twice_warns_and_replaces(monkeypatch):
    monkeypatch.setattr(_registry, "_FACTORIES", dict(_registry._FACTORIES))

    @register_model("test_net")
    def first(num_features: int = 512, fp16: bool = False):
        return nn.Linear(1, num_features)

    with pytest.warns(RuntimeWarning, match="'test_net' is registered twice"):
        @register_model("test_net")
        def second(num_features: int = 512, fp16: bool = False):
            return nn.Linear(2, num_features)

    assert get_model("test_net", num_features=3).in_features == 2
    assert "test_net" in list_models()


def test_options_are_checked():
    assert _meta("r18", dropout=0.2).dropout.p == pytest.approx(0.2)
    assert _meta("r50", use_checkpoint=True).use_checkpoint is True
    with pytest.raises(ValueError, match=r"'mbf' has no dropout layer; set dropout=0.0"):
        _meta("mbf", dropout=0.1)
    with pytest.raises(ValueError, match=r"'r18' has no option\(s\) \['bogus'\].*use_checkpoint"):
        _meta("r18", bogus=1)
    with pytest.raises(ValueError, match=r"'mobilefacenet' has no option\(s\) "
                                         r"\['use_checkpoint'\]; its extra options: none"):
        _meta("mobilefacenet", use_checkpoint=True)
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        _meta("tiny_s", num_features=0)
    assert _meta("mbf", dropout=0.0) is not None  # arcface_torch passes dropout=0.0 to every net


# ---------------------------------------------------------------- layouts (meta device)

@pytest.mark.parametrize("name", list_models())
def test_layout_and_parameter_count(name):
    model = _meta(name)
    params = sum(p.numel() for p in model.parameters())
    if name in DEMO_ONLY:
        assert 1e6 < params < 5e6, params  # small enough for CPU demos
    else:
        ref_params, ref_keys, ref_digest = REFERENCE[name]
        assert params == ref_params
        assert len(model.state_dict()) == ref_keys
        assert _layout_digest(model) == ref_digest
    if name in PUBLISHED_PARAMS:
        assert abs(params / PUBLISHED_PARAMS[name] - 1) < 0.01
    # the embedding size reaches the last BatchNorm1d
    small = _meta(name, num_features=96)
    last_mean = [v for k, v in small.state_dict().items() if k.endswith("running_mean")][-1]
    assert last_mean.shape == (96,)


def test_spot_check_upstream_keys():
    r18 = _meta("r18").state_dict()
    assert r18["fc.weight"].shape == (512, 25088) and r18["fc.bias"].shape == (512,)
    assert r18["layer1.0.downsample.0.weight"].shape == (64, 64, 1, 1)
    assert "layer1.1.downsample.0.weight" not in r18
    assert _meta("r18").features.weight.requires_grad is False
    mbf = _meta("mbf").state_dict()
    assert mbf["layers.1.layers.0.weight"].shape == (128, 2, 3, 3)  # groups=64 over 128 channels
    assert mbf["features.layers.2.weight"].shape == (512, 512)
    mfn = _meta("mobilefacenet").state_dict()
    assert mfn["conv_5.model.1.project.conv.weight"].shape == (128, 256, 1, 1)
    assert "conv_23.project.prelu.weight" not in mfn
    assert "output_layer.bn.weight" not in mfn and "output_layer.bn.running_mean" in mfn


def test_iresnet_embedding_scale_is_frozen_at_one():
    r18 = get_model("r18")
    assert torch.equal(r18.features.weight, torch.ones(512))
    assert "features.weight" in r18.state_dict()
    assert not r18.features.weight.requires_grad


# ---------------------------------------------------------------- forward (cheap nets only)

@functools.lru_cache(maxsize=None)
def _reference(name, num_features=512):
    """(model in eval mode with randomised statistics, its output on ``_faces()``), built once per
    test session; tests must not modify either."""
    torch.manual_seed(0)
    model = _randomise_statistics(get_model(name, num_features=num_features))
    with torch.no_grad():
        return model, model(_faces())


@pytest.mark.parametrize("name", CHEAP)
def test_forward_shape(name):
    # a second embedding size only where a forward is nearly free; test_layout_and_parameter_count
    # checks num_features for every network on the meta device
    sizes = [512, 64] if name in DEMO_ONLY else [512]
    for num_features in sizes:
        out = _reference(name, num_features)[1]
        assert out.shape == (2, num_features) and out.dtype == torch.float32
        assert torch.isfinite(out).all()
        assert not torch.allclose(out[0], out[1])  # depends on the input


@pytest.mark.parametrize("name", CHEAP)
def test_state_dict_round_trip(name):
    model, want = _reference(name)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, map_location="cpu", weights_only=True)
    torch.manual_seed(2)
    fresh = get_model(name).eval()
    assert not all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), state.values()))
    assert load_backbone_weights(fresh, state, name) is fresh
    with torch.no_grad():
        assert torch.equal(fresh(_faces()), want)


def test_bad_input_shape():
    with pytest.raises(ValueError, match=r"\[B, 3, 112, 112\].*got \[2, 3, 96, 96\]"):
        get_model("tiny_s")(torch.zeros(2, 3, 96, 96))


# ---------------------------------------------------------------- fp16

@pytest.mark.parametrize("name", CHEAP)
def test_fp16_on_cpu_runs_trunk_in_bfloat16_and_head_in_fp32(name):
    reference, want = _reference(name)
    mixed = get_model(name, fp16=True).eval()
    mixed.load_state_dict(reference.state_dict())
    dtypes = {}

    def record(key, use_input):
        def hook(module, inputs, output):
            dtypes[key] = (inputs[0] if use_input else output).dtype
        return hook

    first_conv = next(m for m in mixed.modules() if isinstance(m, nn.Conv2d))
    last_linear = [m for m in mixed.modules() if isinstance(m, nn.Linear)][-1]
    first_conv.register_forward_hook(record("first_conv", use_input=False))
    last_linear.register_forward_hook(record("linear_in", use_input=True))
    with torch.no_grad():
        got = mixed(_faces())
    assert dtypes == {"first_conv": torch.bfloat16, "linear_in": torch.float32}
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    # bfloat16 trunk (8-bit mantissa): same embedding direction up to rounding
    cosine = torch.nn.functional.cosine_similarity(got, want)
    assert (cosine > 0.98).all(), cosine
    assert all(v.dtype == torch.float32 for v in mixed.state_dict().values()
               if v.is_floating_point())


def test_trunk_autocast_rule():
    assert isinstance(trunk_autocast(torch.zeros(1), False), contextlib.nullcontext)
    cpu = trunk_autocast(torch.zeros(1), True)
    assert isinstance(cpu, torch.autocast) and cpu.fast_dtype == torch.bfloat16
    assert isinstance(trunk_autocast(torch.zeros(1, device="meta"), True), contextlib.nullcontext)


def test_use_checkpoint_gives_identical_gradients(monkeypatch):
    calls = []
    real = iresnet_module.checkpoint
    monkeypatch.setattr(iresnet_module, "checkpoint",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    plain = IResNet((1, 1, 1, 2), num_features=8).train()
    ckpt = IResNet((1, 1, 1, 2), num_features=8, use_checkpoint=True).train()
    ckpt.load_state_dict(plain.state_dict())
    # the last stage on a small [2, 256, 4, 4] map keeps the test cheap; forward() runs
    # every stage through the same _run_stage
    x = torch.randn(2, 256, 4, 4)
    grads = []
    for model in (plain, ckpt):
        inp = x.clone().requires_grad_(True)
        model._run_stage(model.layer4, inp).square().sum().backward()
        grads.append([inp.grad] + [p.grad for p in model.layer4.parameters()])
    assert len(calls) == 2  # one per block of layer4, only for the checkpointed model
    for a, b in zip(*grads):
        assert a is not None and torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # no recomputation needed without gradients
        ckpt._run_stage(ckpt.layer4, x)
    assert len(calls) == 2


# ---------------------------------------------------------------- loading errors

def test_r18_checkpoint_into_r50_names_r18():
    state = _meta("r18").state_dict()
    r50 = _meta("r50")
    with pytest.raises(ValueError) as info:
        load_backbone_weights(r50, state, "r50")
    message = str(info.value)
    assert message.startswith("state_dict does not fit backbone 'r50'")
    # r50 has 475 keys, r18 187, all of them in r50 with equal shapes: the first missing key is
    # the third block of layer1
    assert "288 missing keys, 0 unexpected keys, 0 wrong shapes" in message
    assert "(model has 475 keys, checkpoint 187)" in message
    assert "missing: layer1.2.bn1.weight [64], layer1.2.bn1.bias [64]" in message
    assert "it fits: r18;" in message


def test_wrong_embedding_size_reports_shapes_and_the_fitting_size(tmp_path):
    path = tmp_path / "mbf_256.pt"
    torch.save(_randomise_statistics(get_model("mbf", num_features=256)).state_dict(), path)
    with pytest.raises(ValueError) as info:
        load_backbone_weights(_meta("mbf"), str(path), "mbf")
    message = str(info.value)
    assert f"checkpoint {path} does not fit backbone 'mbf'" in message
    assert "0 missing keys, 0 unexpected keys, 5 wrong shapes" in message
    assert "features.layers.2.weight expected [512, 512] found [256, 512]" in message
    assert "it fits: mbf(num_features=256)" in message


def test_unexpected_keys_and_no_fitting_network():
    state = get_model("tiny_s", num_features=8).state_dict()
    state["extra.weight"] = torch.zeros(3)
    with pytest.raises(ValueError) as info:
        load_backbone_weights(get_model("tiny_s", num_features=8), state, "tiny_s")
    message = str(info.value)
    assert "0 missing keys, 1 unexpected keys, 0 wrong shapes" in message
    assert "unexpected: extra.weight [3]" in message
    assert "it fits none of the registered networks" in message


def test_wrappers_and_prefixes_are_removed(tmp_path):
    torch.manual_seed(0)
    model = _randomise_statistics(get_model("tiny_s", num_features=16))
    wrapped = {"epoch": 3, "state_dict_backbone": {
        "module." + k: v for k, v in model.state_dict().items()}}
    path = tmp_path / "checkpoint_gpu_0.pt"
    torch.save(wrapped, path)
    fresh = get_model("tiny_s", num_features=16).eval()
    ddp_like = load_backbone_weights(fresh, str(path), "tiny_s")
    assert ddp_like is fresh
    with torch.no_grad():
        assert torch.equal(fresh(_faces()), model(_faces()))
    with pytest.raises(ValueError, match=r"no backbone state_dict found; top-level keys \['epoch'"):
        load_backbone_weights(fresh, {"epoch": 3}, "tiny_s")


class _NotATensor:
    pass


def test_unsafe_pickle_is_refused_with_the_path(tmp_path):
    path = tmp_path / "pickled_model.pt"
    torch.save({"x": _NotATensor()}, path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": not loadable with "
                                         r"torch.load\(weights_only=True\)"):
        load_backbone_weights(get_model("tiny_s"), str(path), "tiny_s")


def test_corrupt_file_names_the_path(tmp_path):
    path = tmp_path / "truncated.pt"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": not loadable"):
        load_backbone_weights(get_model("tiny_s"), str(path), "tiny_s")


def test_fitting_networks_uses_meta_signatures():
    state = _meta("r200", num_features=128).state_dict()  # a meta state: shapes only
    assert fitting_networks(state) == ["r200(num_features=128)"]
    assert network_signature("r200")[0] == ("conv1.weight", (64, 3, 3, 3))


# ---------------------------------------------------------------- fork resolver

FORK_SOURCE = '''
from torch import nn

class ForkNet(nn.Module):
    def __init__(self, num_features):
        super().__init__()
        self.fc = nn.Linear(4, num_features)

def get_model(name, **kwargs):
    if name == "fork_net":
        return ForkNet(kwargs.get("num_features", 512))
    if name == "r18":  # the fork's own r18 shadows ours
        return ForkNet(kwargs.get("num_features", 512))
    {fallback}
'''


@pytest.fixture
def fake_fork(tmp_path, monkeypatch):
    """Write a top-level ``backbones`` package into ``tmp_path`` and put it on ``sys.path``."""
    assert "backbones" not in sys.modules

    def make(fallback="raise ValueError()"):
        package = tmp_path / "backbones"
        package.mkdir()
        (package / "__init__.py").write_text(
            textwrap.dedent(FORK_SOURCE).replace("{fallback}", fallback))
        monkeypatch.syspath_prepend(str(tmp_path))

    yield make
    for key in [k for k in sys.modules if k == "backbones" or k.startswith("backbones.")]:
        del sys.modules[key]


def test_resolver_without_fork_uses_bundled():
    assert backbones.fork_backbones_module() is None
    assert type(resolve_model("tiny_s", num_features=8)).__name__ == "TinyFaceNet"


def test_resolver_prefers_fork_then_falls_back(fake_fork):
    fake_fork()
    fork_net = resolve_model("fork_net", num_features=8)
    assert type(fork_net).__module__ == "backbones" and fork_net.fc.out_features == 8
    assert type(resolve_model("r18", num_features=8)).__module__ == "backbones"
    assert isinstance(resolve_model("tiny_s", num_features=8), nn.Module)
    assert type(resolve_model("tiny_s")).__module__ == "plugins.backbones.tiny"
    with pytest.raises(ValueError, match=r"unknown backbone 'nope'.*refused it too"):
        resolve_model("nope")


def test_resolver_does_not_recurse_when_fork_falls_back_to_it(fake_fork):
    fake_fork("from plugins.backbones import resolve_model\n"
              "    return resolve_model(name, **kwargs)")
    model = resolve_model("tiny_t", num_features=8)
    assert type(model).__module__ == "plugins.backbones.tiny"
    with pytest.raises(ValueError, match="unknown backbone 'nope'"):
        resolve_model("nope")


def test_resolver_ignores_our_own_package_imported_as_backbones(monkeypatch):
    import os
    monkeypatch.syspath_prepend(os.path.dirname(os.path.dirname(backbones.__file__)))
    try:
        import backbones as same_code  # plugins/ on sys.path: our package under another name
        assert os.path.samefile(same_code.__file__, backbones.__file__)
        assert backbones.fork_backbones_module() is None
        assert type(resolve_model("tiny_s")).__module__ == "plugins.backbones.tiny"
    finally:
        for key in [k for k in sys.modules if k == "backbones" or k.startswith("backbones.")]:
            del sys.modules[key]
