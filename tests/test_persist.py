"""fxquant.save / fxquant.load: bit-exact round trip, compile after load without quantizing, and
a clear error (and nothing returned) for every kind of bad file."""
import json
import warnings

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

import fxquant
from fxquant import persist
from fxquant.configs import ALL_CONFIGS
from helpers import Forms, Tiny

CONFIGS = [fxquant.Int8WeightOnly(), fxquant.Int4WeightOnly(group_size=32),
           fxquant.Int4WeightOnly(group_size=64, symmetric=True), fxquant.Int8DynamicActivationInt8Weight(),
           fxquant.Float8DynamicActivationFloat8Weight(granularity="row"),
           fxquant.Float8DynamicActivationFloat8Weight(granularity="tensor"), fxquant.Float8WeightOnly()]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _same(a: fxquant.QuantizedWeights, b: fxquant.QuantizedWeights) -> None:
    assert a.config == b.config and list(a) == list(b)
    for name in a:
        x, y = a[name], b[name]
        assert (x.static, x.shape_nk, x.transposed, x.dtype, x.aliases) == \
               (y.static, y.shape_nk, y.transposed, y.dtype, y.aliases)
        assert [(t.dtype, t.shape) for t in x.tensors] == [(t.dtype, t.shape) for t in y.tensors]
        assert all(torch.equal(_bits(s), _bits(t)) for s, t in zip(x.tensors, y.tensors))


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    qw = fxquant.quantize_weights(model, fxquant.Int4WeightOnly(group_size=32, layout="rows"))
    path = tmp_path / "w.safetensors"
    assert fxquant.save(qw, path) == str(path)
    return model, qw, path


def _rewrite(src, dst, *, meta=None, drop=(), add=None, replace=None, fix_digest=True):
    """Copy a saved file with edited metadata / tensors; the digest is recomputed unless told not to."""
    with safe_open(str(src), framework="pt") as f:
        m = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys() if k not in drop}
    m.update(meta or {})
    tensors.update(add or {})
    tensors.update(replace or {})
    if fix_digest:
        m["digest"] = persist._digest(m)
    save_file(tensors, str(dst), metadata=m)
    return dst


# --------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.describe())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_exact(cfg, dtype, tmp_path):
    torch.manual_seed(0)
    qw = fxquant.quantize_weights(Tiny().to(dtype), cfg)
    assert len(qw) == 11 and qw.nbytes > 0
    _same(qw, fxquant.load(fxquant.save(qw, tmp_path / "w.safetensors")))


def test_quantize_weights_report_skip_filter_and_tied_aliases():
    model = Tiny()
    qw = fxquant.quantize_weights(model, fxquant.Int8WeightOnly(), skip=["*.down"],
                                  filter=lambda name, shape: name != "blocks.1.q")
    assert "blocks.0.down.weight" not in qw and "blocks.1.q.weight" not in qw
    # lm_head's weight is the embedding's: stored once, found under both names.
    assert qw["emb.weight"].aliases == ("lm_head.weight",) and "lm_head.weight" in qw
    status = {r.name: (r.status, r.reason) for r in qw.report}
    assert status["blocks.0.down"] == ("skipped", "name matches skip pattern '*.down'")
    assert status["blocks.1.q"] == ("skipped", "excluded by filter")
    assert status["lm_head"][0] == "quantized"
    # A shape the scheme cannot take is skipped with the backend's reason.
    qw4 = fxquant.quantize_weights(nn.Sequential(nn.Linear(48, 8)), fxquant.Int4WeightOnly(group_size=32))
    assert len(qw4) == 0 and "not a multiple of group_size=32" in qw4.report[0].reason


def test_config_json_round_trips_every_config():
    for cls in ALL_CONFIGS:
        cfg = cls()
        assert persist.config_from_json(persist.config_to_json(cfg)) == cfg


# --------------------------------------------------------------------------- compile after load
def _compile(model, x, **backend_kwargs):
    torch._dynamo.reset()
    be = fxquant.backend(**backend_kwargs)
    with torch.no_grad():
        return be, torch.compile(model, backend=be)(x)


@pytest.mark.parametrize("cfg", [fxquant.Int4WeightOnly(group_size=32), fxquant.Int8DynamicActivationInt8Weight()],
                         ids=lambda c: c.scheme)
def test_compile_after_load_does_not_quantize_and_is_identical(cfg, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model, ids = Tiny(), torch.randint(0, 96, (2, 7))
    be_ref, ref = _compile(model, ids, config=cfg)
    loaded = fxquant.load(fxquant.save(fxquant.quantize_weights(model, cfg), tmp_path / "w.safetensors"))

    def no_pack(self, w):
        raise AssertionError("config.pack called although the weights were prepacked")
    monkeypatch.setattr(type(cfg), "pack", no_pack)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "packed at compile time" warning either
        be, out = _compile(model, ids, prepacked=loaded)
    assert torch.equal(out, ref)
    assert be.config == cfg
    assert [(r.name, r.status, r.bytes_after) for r in be.report] == \
           [(r.name, r.status, r.bytes_after) for r in be_ref.report]


def test_fxquant_compile_and_export_program_take_prepacked(saved, monkeypatch):
    model, qw, _ = saved
    ids = torch.randint(0, 96, (2, 5))
    torch._dynamo.reset()
    with torch.no_grad():
        ref = torch.compile(model, backend=fxquant.backend(qw.config))(ids)
        prog_ref = fxquant.export_program(model, (ids,), qw.config)
    monkeypatch.setattr(type(qw.config), "pack", lambda self, w: pytest.fail("pack called"))
    torch._dynamo.reset()
    with torch.no_grad():
        assert torch.equal(fxquant.compile(model, prepacked=qw)(ids), ref)
        prog = fxquant.export_program(model, (ids,), None, prepacked=qw)
        assert torch.equal(prog.module()(ids), prog_ref.module()(ids))


def test_weights_missing_from_prepacked_are_packed_with_a_warning(tmp_path):
    model, x = Forms(), torch.randn(2, 3, 64)
    qw = fxquant.quantize_weights(model, fxquant.Int8WeightOnly())  # sees only the nn.Linear
    assert list(qw) == ["lin.weight"]
    _, ref = _compile(model, x, config=fxquant.Int8WeightOnly())
    with pytest.warns(UserWarning, match=r"4 layer\(s\) were not in them and were quantized at compile time"):
        _, out = _compile(model, x, prepacked=qw)
    assert torch.equal(out, ref)


def test_config_mismatch_is_an_error(saved):
    _, qw, _ = saved
    for other in (fxquant.Int4WeightOnly(group_size=64), fxquant.Int8WeightOnly()):
        with pytest.raises(ValueError, match=r"prepacked weights were quantized with int4_weight_only\(group_size=32"):
            fxquant.backend(other, prepacked=qw)
    with pytest.raises(ValueError, match="prepacked weights were quantized with"):
        fxquant.Backend.from_options({"config": fxquant.Int8WeightOnly(), "prepacked": qw})
    with pytest.raises(TypeError, match="prepacked must be fxquant.QuantizedWeights"):
        fxquant.backend(prepacked={"w": torch.zeros(1)})


def test_prepacked_for_another_shape_or_dtype_is_an_error():
    torch.manual_seed(0)
    qw = fxquant.quantize_weights(nn.Sequential(nn.Linear(64, 32)), fxquant.Int8WeightOnly())
    with pytest.raises(Exception, match=r"prepacked weight '0.weight' \(layer '0'\) was packed for \[N, K\]=\[32, 64\]"):
        _compile(nn.Sequential(nn.Linear(64, 16)), torch.randn(2, 64), prepacked=qw)
    with pytest.raises(Exception, match=r"packed for .*torch.float32 but the graph uses .*torch.bfloat16"):
        _compile(nn.Sequential(nn.Linear(64, 32)).bfloat16(), torch.randn(2, 64, dtype=torch.bfloat16),
                 prepacked=qw)


# --------------------------------------------------------------------------- bad files
def test_save_rejects_other_objects(tmp_path):
    with pytest.raises(TypeError, match="expected QuantizedWeights"):
        fxquant.save({"w": torch.zeros(2)}, tmp_path / "w.safetensors")


def test_save_is_atomic(saved, monkeypatch):
    _, qw, path = saved
    before = open(path, "rb").read()

    def crash(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise OSError("disk full")
    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        fxquant.save(qw, path)
    assert open(path, "rb").read() == before  # the old file is intact, no temp file left
    assert [p.name for p in path.parent.iterdir()] == ["w.safetensors"]


def test_truncated_file(saved, tmp_path):
    _, _, path = saved
    data = open(path, "rb").read()
    for n in (len(data) - 1, len(data) // 2, 100, 4, 0):
        bad = tmp_path / f"cut{n}.safetensors"
        bad.write_bytes(data[:n])
        with pytest.raises(fxquant.FormatError, match="truncated or damaged"):
            fxquant.load(bad)


def test_tampered_tensor_bytes(saved, tmp_path):
    _, _, path = saved
    data = bytearray(open(path, "rb").read())
    data[-10] ^= 0x01  # one bit of the last tensor's data
    bad = tmp_path / "bit.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(fxquant.FormatError, match="does not match its checksum"):
        fxquant.load(bad)


def test_replaced_tensor_with_valid_metadata(saved, tmp_path):
    _, qw, path = saved
    t = qw["blocks.0.q.weight"].tensors[0].clone()
    t[0, 0] ^= 0xFF
    bad = _rewrite(path, tmp_path / "swap.safetensors", replace={"blocks.0.q.weight#0": t})
    with pytest.raises(fxquant.FormatError, match=r"tensor 'blocks.0.q.weight#0' does not match its checksum"):
        fxquant.load(bad)


def test_missing_and_extra_tensors(saved, tmp_path):
    _, _, path = saved
    bad = _rewrite(path, tmp_path / "missing.safetensors", drop=("blocks.1.up.weight#1",))
    with pytest.raises(fxquant.FormatError, match=r"weight 'blocks.1.up.weight' is missing tensor\(s\) \['blocks.1.up.weight#1'\]"):
        fxquant.load(bad)
    bad = _rewrite(path, tmp_path / "extra.safetensors", add={"stray": torch.zeros(3)})
    with pytest.raises(fxquant.FormatError, match=r"tensors \['stray'\] belong to no weight record"):
        fxquant.load(bad)


def test_wrong_version_and_wrong_format(saved, tmp_path):
    _, _, path = saved
    bad = _rewrite(path, tmp_path / "v2.safetensors", meta={"format_version": "2"})
    with pytest.raises(fxquant.FormatError, match="has format version '2'; this fxquant reads version 1"):
        fxquant.load(bad)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(fxquant.FormatError, match="is not an fxquant quantized-weights file"):
        fxquant.load(plain)


def test_edited_metadata_fails_the_digest(saved, tmp_path):
    _, _, path = saved
    cfg = json.dumps({"scheme": "int4_weight_only", "class": "Int4WeightOnly",
                      "fields": {"group_size": 64, "symmetric": False}})
    bad = _rewrite(path, tmp_path / "cfg.safetensors", meta={"config": cfg}, fix_digest=False)
    with pytest.raises(fxquant.FormatError, match="does not match its digest"):
        fxquant.load(bad)


@pytest.mark.parametrize("text,match", [
    ("{not json", "invalid config metadata"),
    ('{"scheme": "int3", "class": "X", "fields": {}}', "invalid config metadata"),
    ('{"scheme": "int4_weight_only", "class": "Int4WeightOnly", "fields": {"group_size": 48, "symmetric": false}}',
     "group_size=48 is invalid"),
    ('{"scheme": "int4_weight_only", "class": "Int8WeightOnly", "fields": {}}', "does not match scheme"),
])
def test_invalid_config_metadata(saved, tmp_path, text, match):
    _, _, path = saved
    bad = _rewrite(path, tmp_path / "cfg.safetensors", meta={"config": text})
    with pytest.raises(fxquant.FormatError, match=match):
        fxquant.load(bad)


def test_config_that_does_not_fit_the_tensors(saved, tmp_path):
    _, _, path = saved
    cfg = persist.config_to_json(fxquant.Int4WeightOnly(group_size=64, layout="rows"))  # valid JSON, digest fixed
    bad = _rewrite(path, tmp_path / "cfg64.safetensors", meta={"config": cfg})
    with pytest.raises(fxquant.FormatError, match=r"but int4_weight_only\(group_size=64.* packs"):
        fxquant.load(bad)


def test_invalid_entries_metadata(saved, tmp_path):
    _, _, path = saved
    with safe_open(str(path), framework="pt") as f:
        entries = json.loads(f.metadata()["entries"])
    del entries["blocks.0.q.weight"]["shape_nk"]
    bad = _rewrite(path, tmp_path / "e.safetensors", meta={"entries": json.dumps(entries)})
    with pytest.raises(fxquant.FormatError, match=r"invalid record for weight 'blocks.0.q.weight'"):
        fxquant.load(bad)
    bad = _rewrite(path, tmp_path / "e2.safetensors", meta={"entries": "[1, 2]"})
    with pytest.raises(fxquant.FormatError, match="invalid 'entries' metadata"):
        fxquant.load(bad)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        fxquant.load(tmp_path / "nope.safetensors")
