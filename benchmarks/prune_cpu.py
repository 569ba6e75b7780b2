"""Pruning + int8 on a trained 3D U-Net with efficientbioai's defaults: safe, and still faster?

    python benchmarks/prune_cpu.py [--threads 2] [--train-steps 1000] [--repeats 20] [--no-auto]
                                   [--tile 32 128 128] [--weights unet3d.pt]   (reuse the trained network)

The network is the 3D benchmark model of ``benchmarks/compress_cpu.py`` (MONAI UNet, channels 16…256,
2 residual units), first *trained* here for a few minutes to denoise generated 3D nuclei volumes
(random weights hide what pruning and quantization lose; DESIGN.md). Then ``efficientbioai compress``
builds the artifacts from it through the public API, with the config a new user would write:

  OpenVINO fp32                 precision fp32
  int8, budget off              precision int8, quantize.max_drop: null (what an unchecked int8 gives)
  int8 (default budget)         precision int8 and nothing else: the default budget (Pearson drop ≤ 0.01
                                on held-out tiles) applies; plain int8 is tried first, then NNCF's
                                accuracy control keeps the most sensitive layers in float
  prune 50% + int8 (defaults)   `prune: {method: l1, ratio: 0.5}` and nothing else: fine-tuning by
                                distillation stops early (half the budget reached, no improvement, or
                                the step cap), then int8 within the default budget
  strategy auto (defaults)      `quantize: {strategy: auto}`, `prune: {}`: the ladder int8 → int8 with
                                float fallback → bf16 → fp32, unpruned, then pruned 25 % and 50 %
                                (stopping at the first ratio that misses the budget); the fastest
                                candidate within the budget is kept

Every engine is timed on the same tile (default 1×1×32×128×128, `--tile`) (network only) in interleaved rounds (each round
runs every engine once, in a rotating order) with the same threads; medians. Fidelity is what `compress`
measured on its held-out tiles (Pearson r against the original network); "r vs truth" scores a test tile
against the clean volume the noisy input was made from.

Targets (issue 14): with defaults, no written model misses the 0.01 budget; pruned + int8 faster than
int8 at the same budget.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compress_cpu import cpu_model, interleaved_latency  # noqa: E402
from infer_cpu import KWARGS  # noqa: E402  (the 3D benchmark U-Net)

from efficientbioai import metrics  # noqa: E402
from efficientbioai.compress import compress  # noqa: E402
from efficientbioai.compress.tables import candidates_table  # noqa: E402
from efficientbioai.config import validate_config  # noqa: E402
from efficientbioai.engines import OpenVINOEngine, TorchEngine  # noqa: E402
from efficientbioai.errors import FidelityError  # noqa: E402
from efficientbioai.synthetic import nuclei  # noqa: E402
from efficientbioai.tables import human_bytes, human_count, table  # noqa: E402

NOISE = 0.25
MAX_PEARSON_DROP = 0.01  # the default budget


def volumes(n: int, shape, seed0: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(noisy, clean) pairs: the same generated nuclei with and without noise."""
    out = []
    for s in range(seed0, seed0 + n):
        clean, _ = nuclei(shape, density=1.5, radius=(4.0, 8.0), seed=s, noise=0.0)
        noisy, _ = nuclei(shape, density=1.5, radius=(4.0, 8.0), seed=s, noise=NOISE)
        out.append((noisy, clean))
    return out


def train(data, steps: int, threads: int, seed: int = 0):
    import torch
    from monai.networks.nets import UNet
    from tqdm.auto import tqdm

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = UNet(**KWARGS)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    crop = (16, 64, 64)
    for _ in tqdm(range(steps), desc="training the 3D denoising U-Net", leave=False, file=sys.stderr):
        xs, ys = [], []
        for _ in range(4):
            noisy, clean = data[rng.integers(len(data))]
            st = [rng.integers(0, s - c + 1) for s, c in zip(noisy.shape, crop, strict=True)]
            sl = tuple(slice(a, a + c) for a, c in zip(st, crop, strict=True))
            xs.append(noisy[sl][None])
            ys.append(clean[sl][None])
        x, y = torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))
        loss = torch.nn.functional.mse_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=1000)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument(
        "--tile",
        type=int,
        nargs=3,
        default=[32, 128, 128],
        help="calibration, fine-tuning and timing tile (the network's InstanceNorm learns its size)",
    )
    ap.add_argument("--no-auto", dest="auto", action="store_false", help="skip the strategy auto row")
    ap.add_argument("--repeats", type=int, default=20, help="interleaved timing rounds")
    ap.add_argument("--weights", type=Path, help="reuse (or, if absent, save) the trained network here")
    ap.add_argument(
        "--keep", type=Path, help="write the images and artifacts here and keep them (default: a temp dir)"
    )
    args = ap.parse_args()

    import torch

    print(f"CPU: {cpu_model()}, {args.threads} threads, torch {torch.__version__}", flush=True)
    t0 = time.perf_counter()
    train_data = volumes(3, (48, 160, 160), seed0=0)
    tile = tuple(args.tile)
    test_noisy, test_clean = volumes(1, tile, seed0=100)[0]
    reused = args.weights is not None and args.weights.is_file()
    if reused:
        from monai.networks.nets import UNet

        net = UNet(**KWARGS)
        net.load_state_dict(torch.load(args.weights, weights_only=True))
        net.eval()
    else:
        net = train(train_data, args.train_steps, args.threads)
        if args.weights is not None:
            torch.save(net.state_dict(), args.weights)
    with torch.no_grad():
        r_trained = metrics.pearson(net(torch.from_numpy(test_noisy[None, None])).numpy()[0, 0], test_clean)
    how = (
        f"loaded from {args.weights}"
        if reused
        else f"trained {args.train_steps} steps in {time.perf_counter() - t0:.0f} s"
    )
    print(
        f"{how}: test tile r vs truth "
        f"{r_trained:.4f} (noisy input: {metrics.pearson(test_noisy, test_clean):.4f})",
        flush=True,
    )

    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch) if args.keep is None else args.keep
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "images").mkdir()
        for i, (noisy, _) in enumerate(train_data):
            tifffile.imwrite(tmp / "images" / f"vol{i}.tif", noisy)
        torch.save(net.state_dict(), tmp / "unet3d.pt")
        base = {
            "model": {
                "kind": "monai",
                "name": "UNet",
                "kwargs": KWARGS,
                "checkpoint": str(tmp / "unet3d.pt"),
                "axes": "bczyx",
            },
            "calibration": {
                "images": str(tmp / "images" / "*.tif"),
                "num_tiles": 32,
                "tile_shape": list(tile),
            },
            "fidelity": {"num_tiles": 8},
            "engine": {"threads": args.threads, "latency_repeats": 5},
        }
        pname = f"prune {args.ratio:.0%} + int8 (defaults)"
        variants = {
            "OpenVINO fp32": {"quantize": {"precision": "fp32"}},
            "int8, budget off": {"quantize": {"precision": "int8", "max_drop": None}},
            "int8 (default budget)": {"quantize": {"precision": "int8"}},
            pname: {"prune": {"method": "l1", "ratio": args.ratio}},
        }
        if args.auto:
            variants["strategy auto (defaults)"] = {"quantize": {"strategy": "auto"}, "prune": {}}
        manifests, engines = {}, {"PyTorch fp32 eager": TorchEngine(net, args.threads)}
        for name, extra in variants.items():
            t = time.perf_counter()
            out = str(tmp / f"v{len(manifests)}")
            cfg = validate_config({**base, **extra, "output": out, "overwrite": True})
            try:
                res = compress(cfg, quiet=True)
            except FidelityError as exc:
                print(f"'{name}' could not be built within the budget: {exc.problem}", flush=True)
                continue
            manifests[name] = res.manifest
            m = res.manifest
            ft = next((s for s in m.transformations if s["step"] == "fine_tune"), None)
            q = next((s for s in m.transformations if s["step"] == "quantize_int8"), None)
            print(
                f"compressed '{name}' in {time.perf_counter() - t:.0f} s: {m.strategy['chosen']}"
                + (
                    f"; fine-tuning {ft['steps']} steps ({ft['stopped']}): validation r to the original "
                    f"{ft['validation_pearson_to_original']['before']:.4f}"
                    f" → {ft['validation_pearson_to_original']['best']:.4f}"
                    if ft
                    else ""
                )
                + (f"; {len(q['float_layers'])} layers kept in float" if q and "float_layers" in q else ""),
                flush=True,
            )
            if len(m.strategy["candidates"]) > 2:
                print(candidates_table(m), flush=True)
            engines[name] = OpenVINOEngine(
                res.output / "openvino" / "model.xml", m.precision, args.threads
            )

        x = test_noisy[None, None].astype(np.float32)
        outs = {n: e(x)[0, 0] for n, e in engines.items()}
        lat = interleaved_latency(engines, x, args.repeats)
        ref = lat["PyTorch fp32 eager"]
        int8 = lat.get("int8 (default budget)", lat.get("int8, budget off", float("nan")))
        n_params = sum(p.numel() for p in net.parameters())
        rows = [
            [
                "PyTorch fp32 eager",
                human_count(n_params),
                human_bytes((tmp / "unet3d.pt").stat().st_size),
                f"{ref:.1f}",
                "1.00x",
                f"{int8 / ref:.2f}x",
                "1.00000",
                f"{metrics.pearson(outs['PyTorch fp32 eager'], test_clean):.4f}",
            ]
        ]
        for name, m in manifests.items():
            rows.append(
                [
                    name,
                    human_count(m.size["parameters_compressed"]),
                    human_bytes(m.size["compressed_bytes"]),
                    f"{lat[name]:.1f}",
                    f"{ref / lat[name]:.2f}x",
                    f"{int8 / lat[name]:.2f}x",
                    f"{m.fidelity['pearson']:.5f}",
                    f"{metrics.pearson(outs[name], test_clean):.4f}",
                ]
            )
        print()
        print(
            table(
                [
                    "",
                    "params",
                    "file",
                    "median ms",
                    "vs PyTorch",
                    "vs int8 (budget)",
                    "r vs original",
                    "r vs truth",
                ],
                rows,
                title=f"3D MONAI UNet 16-256 (trained {args.train_steps} steps to denoise): tile "
                f"{(1, 1, *tile)}, {args.threads} thread(s), {args.repeats} interleaved rounds (network only)",
            )
        )
        budget_rows = [n for n, m in manifests.items() if m.strategy["budget"] is not None]
        missed = [n for n in budget_rows if 1 - manifests[n].fidelity["pearson"] > MAX_PEARSON_DROP + 1e-12]
        print(
            f"targets: every model written under the default budget keeps Pearson drop <= {MAX_PEARSON_DROP}: "
            + ("met" if not missed else f"NOT met ({', '.join(missed)})")
            + f" ({len(budget_rows)} rows)"
        )
        for name in (pname, "strategy auto (defaults)"):
            if name in manifests and "int8 (default budget)" in lat:
                speed = lat["int8 (default budget)"] / lat[name]
                print(
                    f"  {name}: {speed:.2f}x faster than int8 (default budget) at Pearson drop "
                    f"{1 - manifests[name]['fidelity']['pearson']:.4f}"
                )
            elif name in variants and name not in manifests:
                print(f"  {name}: refused by the budget (nothing written), see its message above")
        print(f"total {time.perf_counter() - t0:.0f} s")
        for e in engines.values():
            e.close()


if __name__ == "__main__":
    main()
