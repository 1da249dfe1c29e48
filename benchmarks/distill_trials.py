"""Trial harness for ``method="distill"``: variants of the block-wise fit, and where the accuracy goes.

Not a part of the library: it swaps a few of this package's own internal functions
(``sj_parallel_conversion.learned``) for variants, so that a variant can be measured on the same
images as the default before it is built properly. It converts one network at one ``T`` with
``method="distill"`` and prints one JSON line with the test accuracy (count domain, 2,000
class-balanced CIFAR-10 test images; calibration on 1,024 training images, labels unused) and,
for every block, its held-out error at the start and at the step kept, and that step.

Variants: ``--mixup N`` adds N mixup views (two cropped and flipped images blended with a uniform
weight; the ANN's outputs for the blend are the targets); ``--headgroup K`` fits the first K blocks
as one; ``--mergelast 1`` fits the last residual block with the head (KL on the logits);
``--tailk K`` fits the first K blocks through the rest of the ANN (KL on its logits plus the
block's relative squared error); ``--e2e S`` adds S whole-network KL steps after the blocks
(``--e2e_mix`` mixup views for them). ``--diag 1`` prints, after the fit, the test accuracy
with the first k blocks converted and the rest left to the ANN (k = 0 ... all), and with one
block converted alone. ``--headtemp K`` fits (and stops) the last block with the KL at
temperature K (softer targets where the ANN is sure of its training images). ``--stem_T N`` gives the first activation (``--stem``) N time steps and
the rest ``--T``; ``--qdrop P`` replaces, at every fitting step, each element of each site's output by the ANN's
(the ReLU of the same input) with probability P (QDrop's drop inside the block; the blocks' inputs
are mixed as always). ``--analog SITE`` leaves that site a ReLU (the paper's setting for ReLU
ResNets keeps the stem analog). Examples (run from the repository root, ``SJPC_CIFAR10_DIR`` set)::

    PYTHONPATH=tests python benchmarks/distill_trials.py r32 --T 4 --threads 1 --diag 1
    PYTHONPATH=tests python benchmarks/distill_trials.py r32 --T 4 --threads 1 --opts '{"steps": 1000}'
"""
import argparse, copy, json, os, sys, time
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import torch
import sj_parallel_conversion.learned as L
from sj_parallel_conversion import NetworkSettings, CalibrationSettings, ParallelConverter, count_domain_model, load_user_model
from sj_parallel_conversion.tools import data, models
from sj_parallel_conversion.augment import random_crop_flip

PRETRAINED = os.environ.get("SJPC_PRETRAINED_DIR", os.path.join(ROOT, "..", "shared", "data", "pretrained_cifar10_resnets"))
NETS = {
 "r32": ("pretrained_resnets:resnet32", os.path.join(PRETRAINED, "resnet32-d509ac18.th"), True),
 "r44": ("pretrained_resnets:resnet44", os.path.join(PRETRAINED, "resnet44-014dd654.th"), True),
 "r20": (None, os.path.join(ROOT, "sj_parallel_conversion/tools/checkpoints/cifar10_resnet20_relu.pt"), False),
 "cnn": (None, os.path.join(ROOT, "sj_parallel_conversion/tools/checkpoints/cifar10_cnn_relu.pt"), False),
}
ap = argparse.ArgumentParser()
ap.add_argument("net"); ap.add_argument("--T", type=int, default=4)
ap.add_argument("--opts", default="{}")
ap.add_argument("--mixup", type=int, default=0, help="extra mixup views")
ap.add_argument("--mixmode", default="pair")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--method", default="distill")
ap.add_argument("--tag", default="")
ap.add_argument("--stem_T", type=int, default=0, help="T of the site --stem (the first activation), the rest at --T")
ap.add_argument("--stem", default="relu", help="name of the first activation site ('relu' in the pretrained ResNets)")
ap.add_argument("--analog", default="", help="a site left analog (NetworkSettings.analog_sites), e.g. relu")
ap.add_argument("--group", type=int, default=1)
ap.add_argument("--diag", type=int, default=0)
ap.add_argument("--headgroup", type=int, default=1)
ap.add_argument("--e2e", type=int, default=0)
ap.add_argument("--tailk", type=int, default=0)
ap.add_argument("--tailw", type=float, default=1.0)
ap.add_argument("--e2e_lr", type=float, default=1e-4)
ap.add_argument("--e2e_wlr", type=float, default=3e-5)
ap.add_argument("--e2e_mix", type=int, default=0)
ap.add_argument("--e2e_batch", type=int, default=64)
ap.add_argument("--e2e_temp", type=float, default=1.0)
ap.add_argument("--mergelast", type=int, default=0)
ap.add_argument("--fisher", default="", help="'argmax' or 'sample': weight each block's squared error by the "
                "squared gradient of the ANN's cross-entropy at its own (argmax or sampled) prediction")
ap.add_argument("--fisher_floor", type=float, default=0.0, help="weights are floor + (1 - floor) * g^2 / mean(g^2)")
ap.add_argument("--headtemp", type=float, default=1.0, help="temperature of the KL the last block is fitted and "
                "stopped with (the logits divided by it, the KL multiplied by its square)")
ap.add_argument("--qdrop", type=float, default=0.0, help="QDrop inside the blocks: during the fit's steps every "
                "element of every site's output is the ANN's activation (ReLU of the same input: ReLU networks "
                "only) with this probability")
a = ap.parse_args()
torch.set_num_threads(a.threads)

if a.qdrop:
    _site_forward = L.LearnedSite.forward
    _drop_gen = torch.Generator().manual_seed(1234)
    def _dropping_forward(self, x):
        out = _site_forward(self, x)
        if not torch.is_grad_enabled():
            return out  # held-out measurements and the finished network: no drop
        keep_ann = torch.rand(out.shape, generator=_drop_gen).to(out.device) < a.qdrop
        return torch.where(keep_ann, torch.relu(x), out)
    L.LearnedSite.forward = _dropping_forward

if a.headtemp != 1.0:
    _kl_plain = L._kl
    L._kl = lambda ref, out, reduction="batchmean": _kl_plain(ref / a.headtemp, out / a.headtemp, reduction) * a.headtemp ** 2
orig = L._with_views
def with_views(fit, options):
    fit2, views = orig(fit, options)
    if a.mixup:
        base = torch.cat(list(fit2))
        g = torch.Generator().manual_seed(options.seed + 7)
        extra = []
        for _ in range(a.mixup):
            src = random_crop_flip(torch.cat(list(fit)), 4, g)
            perm = torch.randperm(src.shape[0], generator=g)
            lam = torch.rand(src.shape[0], 1, 1, 1, generator=g)
            if a.mixmode == "beta":
                lam = torch.distributions.Beta(1.0, 1.0).sample((src.shape[0], 1, 1, 1))
            extra.append(lam * src + (1 - lam) * src[perm])
        fit2 = fit2 + extra
    return fit2, views
L._with_views = with_views
orig_bb = L.block_boundaries
def bb(gm, names):
    cuts = orig_bb(gm, names)
    if a.mergelast and cuts:
        cuts = cuts[:-a.mergelast]
    if a.headgroup > 1:
        cuts = cuts[a.headgroup - 1:]
    if a.group > 1:
        cuts = [c for i, c in enumerate(cuts) if (len(cuts) - 1 - i) % a.group == 0]
    return cuts
L.block_boundaries = bb
orig_fb = L._fit_blocks
STASH = {}
orig_finish = L._FallBack.finish
import math, torch.nn.functional as F
def finish(self, gm, sites, params, initial_state, best, label, history):
    if a.e2e and "fit" in STASH:
        ref = STASH["reference"]
        x = torch.cat(list(STASH["fit"]))
        g = torch.Generator().manual_seed(123)
        if a.e2e_mix:
            ms = []
            for _ in range(a.e2e_mix):
                src = random_crop_flip(x[: len(x) // 4 if False else len(x)], 4, g)
                perm = torch.randperm(src.shape[0], generator=g)
                lam = torch.rand(src.shape[0], 1, 1, 1, generator=g)
                ms.append(lam * src + (1 - lam) * src[perm])
            x = torch.cat([x] + ms)
        with torch.no_grad():
            tgt = torch.cat([ref(c) for c in torch.split(x, 256)])
        held = torch.cat(list(STASH["held"]))
        hc = list(torch.split(held, 64))
        with torch.no_grad():
            href = [ref(c) for c in hc]
        sp = L._site_parameters(sites); ids = {id(p) for p in sp}
        wp = [p for p in gm.parameters() if id(p) not in ids]
        for p in sp + wp: p.requires_grad_(True)
        opt = torch.optim.Adam([{"params": sp, "lr": a.e2e_lr}, {"params": wp, "lr": a.e2e_wlr}])
        for gr in opt.param_groups: gr["peak"] = gr["lr"]
        sc = L.held_out_score(gm, hc, href, "cpu")
        bkl, bstate, bstep = sc["kl"], [p.detach().clone() for p in sp + wp], 0
        print("e2e start", sc, flush=True)
        with torch.enable_grad():
          for step in range(a.e2e):
            for gr in opt.param_groups: gr["lr"] = gr["peak"] * 0.5 * (1 + math.cos(math.pi * step / a.e2e))
            idx = torch.randint(0, len(x), (a.e2e_batch,), generator=g)
            loss = L.distillation_kl(tgt[idx], gm(x[idx]), a.e2e_temp)
            opt.zero_grad(); loss.backward(); opt.step()
            if (step + 1) % 50 == 0:
                sc = L.held_out_score(gm, hc, href, "cpu")
                print("e2e", step + 1, sc, flush=True)
                if sc["kl"] < bkl:
                    bkl, bstate, bstep = sc["kl"], [p.detach().clone() for p in sp + wp], step + 1
        with torch.no_grad():
            for p, v in zip(sp + wp, bstate): p.copy_(v)
        print("e2e kept", bstep, flush=True)
        best = L.held_out_score(gm, hc, href, "cpu")
    return orig_finish(self, gm, sites, params, initial_state, best, label, history)
L._FallBack.finish = finish
orig_fblock = L._fit_block
CNT = {"i": 0}
def fblock(block, groups, q_in, a_in, target, held_in, held_target, last, options, gen, reducer, world, bar, first):
    i = CNT["i"]; CNT["i"] += 1
    if i >= a.tailk:
        return orig_fblock(block, groups, q_in, a_in, target, held_in, held_target, last, options, gen, reducer, world, bar, first)
    ref = STASH["reference"]; names = list(STASH["sites"])
    bnd = L.block_boundaries(ref, names)
    tail_blocks = [b for _, b in L.split_blocks(ref, names, bnd)[i + 1:]]
    def tail(x):
        for b in tail_blocks: x = b(x)
        return x
    with torch.no_grad():
        logits = torch.cat([tail(c) for c in torch.split(target, 256)])
    params = [p for g in groups for p in g["params"]]
    for p in params: p.requires_grad_(True)
    for g in groups: g["peak"] = g["lr"]
    opt = torch.optim.Adam(groups)
    n = q_in.shape[0]
    for step in range(options.steps):
        sc = 0.5 * (1 + math.cos(math.pi * step / options.steps))
        for g in opt.param_groups: g["lr"] = g["peak"] * sc
        idx = torch.randint(0, n, (options.batch_size,), generator=gen)
        x = q_in[idx]
        if options.mix > 0 and not first:
            keep = torch.rand(x.shape, generator=gen) < options.mix
            x = torch.where(keep, a_in[idx], x)
        out = block(x)
        loss = L._kl(logits[idx], tail(out)) + a.tailw * F.mse_loss(out, target[idx]) / target[idx].pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step(); bar.update(1)
    for p in params: p.requires_grad_(False)
    print("tail-fitted block", i, float(loss), flush=True)
    return {"start": 0.0, "best": 0.0, "kept_step": options.steps}
def fisher_weights(reference, names, x, kind, size=256):
    """Per boundary, g^2 / mean(g^2) of the ANN's cross-entropy at its own prediction, per element."""
    bnd = L.block_boundaries(reference, names)
    blocks = [b for _, b in L.split_blocks(reference, names, bnd)]
    out = [[] for _ in blocks[:-1]]
    g = torch.Generator().manual_seed(99)
    for c in torch.split(x, size):
        with torch.enable_grad():
            hs = [c.clone().requires_grad_(True)]
            for b in blocks[:-1]:
                hs.append(b(hs[-1]))
                hs[-1].retain_grad()
            logits = blocks[-1](hs[-1])
            if kind == "sample":
                y = torch.multinomial(torch.softmax(logits.detach(), 1), 1, generator=g).squeeze(1)
            else:
                y = logits.detach().argmax(1)
            F.cross_entropy(logits, y, reduction="sum").backward()
        for i, t in enumerate(hs[1:]):
            out[i].append(t.grad.detach().pow(2))
    ws = []
    for parts in out:
        w = torch.cat(parts)
        ws.append(w / w.mean().clamp(min=1e-30))
    return ws

def fblock_fisher(block, groups, q_in, a_in, target, held_in, held_target, last, options, gen, reducer, world, bar, first):
    i = CNT["i"] - 1
    if last or not a.fisher:
        return orig_fblock(block, groups, q_in, a_in, target, held_in, held_target, last, options, gen, reducer, world, bar, first)
    fl = a.fisher_floor
    w_fit = fl + (1 - fl) * STASH["wfit"][i]
    w_held = fl + (1 - fl) * STASH["wheld"][i]
    params = [p for g in groups for p in g["params"]]
    for p in params: p.requires_grad_(True)
    for g in groups: g["peak"] = g["lr"]
    opt = torch.optim.Adam(groups)
    def err(out, ref, w):
        return (w * (out - ref).pow(2)).flatten(1).mean(1)
    def held_error():
        with torch.no_grad():
            return float(sum(err(block(x), r, w).sum() for x, r, w in zip(torch.split(held_in, 64), torch.split(held_target, 64), torch.split(w_held, 64))) / held_in.shape[0])
    best = begin = held_error(); best_state, best_step = [p.detach().clone() for p in params], 0
    n = q_in.shape[0]
    for step in range(options.steps):
        sc = 0.5 * (1 + math.cos(math.pi * step / options.steps))
        for g in opt.param_groups: g["lr"] = g["peak"] * sc
        idx = torch.randint(0, n, (min(options.batch_size, n),), generator=gen)
        x = q_in[idx]
        if options.mix > 0 and not first:
            keep = torch.rand(x.shape, generator=gen) < options.mix
            x = torch.where(keep, a_in[idx], x)
        loss = err(block(x), target[idx], w_fit[idx]).mean()
        opt.zero_grad(); loss.backward(); opt.step(); bar.update(1)
        if (step + 1) % options.eval_every == 0 or step + 1 == options.steps:
            now = held_error()
            if now < best:
                best, best_step, best_state = now, step + 1, [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, v in zip(params, best_state): p.copy_(v)
    for p in params: p.requires_grad_(False)
    return {"start": begin, "best": best, "kept_step": best_step}

def fblock_any(*args):
    if a.fisher and a.tailk == 0:
        CNT["i"] += 1
        return fblock_fisher(*args)
    return fblock(*args)
L._fit_block = fblock_any
def fb(gm, reference, fit, held, sites, *rest):
    STASH.update(reference=reference, fit=fit, held=held, sites=sites)
    if a.fisher:
        t = time.perf_counter()
        STASH["wfit"] = fisher_weights(reference, list(sites), torch.cat(list(fit)), a.fisher)
        STASH["wheld"] = fisher_weights(reference, list(sites), torch.cat(list(held)), a.fisher)
        print("fisher weights", round(time.perf_counter() - t), "s", flush=True)
    out = orig_fb(gm, reference, fit, held, sites, *rest)
    if a.diag:
        names = list(sites)
        bnd = L.block_boundaries(gm, names)
        ours = L.split_blocks(gm, names, bnd); theirs = L.split_blocks(reference, names, bnd)
        res = []
        with torch.no_grad():
            for k in range(len(ours) + 1):
                correct = 0
                for i in range(0, 2000, 500):
                    x = tx[i:i+500]
                    for j, (_, b) in enumerate(ours[:k] + theirs[k:]):
                        x = b(x)
                    correct += int((x.argmax(1) == ty[i:i+500]).sum())
                res.append(correct / 20)
        print("hybrid (first k blocks converted):", res, flush=True)
        # each block alone converted
        alone = []
        with torch.no_grad():
            for k in range(len(ours)):
                correct = 0
                for i in range(0, 2000, 500):
                    x = tx[i:i+500]
                    for j in range(len(ours)):
                        x = (ours if j == k else theirs)[j][1](x)
                    correct += int((x.argmax(1) == ty[i:i+500]).sum())
                alone.append(correct / 20)
        print("alone (only block k converted):", alone, flush=True)
    return out
L._fit_blocks = fb

spec, path, imnorm = NETS[a.net]
norm = dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]) if imnorm else dict(mean=None, std=None)
calib = data.cifar10_npz("train", limit=1024, **norm).tensors[0]
tx, ty = data.cifar10_npz("test", limit=2000, **norm).tensors
ann = load_user_model(spec, path) if spec else models.load_checkpoint(path)[0]
ann.eval()
opts = json.loads(a.opts)
cls = L.DistillCalibration if a.method == "distill" else L.LearnedCalibration
cal = CalibrationSettings(**{a.method: cls(**opts)})
t0 = time.perf_counter()
T = {a.stem: a.stem_T} if a.stem_T else a.T
snn = ParallelConverter("parallel", T=T, default_T=a.T if a.stem_T else None, dataloader=list(torch.split(calib, 128)),
                        method=a.method, progress=False, network=NetworkSettings(analog_sites=[a.analog] if a.analog else []),
                        calibration=cal).convert(copy.deepcopy(ann))
sec = time.perf_counter() - t0
cm = count_domain_model(snn)
with torch.no_grad():
    acc = 100 * sum(int((cm(tx[i:i+500]).argmax(1) == ty[i:i+500]).sum()) for i in range(0, 2000, 500)) / 2000
rep = snn.calibration_report
h = rep.learned if rep else {}
print(json.dumps(dict(net=a.net, T=a.T, opts=opts, mixup=a.mixup, group=a.group, mergelast=a.mergelast, headgroup=a.headgroup, diag=a.diag, tailk=a.tailk, tailw=a.tailw, fisher=[a.fisher, a.fisher_floor], e2e=[a.e2e, a.e2e_lr, a.e2e_wlr, a.e2e_mix, a.e2e_batch, a.e2e_temp], tag=a.tag, headtemp=a.headtemp, stem_T=a.stem_T, analog=a.analog, qdrop=a.qdrop, acc=acc, sec=round(sec), 
      held=[h.get("held_out_agreement")], fell=h.get("fell_back"),
      blocks=[(round(b["start"], 5), round(b["best"], 5), b["kept_step"]) for b in h.get("blocks", [])], load=os.getloadavg()[0])), flush=True)
