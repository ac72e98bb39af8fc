"""Seconds per training epoch: pyro_vae's SVI loop against a bare PyTorch loop.

Same network (784-400-50, ReLU), same data (dynamically binarized MNIST, 50 000 points),
same batch size (128) and Adam(1e-3); the bare loop writes the ELBO by hand with the
analytic KL. The difference is what Pyro's tracing and per-parameter optimizers cost.

    python benchmarks/train_speed.py --data-dir ../shared/data [--epochs 3] [--device cpu]
"""

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

import pyro

import pyro_vae as pv


def bare_epoch(vae, opt, train, batch_size, generator):
    """One epoch of the textbook VAE loop on the same modules, no Pyro."""
    enc, dec = vae.encoder, vae.decoder
    for x in train.batches(batch_size, generator=generator):
        loc, raw = enc.net(x).chunk(2, -1)
        scale = enc.min_scale + F.softplus(raw)
        z = loc + scale * torch.randn_like(scale)
        recon = -F.binary_cross_entropy_with_logits(dec(z), x, reduction="sum")
        kl = (0.5 * (loc ** 2 + scale ** 2 - 1) - scale.log()).sum()
        loss = (kl - recon) * len(train) / len(x)
        opt.zero_grad()
        loss.backward()
        opt.step()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    device = torch.device(args.device)
    train, _, _ = pv.datasets.load("mnist", args.data_dir)
    train = train.to(device)

    results = {}
    torch.manual_seed(0)
    vae = pv.VAE(784, 50, (400,)).to(device)
    history = pv.fit(vae, train, epochs=args.epochs, batch_size=args.batch_size,
                     progress=False)
    # The first epoch includes warm-up (allocations, CUDA kernels): report the rest.
    results["pyro_vae_fit"] = min(r["seconds"] for r in history[1:] or history)

    torch.manual_seed(0)
    vae = pv.VAE(784, 50, (400,)).to(device)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    g = torch.Generator(device=device).manual_seed(0)
    times = []
    for _ in range(args.epochs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        bare_epoch(vae, opt, train, args.batch_size, g)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    results["bare_pytorch"] = min(times[1:] or times)

    results["overhead"] = results["pyro_vae_fit"] / results["bare_pytorch"]
    results.update(device=str(device), epochs=args.epochs, batch_size=args.batch_size,
                   threads=torch.get_num_threads(), torch=torch.__version__,
                   pyro=pyro.__version__, machine=platform.processor() or platform.machine())
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
