"""load_snn against crafted files: every field of a real saved network is mutated with code strings,
non-identifiers and unknown names, and every mutation must be refused at load time without running
anything (a sentinel global and a sentinel file prove that no payload ran)."""
from __future__ import annotations

import builtins
import copy
import itertools
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sj_parallel_conversion import ParallelConversionRecipe, ParallelConverter, fileio, load_snn, save_snn

SENTINEL = "SJPC_FUZZ_RAN"


def _payloads(marker: str):
    """Strings that run code wherever they reach fx's generated source unescaped. None holds a
    dot, so a target splitting on dots keeps each one whole."""
    set_flag = f'setattr(__import__("builtins"),"{SENTINEL}",1)'
    touch = f'open({marker!r},"w")'
    return [
        f"x=exec({set_flag!r})",                    # a placeholder default evaluated at definition
        f'x") if {set_flag} else getattr(self,"x',  # closes getattr(self, "..."): runs at forward
        f'x"),{set_flag},getattr(self,"x',
        f"x,{set_flag}",
        f'{set_flag} or x',
        touch,
        "not an identifier", "", "1x", "a..b", "__class__", "import", UNKNOWN,
    ]


# A name that is an identifier but names nothing: refused wherever a name must resolve (targets,
# node references, functions, types, parameters). Node names, a placeholder's target, keywords and
# the class name are names the file defines rather than references: an unknown identifier there is
# a harmless rename, not a mutation.
UNKNOWN = "no_such_name"


class Everything(nn.Module):
    """Every node op of a saved graph: placeholder, get_attr (buffer and constant), call_module,
    call_function (getattr, operator, torch), call_method and output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 2)
        self.register_buffer("scale", torch.ones(4))

    def forward(self, x):
        h = self.relu(self.conv(x)) * self.scale.view(1, -1, 1, 1)
        n = h.shape[0]
        # A mean rather than F.adaptive_avg_pool2d: saved graphs call only what a converted network
        # may (conversion turns functional pools into modules; see the pattern table).
        h = torch.flatten(h.mean((2, 3), keepdim=True), 1)
        return self.fc(h.view(n, -1)) + torch.tensor([1.0, 2.0])


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.relu1(self.conv1(x))
        y = self.relu2(self.conv2(h) + h)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def _saved(model, path):
    save_snn(model, path, metadata={"T": 4})
    load_snn(path)  # the unmutated file loads
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def traced_blob(tmp_path_factory):
    """A traced graph holding every op and a plain tensor constant, as saved."""
    torch.manual_seed(0)
    traced = torch.fx.symbolic_trace(Everything().eval())
    ops = {n.op for n in traced.graph.nodes}
    assert ops == {"placeholder", "get_attr", "call_module", "call_function", "call_method", "output"}
    # fx registers traced tensor constants as buffers here; a plain tensor attribute is what the
    # file's "constants" describe, so one of them becomes one.
    constant = traced._buffers.pop("_tensor_constant1")
    setattr(traced, "_tensor_constant1", constant)
    blob = _saved(traced, tmp_path_factory.mktemp("traced") / "traced.pt")
    assert list(blob["constants"]) == ["_tensor_constant1"]
    return blob


@pytest.fixture(scope="module")
def snn_blob(tmp_path_factory):
    """A converted network (neurons, a time-mean join), as saved."""
    torch.manual_seed(0)
    x = torch.rand(4, 3, 8, 8)
    snn = ParallelConverter(ParallelConversionRecipe({"relu1": 8, "relu2": 4}, [x], progress=False,
                                                     method="ema")).convert(Residual().eval())
    return _saved(snn, tmp_path_factory.mktemp("snn") / "snn.pt")


@pytest.fixture
def saved(request):
    """Both files by name; each built only when a test asks for it."""
    class Files(dict):
        def __missing__(self, key):
            return request.getfixturevalue(f"{key}_blob")
    return Files()


def _ran(marker) -> bool:
    return hasattr(builtins, SENTINEL) or os.path.exists(marker)


def _mutations(blob, payloads):
    """``(description, mutated copy)`` for every field a crafted file could use."""
    few = payloads[:3] + [UNKNOWN]  # where the tag or key is refused whatever string it holds
    def edit(fn):
        b = copy.deepcopy(blob)
        fn(b)
        return b

    per_op: dict = {}
    for i, rec in enumerate(blob["graph"]):
        per_op[rec["op"]] = per_op.get(rec["op"], 0) + 1
        if per_op[rec["op"]] > 2:  # two records of each op are enough; the checks are per op
            continue
        for p in payloads:
            where = f"node {i} ({rec['op']} {rec['name']})"
            if p != UNKNOWN:
                yield f"{where} name={p!r}", edit(lambda b: b["graph"][i].__setitem__("name", p))
            target = {"$fn": p} if rec["op"] == "call_function" else p
            if not (p == UNKNOWN and rec["op"] == "placeholder"):
                yield f"{where} target={p!r}", edit(lambda b: b["graph"][i].__setitem__("target", target))
            if rec["op"] != "output" and p != UNKNOWN:
                yield f"{where} kwargs key {p!r}", edit(
                    lambda b: b["graph"][i].__setitem__("kwargs", {"$dict": [[p, 1]]}))
            if p not in few:
                continue
            yield f"{where} args node {p!r}", edit(
                lambda b: b["graph"][i].__setitem__("args", ({"$node": p},)))
            yield f"{where} args fn {p!r}", edit(lambda b: b["graph"][i].__setitem__("args", ({"$fn": p},)))
            yield f"{where} args tag {p!r}", edit(lambda b: b["graph"][i].__setitem__("args", ({p: 1},)))
        yield f"{where} op", edit(lambda b: b["graph"][i].__setitem__("op", "call_code"))
        yield f"{where} raw dict args", edit(lambda b: b["graph"][i].__setitem__("args", ({"a": 1, "b": 2},)))
        yield f"{where} tensor args", edit(lambda b: b["graph"][i].__setitem__("args", ({"$tensor": torch.ones(1)},)))
        yield f"{where} extra field", edit(lambda b: b["graph"][i].__setitem__("code", "x"))
    types: set = set()
    for i, rec in enumerate(blob["modules"]):
        if rec["type"] in types:
            continue
        types.add(rec["type"])
        for p in payloads:
            if rec["path"]:
                yield f"module {i} path={p!r}", edit(lambda b: b["modules"][i].__setitem__("path", p))
            yield f"module {i} type={p!r}", edit(lambda b: b["modules"][i].__setitem__("type", p))
            if p not in few:
                continue
            yield f"module {i} argument name {p!r}", edit(lambda b: b["modules"][i]["args"].__setitem__(p, 1))
            yield f"module {i} argument fn {p!r}", edit(
                lambda b: b["modules"][i]["args"].__setitem__("bias", {"$fn": p}))
            yield f"module {i} parameter {p!r}", edit(lambda b: b["modules"][i]["parameters"].__setitem__(p, True))
            yield f"module {i} buffer {p!r}", edit(lambda b: b["modules"][i]["buffers"].append(p))
    for p in payloads:
        for key in list(blob["constants"]):
            owner = key.rpartition(".")[0]
            renamed = f"{owner}.{p}" if owner else p
            if p == UNKNOWN:
                continue  # renaming a constant and its reader alike is not a mutation

            def rename(b, key=key, renamed=renamed):
                b["constants"][renamed] = b["constants"].pop(key)
                for rec in b["graph"]:
                    if rec["op"] == "get_attr" and rec["target"] == key:
                        rec["target"] = renamed
            yield f"constant {key} renamed {p!r}", edit(rename)
        yield f"new constant {p!r}", edit(lambda b: b["constants"].__setitem__(p, torch.ones(1)))
        yield f"loose buffer {p!r}", edit(lambda b: b["loose_buffers"].__setitem__(p, torch.ones(1)))
        if p != UNKNOWN:
            yield f"class name {p!r}", edit(lambda b: b.__setitem__("class_name", p))
        yield f"format {p!r}", edit(lambda b: b.__setitem__("format", p))
        yield f"metadata fn {p!r}", edit(lambda b: b.__setitem__("metadata", {"$dict": [["T", {"$fn": p}]]}))
        yield f"metadata node {p!r}", edit(lambda b: b.__setitem__("metadata", {"$dict": [["T", {"$node": p}]]}))
        yield f"metadata tag {p!r}", edit(lambda b: b.__setitem__("metadata", {p: 1}))
        yield f"state key {p!r}", edit(lambda b: b["state_dict"].__setitem__(p, torch.ones(1)))
    yield "state value not a tensor", edit(lambda b: b["state_dict"].__setitem__(next(iter(b["state_dict"])), 1.0))
    yield "constant not a tensor", edit(lambda b: b["constants"].__setitem__(next(iter(b["constants"]), "c"), "x"))
    yield "graph not a list", edit(lambda b: b.__setitem__("graph", {"$dict": []}))
    yield "no output node", edit(lambda b: b["graph"].pop())


@pytest.mark.parametrize("which", ["traced", "snn"])
def test_every_mutation_is_refused_before_any_code_runs(saved, tmp_path, which):
    marker = str(tmp_path / "PWNED")
    path = tmp_path / "mutated.pt"
    loaded, unnamed, seen = [], [], 0
    for what, blob in _mutations(saved[which], _payloads(marker)):
        torch.save(blob, path)
        seen += 1
        try:
            load_snn(path)
        except fileio.FileError as exc:
            assert "Traceback" not in str(exc) and "\n" not in str(exc), (what, str(exc))
            if str(path) not in str(exc):  # one line naming the file (docs/files.rst)
                unnamed.append((what, str(exc)))
        else:
            loaded.append(what)
        assert not _ran(marker), f"{what}: a payload ran"
    assert seen > 300 and not loaded, f"{len(loaded)} of {seen} mutations loaded: {loaded[:10]}"
    assert not unnamed, f"{len(unnamed)} of {seen} refusals do not name the file: {unnamed[:5]}"


@pytest.mark.parametrize("name", ["fc.weight", "_tensor_constant0", "fc", "forward"])  # param, buffer, child, method
def test_constant_naming_an_attribute_of_its_module_is_refused_before_the_graph_is_built(
        saved, tmp_path, monkeypatch, name):
    """A constant (with its get_attr reader) named like a parameter, buffer, child or method is refused."""
    from sj_parallel_conversion import serialization

    blob = copy.deepcopy(saved["traced"])
    blob["constants"][name] = blob["constants"].pop("_tensor_constant1")
    for rec in blob["graph"]:
        if rec["op"] == "get_attr" and rec["target"] == "_tensor_constant1":
            rec["target"] = name
    path = tmp_path / "collide.pt"
    torch.save(blob, path)
    built = []
    monkeypatch.setattr(serialization, "_build_graph", lambda *a: built.append(a) or pytest.fail("graph built"))
    with pytest.raises(fileio.FileError, match="would replace an attribute of its module") as info:
        load_snn(path)
    assert str(path) in str(info.value) and f"constant {name!r}" in str(info.value) and not built


def test_integer_tensor_where_the_network_has_a_floating_one_is_refused(saved, tmp_path):
    """A saved state with an int64 weight or threshold is refused naming the file and the entry."""
    for key in ("fc.weight", next(k for k in saved["snn"]["state_dict"] if k.endswith("v_threshold"))):
        blob = copy.deepcopy(saved["snn"])
        assert blob["state_dict"][key].is_floating_point()
        blob["state_dict"][key] = (blob["state_dict"][key] * 10).to(torch.int64)
        path = tmp_path / "int.pt"
        torch.save(blob, path)
        with pytest.raises(fileio.FileError, match="integer tensors") as info:
            load_snn(path)
        assert str(path) in str(info.value) and f"{key} (torch.int64)" in str(info.value)


def test_placeholder_target_attack_of_the_issue_runs_nothing(saved, tmp_path):
    marker = tmp_path / "PWNED"
    blob = copy.deepcopy(saved["snn"])
    blob["graph"][0]["target"] = f'x=exec(\'open({str(marker)!r}, "w")\')'
    torch.save(blob, tmp_path / "evil.pt")
    with pytest.raises(fileio.FileError, match="placeholder target .* is not a plain Python identifier"):
        load_snn(tmp_path / "evil.pt")
    assert not marker.exists()


@pytest.mark.parametrize("via", ["constant", "module path"])
def test_get_attr_expression_attack_of_the_issue_runs_nothing(saved, tmp_path, via):
    """A name that closes fx's ``getattr(self.fc, "<name>")`` early and calls code at the first
    forward: a constant read by a get_attr node, or a module called by a call_module node."""
    blob = copy.deepcopy(saved["snn"])
    evil = f'k") if setattr(__import__("builtins"),"{SENTINEL}",1) else getattr(self,"k'
    if via == "constant":
        blob["constants"][f"fc.{evil}"] = torch.ones(3)
        blob["graph"].insert(len(blob["graph"]) - 1, {"op": "get_attr", "name": "k", "target": f"fc.{evil}",
                                                      "args": (), "kwargs": {"$dict": []}})
    else:
        for rec in blob["modules"]:
            rec["path"] = evil if rec["path"] == "fc" else rec["path"]
        for key in [k for k in blob["state_dict"] if k.startswith("fc.")]:
            blob["state_dict"][evil + key[2:]] = blob["state_dict"].pop(key)
        for rec in blob["graph"]:
            rec["target"] = evil if rec["target"] == "fc" else rec["target"]
    torch.save(blob, tmp_path / "evil.pt")
    with pytest.raises(fileio.FileError, match=f"{via}.* is not a plain"):
        model = load_snn(tmp_path / "evil.pt")
        model(torch.rand(1, 3, 8, 8).unsqueeze(0))  # before the fix: loaded, and this forward ran the payload
    assert not hasattr(builtins, SENTINEL)


def test_strings_inside_arguments_stay_data(saved, tmp_path):
    """A plain string argument is written into the forward as a quoted literal (fx uses repr): a
    code string there loads as a string and fails as one, running nothing."""
    marker = tmp_path / "PWNED"
    blob = copy.deepcopy(saved["traced"])
    rec = next(r for r in blob["graph"] if r["op"] == "call_method" and r["target"] == "view")
    for p in _payloads(str(marker)):
        rec["args"] = (rec["args"][0], p)
        torch.save(blob, tmp_path / "s.pt")
        model = load_snn(tmp_path / "s.pt")
        assert repr(p) in model.code
        with pytest.raises(TypeError):
            model(torch.rand(1, 3, 8, 8))
        assert not _ran(str(marker))


def test_metadata_strings_are_returned_as_data(saved, tmp_path):
    marker = tmp_path / "PWNED"
    blob = copy.deepcopy(saved["snn"])
    payloads = _payloads(str(marker))
    blob["metadata"] = {"$dict": [[p, p] for p in payloads]}
    torch.save(blob, tmp_path / "m.pt")
    assert load_snn(tmp_path / "m.pt").snn_metadata == {p: p for p in payloads}
    assert not _ran(str(marker))


def test_save_refuses_what_load_would_refuse(tmp_path):
    """One set of checks: a graph reading an attribute outside the allowlist is refused at save."""
    class ReadsAttribute(nn.Module):
        def forward(self, x):
            return x + x.is_leaf

    gm = torch.fx.symbolic_trace(ReadsAttribute())
    with pytest.raises(ValueError, match="save_snn: graph node .* reads the attribute"):
        save_snn(gm, tmp_path / "a.pt")
    assert not (tmp_path / "a.pt").exists()


def test_module_names_with_dashes_and_indices_round_trip(tmp_path):
    model = nn.Sequential()
    model.add_module("block1-0", nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
    gm = torch.fx.symbolic_trace(model.eval())
    save_snn(gm, tmp_path / "d.pt")
    x = torch.randn(2, 3)
    assert torch.equal(load_snn(tmp_path / "d.pt")(x), gm(x))


def teardown_module(module):
    if hasattr(builtins, SENTINEL):
        delattr(builtins, SENTINEL)
