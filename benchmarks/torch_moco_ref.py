"""PyTorch MoCo v2 reference step (paper's Algorithm 1, official defaults), single process.

Copied unchanged (but this paragraph) from the project's shared/benchmarks/torch_moco_ref.py,
written for this project by its owners as the PyTorch side of its step benchmark;
benchmarks/step.py imports its `MoCo` and `backbone` for its torch modes.

Measures training images/sec of one MoCo v2 step on this CPU, to put the
project's Keras step side by side with what a user would otherwise pick.
Usage: python torch_moco_ref.py --arch resnet18_cifar --size 32 --batch 256 --steps 6
"""
import argparse, time, json
import torch, torch.nn as nn, torch.nn.functional as F
import torchvision


def backbone(arch, dim):
    if arch == "resnet18_cifar":
        net = torchvision.models.resnet18(num_classes=dim)
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    else:
        net = getattr(torchvision.models, arch)(num_classes=dim)
    hid = net.fc.weight.shape[1]
    net.fc = nn.Sequential(nn.Linear(hid, hid), nn.ReLU(), net.fc)  # v2 MLP head
    return net


class MoCo(nn.Module):
    def __init__(self, arch, dim=128, K=4096, m=0.99, T=0.2):
        super().__init__()
        self.K, self.m, self.T = K, m, T
        self.q = backbone(arch, dim)
        self.k = backbone(arch, dim)
        for pq, pk in zip(self.q.parameters(), self.k.parameters()):
            pk.data.copy_(pq.data); pk.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.long))

    def forward(self, xq, xk):
        q = F.normalize(self.q(xq), dim=1)
        with torch.no_grad():
            for pq, pk in zip(self.q.parameters(), self.k.parameters()):
                pk.data.mul_(self.m).add_(pq.data, alpha=1 - self.m)
            idx = torch.randperm(xk.shape[0])  # single-process stand-in for shuffle BN
            k = F.normalize(self.k(xk[idx]), dim=1)[torch.argsort(idx)]
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ self.queue.clone()], 1) / self.T
        labels = torch.zeros(q.shape[0], dtype=torch.long)
        with torch.no_grad():
            p = int(self.ptr); n = k.shape[0]
            self.queue[:, p:p + n] = k.T; self.ptr[0] = (p + n) % self.K
        return F.cross_entropy(logits, labels)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="resnet18_cifar"); ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=256); ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--K", type=int, default=4096); ap.add_argument("--compile", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = MoCo(a.arch, K=a.K)
    opt = torch.optim.SGD([p for p in model.q.parameters()], lr=0.03, momentum=0.9, weight_decay=1e-4)
    step_fn = model
    if a.compile:  # compile the encoders; the in-place queue update breaks whole-model compile
        model.q = torch.compile(model.q); model.k = torch.compile(model.k)
    xq = torch.randn(a.batch, 3, a.size, a.size); xk = torch.randn(a.batch, 3, a.size, a.size)
    times = []
    for i in range(a.steps + 2):
        t = time.perf_counter()
        loss = step_fn(xq, xk); opt.zero_grad(); loss.backward(); opt.step()
        times.append(time.perf_counter() - t)
    steady = sorted(times[2:])
    med = steady[len(steady) // 2]
    print(json.dumps({"impl": "torch" + ("-compile" if a.compile else "-eager"), "arch": a.arch, "size": a.size,
                      "batch": a.batch, "threads": torch.get_num_threads(), "median_step_s": round(med, 4),
                      "img_per_s": round(a.batch / med, 1), "loss": float(loss)}))


if __name__ == "__main__":
    main()
