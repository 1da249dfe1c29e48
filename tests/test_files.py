"""File safety: weights-only loading with one-line errors, atomic writes, output path checks."""
import os

import pytest
import torch

from sj_parallel_conversion import fileio
from sj_parallel_conversion.tools import models


class _Marker:
    """Unpickling this object would create a file: proof that code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def crafted_file(tmp_path, name="evil.pt"):
    """A PyTorch file whose unpickling would create ``marker``."""
    marker = tmp_path / "PWNED"
    path = tmp_path / name
    torch.save({"state_dict": {"w": torch.ones(1)}, "payload": _Marker(str(marker))}, path)
    return path, marker


def test_crafted_file_refused_without_running(tmp_path):
    path, marker = crafted_file(tmp_path)
    with pytest.raises(fileio.FileError, match="only pickle can load.*state_dict"):
        fileio.load_tensor_file(path, what="checkpoint")
    with pytest.raises(fileio.FileError, match="pickle"):
        models.load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["missing", "directory", "empty", "garbage", "truncated"])
def test_bad_files_give_one_line_naming_the_file(tmp_path, kind):
    path = tmp_path / "model.pt"
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"not a checkpoint at all" * 20)
    elif kind == "truncated":
        torch.save({"w": torch.randn(1000)}, path)
        path.write_bytes(path.read_bytes()[:300])
    with pytest.raises((FileNotFoundError, fileio.FileError)) as info:
        fileio.load_tensor_file(path, what="checkpoint")
    msg = str(info.value)
    assert "checkpoint" in msg and str(path) in msg and "\n" not in msg
    assert {"missing": "does not exist", "directory": "directory", "empty": "empty"}.get(kind, "corrupt") in msg


def test_weights_only_file_round_trip(tmp_path):
    blob = {"state_dict": {"w": torch.randn(3, 2)}, "epoch": 3, "name": "x"}
    fileio.save_tensors(blob, tmp_path / "ok.pt")
    back = fileio.load_tensor_file(tmp_path / "ok.pt")
    assert torch.equal(back["state_dict"]["w"], blob["state_dict"]["w"]) and back["epoch"] == 3


@pytest.mark.parametrize("interrupt", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failing_write_keeps_previous_file(tmp_path, monkeypatch, interrupt):
    target = tmp_path / "out.pt"
    fileio.save_tensors({"v": torch.arange(5)}, target)
    before = target.read_bytes()
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)  # the temp file is fully written, then the "disk" fails
        with open(f, "ab") as fh:
            fh.write(b"partial")
        raise interrupt

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(fileio.FileError if isinstance(interrupt, OSError) else KeyboardInterrupt) as info:
        fileio.save_tensors({"v": torch.arange(100)}, target)
    if isinstance(interrupt, OSError):
        assert str(target) in str(info.value) and "No space left" in str(info.value)
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["out.pt"]  # no temporary file left behind


def test_atomic_write_keeps_mode_and_writes_text(tmp_path):
    target = tmp_path / "t.json"
    fileio.write_json(target, {"a": 1})
    os.chmod(target, 0o640)
    fileio.write_json(target, {"a": 2})
    assert oct(os.stat(target).st_mode & 0o777) == oct(0o640)
    assert '"a": 2' in target.read_text()


def test_check_output_path(tmp_path):
    inp = tmp_path / "in.pt"
    inp.write_bytes(b"x")
    assert fileio.check_output_path(tmp_path / "new.pt", inputs=[inp]) == str(tmp_path / "new.pt")
    with pytest.raises(fileio.FileError, match="directory"):
        fileio.check_output_path(tmp_path)
    with pytest.raises(fileio.FileError, match="does not exist"):
        fileio.check_output_path(tmp_path / "nope" / "x.pt")
    with pytest.raises(fileio.FileError, match="same file as the input"):
        fileio.check_output_path(inp, inputs=[None, inp])
    link = tmp_path / "link.pt"
    os.symlink(inp, link)
    with pytest.raises(fileio.FileError, match="same file"):
        fileio.check_output_path(link, inputs=[inp])
    # a relative spelling of the same path
    here = os.getcwd()
    try:
        os.chdir(tmp_path)
        with pytest.raises(fileio.FileError, match="same file"):
            fileio.check_output_path("./in.pt", inputs=[str(inp)])
    finally:
        os.chdir(here)


class Wrapper(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.module = models.build_model("digits_cnn", in_channels=1)

    def forward(self, x):
        return self.module(x)


def test_user_weights_layouts_and_prefixes(tmp_path):
    from sj_parallel_conversion import load_user_model

    ref = models.build_model("digits_cnn", in_channels=1).state_dict()
    layouts = {
        "plain": ref,
        "public": {"state_dict": {f"module.{k}": v for k, v in ref.items()}, "best_prec1": 91.2},
        "model": {"model": {f"_orig_mod.{k}": v for k, v in ref.items()}, "epoch": 4},
        "nested": {"model_state_dict": {"state_dict": ref}},
        # torch.compile(DataParallel(m)) and DataParallel(torch.compile(m)): both orders of the prefixes
        "compiled data-parallel": {f"_orig_mod.module.{k}": v for k, v in ref.items()},
        "data-parallel compiled": {f"module._orig_mod.{k}": v for k, v in ref.items()},
    }
    for name, blob in layouts.items():
        torch.save(blob, tmp_path / f"{name}.pth")
        m = load_user_model("digits_cnn", tmp_path / f"{name}.pth", in_channels=1)
        assert all(torch.equal(m.state_dict()[k], v) for k, v in ref.items()), name
        assert not m.training
    # A model whose own submodule is called "module" (an EMA or normalisation wrapper): its own
    # state_dict loads as torch's strict load_state_dict takes it, prefix kept.
    torch.save(Wrapper().state_dict(), tmp_path / "wrapper.pth")
    m = load_user_model(f"{__name__}:Wrapper", tmp_path / "wrapper.pth")
    assert all(torch.equal(m.state_dict()[k], v) for k, v in Wrapper().state_dict().items())
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "none.pth")
    with pytest.raises(ValueError, match=r"holds no state_dict \(top-level keys \['epoch', 'lr'\]\)"):
        load_user_model("digits_cnn", tmp_path / "none.pth", in_channels=1)
