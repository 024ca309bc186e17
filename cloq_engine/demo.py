"""Main job placeholder until the CLI lands: quantize the embedded MiniLM at 2/3/4 bits (RTN)."""
import torch

from . import data
from .config import QuantConfig
from .quant import quantize_weight


def main() -> None:
    model, _ = data.load_model()
    print(f"{'bits':>4} {'layers':>6} {'rel. weight error':>18} {'bits/weight':>12}")
    for bits in (2, 3, 4):
        errs, bpw = [], []
        for _, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear):
                W = mod.weight.detach()
                qw = quantize_weight(W, QuantConfig(bits=bits, group_size=128, method="rtn"))
                errs.append(float((qw.dequantize() - W).pow(2).sum() / W.pow(2).sum()))
                bpw.append(qw.bits_per_weight)
        print(f"{bits:>4} {len(errs):>6} {sum(errs) / len(errs):>18.4f} {sum(bpw) / len(bpw):>12.3f}")


if __name__ == "__main__":
    main()
