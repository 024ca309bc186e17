"""Quantizer benchmark: RTN against GPTQ, time and calibrated error, at 2/3/4 bits.

Two workloads, group size 128 (it divides MiniLM's 384 and 1536):

* synthetic: one 4096x4096 layer, W with Gaussian entries (std 0.02) and a correlated synthetic X
  of 2048 tokens (shared low-rank factors plus noise, log-normal per-channel scales to mimic
  outlier channels). Nothing about it is real; it measures speed at LLM layer size.
* minilm: every nn.Linear of the embedded all-MiniLM-L6-v2 (real weights), with real activations
  captured on the calibration half of the embedded text (2048 tokens).

Calibrated error is ``||X (W - Q)^T||_F^2``, reported relative to ``||X W^T||_F^2``, on the
calibration tokens themselves; "ratio" is GPTQ error / RTN error (lower is better for GPTQ).
"held-out ratio" is the same ratio on other tokens (MiniLM: the held-out half of the text;
synthetic: fresh tokens from the same distribution), which GPTQ did not see. Times are medians
of ``--repeats`` runs of ``quantize_weight`` alone (H = X^T X is computed once, not timed).
MiniLM's pooler only sees the [CLS] token of each sequence (16 calibration tokens), so GPTQ
nearly fits its calibration set there; its held-out ratio is the honest figure. Likewise the
synthetic layer has more inputs (4096) than calibration tokens (2048): H is rank-deficient and
GPTQ over-fits, most visibly at 2 bits (raise ``--tokens`` to see the held-out ratio improve).

    cloq bench quantize                       # writes results/quantize.json
    cloq bench quantize --quick               # 1024x1024 synthetic, MiniLM layer 0 only
    cloq bench quantize --threads 1           # on a shared machine: avoids OpenMP spin-waits
"""
from __future__ import annotations

import logging
import math
import platform
import statistics
import sys
import time

import torch

from cloq_engine import data
from cloq_engine.config import QuantConfig
from cloq_engine.init import calibrated_error
from cloq_engine.quant import quantize_weight

from . import common

logger = logging.getLogger("benchmarks.quantize")


def synthetic_layer(size: int, tokens: int, seed: int = 0):
    """Gaussian W (size, size), correlated X and X_heldout (tokens, size) each; all synthetic."""
    gen = torch.Generator().manual_seed(seed)
    W = 0.02 * torch.randn(size, size, generator=gen)
    rank = max(size // 16, 8)
    loadings = torch.randn(rank, size, generator=gen) / math.sqrt(rank)
    channel_scale = torch.exp(0.75 * torch.randn(size, generator=gen))

    def sample():
        factors = torch.randn(tokens, rank, generator=gen) @ loadings
        return (factors + 0.5 * torch.randn(tokens, size, generator=gen)) * channel_scale

    return W, sample(), sample()


def minilm_layers(max_tokens: int, layer_filter: str | None):
    """(name, W, X, X_heldout) for every nn.Linear of the embedded MiniLM, real activations."""
    model, tok = data.load_model()

    def capture(paragraphs):
        blocks = data.token_blocks(paragraphs, tok, seq_len=128, num_samples=max_tokens // 128)
        return data.capture_linear_inputs(model, blocks, max_tokens=max_tokens)

    inputs, heldout = capture(data.calibration_paragraphs()), capture(data.heldout_paragraphs())
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and (layer_filter is None or layer_filter in name):
            yield name, mod.weight.detach().float().clone(), inputs[name], heldout[name]


def bench_layer(source: str, name: str, W: torch.Tensor, X: torch.Tensor, X_heldout: torch.Tensor, bits_list,
                group_size: int, repeats: int) -> list:
    H, H_heldout = X.t() @ X, X_heldout.t() @ X_heldout
    reference = calibrated_error(W, H)
    rows = []
    for bits in bits_list:
        rtn_t, _, _, rtn_qw = common.timed(
            lambda: quantize_weight(W, QuantConfig(bits=bits, group_size=group_size, method="rtn")), repeats)
        gptq_t, _, _, gptq_qw = common.timed(
            lambda: quantize_weight(W, QuantConfig(bits=bits, group_size=group_size, method="gptq"), H), repeats)
        rtn_Q, gptq_Q = rtn_qw.dequantize(), gptq_qw.dequantize()
        rtn_err, gptq_err = calibrated_error(W - rtn_Q, H), calibrated_error(W - gptq_Q, H)
        heldout_ratio = calibrated_error(W - gptq_Q, H_heldout) / calibrated_error(W - rtn_Q, H_heldout)
        rows.append(dict(
            source=source, layer=name, out_features=W.shape[0], in_features=W.shape[1], tokens=X.shape[0],
            bits=bits, group_size=group_size, rtn_time_s=rtn_t, gptq_time_s=gptq_t,
            rtn_rel_err=rtn_err / reference, gptq_rel_err=gptq_err / reference, ratio=gptq_err / rtn_err,
            heldout_ratio=heldout_ratio, heldout_tokens=X_heldout.shape[0],
            bits_per_weight=gptq_qw.bits_per_weight,
        ))
        logger.info("%s %s %d-bit done", source, name, bits)
    return rows


def summarize(rows: list) -> list:
    """Per (source, bits): geometric-mean ratio, worst ratio, total RTN and GPTQ seconds."""
    out = []
    for source in dict.fromkeys(r["source"] for r in rows):
        for bits in sorted({r["bits"] for r in rows if r["source"] == source}):
            sel = [r for r in rows if r["source"] == source and r["bits"] == bits]
            out.append(dict(
                source=source, bits=bits, layers=len(sel),
                geomean_ratio=math.exp(statistics.fmean(math.log(r["ratio"]) for r in sel)),
                max_ratio=max(r["ratio"] for r in sel),
                geomean_heldout_ratio=math.exp(statistics.fmean(math.log(r["heldout_ratio"]) for r in sel)),
                max_heldout_ratio=max(r["heldout_ratio"] for r in sel),
                rtn_time_s=sum(r["rtn_time_s"] for r in sel), gptq_time_s=sum(r["gptq_time_s"] for r in sel),
            ))
    return out


def print_table(rows: list, summary: list) -> None:
    header = f"{'source':<9} {'layer':<42} {'shape':>10} {'bits':>4} {'RTN s':>7} {'GPTQ s':>7} " \
             f"{'RTN err':>9} {'GPTQ err':>9} {'ratio':>6} {'held-out':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        shape = f"{r['out_features']}x{r['in_features']}"
        print(f"{r['source']:<9} {r['layer']:<42} {shape:>10} {r['bits']:>4} {r['rtn_time_s']:>7.3f} "
              f"{r['gptq_time_s']:>7.3f} {r['rtn_rel_err']:>9.2e} {r['gptq_rel_err']:>9.2e} {r['ratio']:>6.3f} {r['heldout_ratio']:>8.3f}")
    print()
    print(f"{'source':<9} {'bits':>4} {'layers':>6} {'geomean ratio':>13} {'max ratio':>9} "
          f"{'geomean held-out':>16} {'max held-out':>12} {'RTN s':>7} {'GPTQ s':>7}")
    for s in summary:
        print(f"{s['source']:<9} {s['bits']:>4} {s['layers']:>6} {s['geomean_ratio']:>13.3f} {s['max_ratio']:>9.3f} "
              f"{s['geomean_heldout_ratio']:>16.3f} {s['max_heldout_ratio']:>12.3f} "
              f"{s['rtn_time_s']:>7.2f} {s['gptq_time_s']:>7.2f}")
    print("err = ||X (W - Q)^T||^2 / ||X W^T||^2 on the calibration tokens; ratio = GPTQ err / RTN err;\n"
          "held-out = the same ratio on unseen tokens; times: median quantize_weight wall seconds (sums per group)")
    print("synthetic = Gaussian W and correlated synthetic X (not real data); minilm = real weights, real activations")


def main(argv=None) -> int:
    p = common.parser("quantize", __doc__)
    p.add_argument("--out", default="results/quantize.json")
    p.add_argument("--quick", action="store_true", help="1024x1024 synthetic layer, MiniLM layer 0 only, 1 repeat")
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--size", type=int, default=None, help="synthetic layer size (default 4096; 1024 with --quick)")
    p.add_argument("--tokens", type=int, default=2048, help="synthetic and MiniLM calibration tokens")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 3; 1 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--skip-synthetic", action="store_true")
    p.add_argument("--skip-minilm", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    if args.threads:
        torch.set_num_threads(args.threads)
    size = args.size or (1024 if args.quick else 4096)
    repeats = args.repeats or (1 if args.quick else 3)
    t_start = time.perf_counter()
    rows = []
    if not args.skip_synthetic:
        W, X, X_heldout = synthetic_layer(size, args.tokens)
        rows += bench_layer("synthetic", f"gaussian W, correlated X ({args.tokens} tok)", W, X, X_heldout,
                            args.bits, args.group_size, repeats)
        del W, X, X_heldout
    if not args.skip_minilm:
        for name, W, X, X_heldout in minilm_layers(args.tokens, "encoder.layer.0." if args.quick else None):
            rows += bench_layer("minilm", name, W, X, X_heldout, args.bits, args.group_size, repeats)
    summary = summarize(rows)
    print_table(rows, summary)

    result = dict(
        command=" ".join(["cloq bench quantize"] + (argv if argv is not None else sys.argv[1:])),
        synthetic_note="synthetic layer: Gaussian W (std 0.02), X = (low-rank factors + noise) * log-normal "
                       "channel scales; not real data",
        minilm_note="real all-MiniLM-L6-v2 weights, real activations on the embedded calibration text",
        torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine(),
        processor=platform.processor(), repeats=repeats, total_seconds=time.perf_counter() - t_start,
        rows=rows, summary=summary,
    )
    common.write_json(args.out, result)
    logger.info("wrote %s (%.0f s)", args.out, result["total_seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
