"""Operations and memory traffic per pattern of the shipped networks, and the speed they bound on a GPU.

Usage: python benchmarks/roofline.py [--models default seed-unet] [--batch 256] [--precision bfloat16]
       [--bandwidth-tbs 3.35] [--peak-tflops 990]

Counts, on the CPU, what one forward pass does per pattern, as the network is (``eager``) and with its
batch norms folded into the convolutions before them (what every other engine runs, see
deepphase.reconstruction.engines): FLOPs (torch's flop counter) and the
bytes every ATen operation reads and writes (its tensor arguments and results, views excluded; the
weights are read once per batch, so a large batch makes them negligible). Eager PyTorch runs each
operation as its own kernel, which reads its inputs from and writes its output to GPU memory, so

    patterns/s ≤ min(bandwidth / bytes per pattern, peak FLOP/s / FLOPs per pattern).

These are upper bounds, not measurements: kernels reach 50-80 % of the memory bandwidth at best, fused
kernels (torch.compile, cuDNN's fused conv-bias-ReLU) move fewer bytes than counted here, and cuDNN's
convolution algorithms may move more. The defaults are an H100 SXM's (HBM3 3.35 TB/s, 990 dense bf16
TFLOP/s); an H200 has 4.8 TB/s and the same peak. Use them to read a GPU session's figures (RESULTS §18):
a measured rate near the bound is as fast as eager execution goes.
"""

import argparse

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from deepphase.models.modelfile import load_model
from deepphase.reconstruction.engines import fold_batch_norm

# Operations that return a view of their input (or, as dropout in eval mode, the input itself): no
# memory traffic of their own.
_VIEWS = {"view", "_unsafe_view", "reshape", "transpose", "t", "permute", "expand", "slice", "select",
          "unsqueeze", "squeeze", "alias", "detach", "as_strided", "split", "unbind", "flatten", "unflatten",
          "dropout", "feature_dropout"}


class _Traffic(TorchDispatchMode):
    """Sums the bytes of the tensor arguments and results of every non-view ATen operation."""

    def __init__(self):
        super().__init__()
        self.bytes, self.by_op = 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in _VIEWS:
            moved = sum(t.numel() * t.element_size() for t in tree_flatten((args, kwargs, out))[0]
                        if isinstance(t, torch.Tensor))
            self.bytes += moved
            self.by_op[name] = self.by_op.get(name, 0) + moved
        return out


def measure(network: torch.nn.Module, channels: int, n_px: int, batch: int, dtype: torch.dtype) -> dict:
    """FLOPs and bytes moved per pattern by one eager forward pass in ``dtype`` autocast-free casting."""
    network = network.to(dtype).eval()
    x = torch.rand(batch, channels, n_px, n_px, dtype=dtype)
    with torch.inference_mode():
        flops = FlopCounterMode(display=False)
        with flops:
            network(x)
        traffic = _Traffic()
        with traffic:
            network(x)
    return {"flops": flops.get_total_flops() / batch, "bytes": traffic.bytes / batch,
            "by_op": {k: v / batch for k, v in sorted(traffic.by_op.items(), key=lambda kv: -kv[1])}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["default", "unet-small", "seed-unet"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--precision", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--bandwidth-tbs", type=float, default=3.35, help="GPU memory bandwidth, TB/s (H100 SXM)")
    parser.add_argument("--peak-tflops", type=float, default=990.0,
                        help="GPU peak TFLOP/s at --precision (H100 SXM dense bf16; ~67 for float32 without TF32)")
    args = parser.parse_args()
    dtype = getattr(torch, args.precision)
    print(f"torch {torch.__version__}; eager forward pass, {args.precision}, batch {args.batch}; bounds for "
          f"{args.bandwidth_tbs} TB/s and {args.peak_tflops} TFLOP/s")
    print("| model | network | MFLOP/pattern | MB moved/pattern | FLOP/byte | bound by memory (patterns/s) | "
          "bound by arithmetic (patterns/s) | largest movers |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        model = load_model(name)
        network = model.network.eval()
        for form, net in (("eager", network), ("batch norms folded", fold_batch_norm(network))):
            m = measure(net, model.in_channels, model.geometry.n_px, args.batch, dtype)
            memory = args.bandwidth_tbs * 1e12 / m["bytes"]
            arithmetic = args.peak_tflops * 1e12 / m["flops"]
            top = ", ".join(f"{op} {b / m['bytes']:.0%}" for op, b in list(m["by_op"].items())[:4])
            print(f"| {name} | {form} | {m['flops'] / 1e6:.1f} | {m['bytes'] / 1e6:.2f} | {m['flops'] / m['bytes']:.0f} | "
                  f"{memory:,.0f} | {arithmetic:,.0f} | {top} |")


if __name__ == "__main__":
    main()
