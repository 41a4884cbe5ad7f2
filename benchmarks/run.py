"""mpsd benchmark suite: throughput, size, quality and memory against image codecs.

One command reproduces the table of ``docs/benchmarks.md``::

    .venv/bin/python benchmarks/run.py table            # both datasets, prints the table
    .venv/bin/python benchmarks/run.py memory           # peak RSS, 10k vs 1M streamed images
    .venv/bin/python benchmarks/run.py scaling          # time vs N and vs image size -> docs/scaling.png
    .venv/bin/python benchmarks/run.py files            # folders of 10k and 1M PNG files (needs ~5 GB of disk)
    .venv/bin/python benchmarks/run.py all              # the three, in that order

Every method runs in its own fresh Python process (one after another, never two at once), so
its peak RSS is its own and no method warms caches for the next.  Timings are wall clock on
whatever the machine is doing; compare methods *within one run* (ratios), not across runs.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MPSD_BENCH_DATA", ROOT.parent / "shared" / "data"))
DATASETS = {"cifar10": "cifar10.npz", "fashion_mnist": "fashion_mnist.npz"}
#: mpsd truncation per dataset: the paper's bonds (Table 4) and the README's residual stage.
MPSD_BONDS = {"cifar10": ("4,6,6,4", "4,6,6,4"), "fashion_mnist": ("2,6,5,2", "2,2,2,2")}
#: Images timed per method (mpsd and fast codecs get the whole tiled set; slow ones a sample).
SLOW_SAMPLE = 2000
TENSORLY_SAMPLE = 1000


# ---------------------------------------------------------------------- data
def load(dataset: str, n: int | None = None) -> np.ndarray:
    """Real images of a shipped dataset, (N, H, W) or (N, H, W, C) uint8; tiled up to ``n``."""
    with np.load(DATA / DATASETS[dataset]) as f:
        x = np.concatenate([f["x_train"], f["x_test"]])
    if n is not None and n != len(x):
        x = x[np.arange(n) % len(x)]
    return np.ascontiguousarray(x)


def psnr(decoded: np.ndarray, original: np.ndarray) -> float:
    """Mean over images of the per-image PSNR in dB (255 peak), each capped at 100 dB."""
    n = len(original)
    d, o = decoded.reshape(n, -1), original.reshape(n, -1)
    mse = np.empty(n)
    for a in range(0, n, 2048):  # in blocks: no float copy of the whole dataset
        diff = d[a : a + 2048].astype(np.float64) - o[a : a + 2048]
        mse[a : a + 2048] = (diff**2).mean(axis=1)
    with np.errstate(divide="ignore"):
        p = np.where(mse > 0, 10 * np.log10(255.0**2 / np.maximum(mse, 1e-300)), 100.0)
    return float(np.minimum(p, 100.0).mean())


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def blas_info() -> str:
    from threadpoolctl import threadpool_info

    return ", ".join(f"{i['internal_api']} {i.get('version')} {i.get('architecture')}" for i in threadpool_info())


# ---------------------------------------------------------------------- methods (run in a child)
def run_mpsd(x: np.ndarray, dataset: str, variant: str, workers: int) -> dict:
    import mpsd
    from mpsd.core import _kernels

    _kernels.tune_allocator()  # as the mpsd CLI does for its process
    bond, residual = MPSD_BONDS[dataset]
    kw: dict = {"bond": bond}
    base, _, lean = variant.partition("+")
    if base == "residual":
        kw["residual_bonds"] = [residual]
    elif base == "tol":
        kw = {"tol": 0.05}
    if lean == "no-metrics":  # only what decoding needs (compress --no-metrics)
        kw["metrics"] = False
    with tempfile.TemporaryDirectory(dir=os.environ.get("MPSD_BENCH_TMP")) as tmp:
        # warm up: import zarr, load numba's cached kernels (compile on a first run)
        mpsd.compress(x[:64], Path(tmp) / "warm", workers=workers, **kw).decode(slice(None))
        t0, c0 = time.perf_counter(), time.process_time()
        archive = mpsd.compress(x, Path(tmp) / "s", workers=workers, **kw)
        enc, cpu_enc = time.perf_counter() - t0, time.process_time() - c0
        t0, c0 = time.perf_counter(), time.process_time()
        decoded = mpsd.open(Path(tmp) / "s").decode(slice(None))
        dec, cpu_dec = time.perf_counter() - t0, time.process_time() - c0
        size = archive.bytes_on_disk
        # random access: one image (one chunk of each core array read), from an open store and
        # from a freshly opened one (manifest and metadata parsed again)
        rng = np.random.default_rng(0)
        idx = rng.integers(0, len(x), 50)
        store = mpsd.open(Path(tmp) / "s")
        t0 = time.perf_counter()
        for i in idx:
            store[int(i)]
        one = (time.perf_counter() - t0) / len(idx)
        t0 = time.perf_counter()
        for i in idx:
            mpsd.open(Path(tmp) / "s")[int(i)]
        one_fresh = (time.perf_counter() - t0) / len(idx)
    return {
        "n": len(x), "encode_s": enc, "decode_s": dec, "bytes": size / len(x),
        "cpu_encode_s": cpu_enc, "cpu_decode_s": cpu_dec,
        "psnr": psnr(decoded, x), "threads": workers, "random_access_ms": one * 1e3,
        "random_access_fresh_ms": one_fresh * 1e3,
        "numba": _kernels.use_numba(),
    }


def run_tensorly(x: np.ndarray, dataset: str) -> dict:
    import tensorly as tl
    from tensorly.decomposition import tensor_train
    from threadpoolctl import threadpool_limits

    from mpsd.core.layout import choose_layout

    x = x[:TENSORLY_SAMPLE]
    nhwc = x if x.ndim == 4 else x[..., None]
    layout = choose_layout(*nhwc.shape[1:])
    bonds = [int(b) for b in MPSD_BONDS[dataset][0].split(",")]
    rank = [1, *bonds, 1]
    with threadpool_limits(1):
        t0, c0 = time.perf_counter(), time.process_time()
        factors = []
        for img in nhwc:
            tensors = layout.to_sites(img[None]) / 255.0
            factors.append([tensor_train(t, rank=rank).factors for t in tensors])
        enc, cpu_enc = time.perf_counter() - t0, time.process_time() - c0
        t0, c0 = time.perf_counter(), time.process_time()
        out = np.empty_like(nhwc)
        for i, fs in enumerate(factors):
            rec = np.stack([tl.tt_to_tensor(f) for f in fs])
            out[i] = np.clip(np.rint(layout.from_sites(rec)[0] * 255.0), 0, 255)
        dec, cpu_dec = time.perf_counter() - t0, time.process_time() - c0
    n_params = sum(f.size for per_image in factors for per_channel in per_image for f in per_channel)
    return {
        "n": len(x), "encode_s": enc, "decode_s": dec, "bytes": 4 * n_params / len(x),
        "cpu_encode_s": cpu_enc, "cpu_decode_s": cpu_dec, "psnr": psnr(out, nhwc), "threads": 1,
    }


def _codec_functions(lib: str, fmt: str, quality: int | None):
    if lib == "pillow":
        from PIL import Image

        if fmt == "jxl":
            import pillow_jxl  # noqa: F401  (registers the JXL plugin)
        pil_format = {"jpeg": "JPEG", "webp": "WEBP", "png": "PNG", "jxl": "JXL", "avif": "AVIF"}[fmt]
        opts = {} if quality is None else {"quality": quality}

        def enc(img: np.ndarray) -> bytes:
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format=pil_format, **opts)
            return buf.getvalue()

        def dec(data: bytes) -> np.ndarray:
            return np.asarray(Image.open(io.BytesIO(data)))

        return enc, dec
    import imagecodecs as ic

    table = {
        "jpeg": (lambda im: ic.jpeg8_encode(im, level=quality), ic.jpeg8_decode),
        "webp": (lambda im: ic.webp_encode(im, level=quality, lossless=False), ic.webp_decode),
        "png": (lambda im: ic.png_encode(im), ic.png_decode),
        "jxl": (lambda im: ic.jpegxl_encode(im, level=quality), ic.jpegxl_decode),
        # speed 6: libavif's usual default and Pillow's (imagecodecs' own default is ~25× slower)
        "avif": (lambda im: ic.avif_encode(im, level=quality, speed=6), ic.avif_decode),
    }
    return table[fmt]


def run_codec(x: np.ndarray, lib: str, fmt: str, quality: int | None, threads: int) -> dict:
    if fmt in ("jxl", "avif") or (lib == "pillow" and fmt == "webp"):
        x = x[:SLOW_SAMPLE]
    enc, dec = _codec_functions(lib, fmt, quality)
    if x.ndim == 3 and fmt in ("webp",) and lib == "imagecodecs":
        images = [np.repeat(i[..., None], 3, axis=2) for i in x]  # libwebp encodes RGB(A) only
    else:
        images = list(x)
    for img in images[:20]:  # warm up
        dec(enc(img))

    def run(fn, items):
        if threads == 1:
            return [fn(i) for i in items]
        # one contiguous share per thread, each a plain loop (imagecodecs and Pillow release
        # the GIL while they code an image)
        bounds = np.linspace(0, len(items), threads + 1).astype(int)
        with ThreadPoolExecutor(threads) as pool:
            parts = pool.map(lambda ab: [fn(i) for i in items[ab[0]:ab[1]]], itertools.pairwise(bounds))
            return [r for part in parts for r in part]

    t0, c0 = time.perf_counter(), time.process_time()
    blobs = run(enc, images)
    t_enc, cpu_enc = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    out = run(dec, blobs)
    t_dec, cpu_dec = time.perf_counter() - t0, time.process_time() - c0
    # grey images come back as RGB from some codecs (WebP is colour-only): keep one channel
    decoded = np.stack([np.asarray(o)[..., 0] if np.ndim(o) == x.ndim else np.asarray(o) for o in out])
    return {
        "n": len(x), "encode_s": t_enc, "decode_s": t_dec, "cpu_encode_s": cpu_enc, "cpu_decode_s": cpu_dec,
        "bytes": float(np.mean([len(b) for b in blobs])), "psnr": psnr(decoded, x), "threads": threads,
    }


def methods(dataset: str) -> list[tuple[str, dict]]:
    bond, residual = MPSD_BONDS[dataset]
    out = [
        (f"mpsd --bond {bond}", {"kind": "mpsd", "variant": "bond"}),
        (f"mpsd --bond {bond} --residual-bond {residual}", {"kind": "mpsd", "variant": "residual"}),
        ("mpsd --tol 0.05", {"kind": "mpsd", "variant": "tol"}),
        (f"mpsd --bond {bond} (numpy only)", {"kind": "mpsd", "variant": "bond", "no_numba": True}),
        (f"mpsd --bond {bond} --no-metrics", {"kind": "mpsd", "variant": "bond+no-metrics"}),
        (f"mpsd --bond {bond} --residual-bond {residual} --no-metrics", {"kind": "mpsd", "variant": "residual+no-metrics"}),
        ("mpsd --tol 0.05 --no-metrics", {"kind": "mpsd", "variant": "tol+no-metrics"}),
        (f"tensorly tensor_train loop ({bond})", {"kind": "tensorly"}),
    ]
    for lib in ("imagecodecs", "pillow"):
        for fmt, q in (("jpeg", 75), ("jpeg", 90), ("webp", 75), ("png", None), ("jxl", 75), ("avif", 75)):
            label = f"{lib} {fmt.upper()}" + (f" q{q}" if q is not None else "")
            out.append((label, {"kind": "codec", "lib": lib, "fmt": fmt, "quality": q, "threads": 1}))
    for fmt in ("jpeg", "webp"):
        out.append((f"imagecodecs {fmt.upper()} q75, 2 threads", {"kind": "codec", "lib": "imagecodecs", "fmt": fmt, "quality": 75, "threads": 2}))
    return out


def child_main(args: argparse.Namespace) -> None:
    spec = json.loads(args.spec)
    x = load(args.dataset, args.n)
    kind = spec["kind"]
    if kind == "mpsd":
        res = run_mpsd(x, args.dataset, spec["variant"], args.workers)
    elif kind == "tensorly":
        res = run_tensorly(x, args.dataset)
    else:
        res = run_codec(x, spec["lib"], spec["fmt"], spec["quality"], spec["threads"])
    res["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(res))


def run_child(cmd: list[str], env: dict | None = None, timeout: float = 3600) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:120]}


# ---------------------------------------------------------------------- table
def fmt_rate(n: int, seconds: float) -> tuple[str, str]:
    return f"{n / seconds:,.0f}", f"{seconds / n * 1e6:,.1f}"


def table_main(args: argparse.Namespace) -> list[dict]:
    rows = []
    for dataset in args.datasets:
        n = args.n or (50_000 if dataset == "cifar10" else 70_000)
        print(f"\n## {dataset}: {n:,} images (real images, tiled when N exceeds the file)\n", flush=True)
        header = ("| method | threads | encode img/s | encode µs/img | encode CPU µs/img | decode img/s | "
                  "decode µs/img | decode CPU µs/img | bytes/img | PSNR dB | peak RSS MB |")
        print(header)
        print("|" + "---|" * 11)
        for label, spec in methods(dataset):
            if args.only and not any(s.lower() in label.lower() for s in args.only):
                continue
            env = dict(os.environ)
            if spec.get("no_numba"):
                env["MPSD_NO_NUMBA"] = "1"
            cmd = [sys.executable, __file__, "_child", "--dataset", dataset, "--n", str(n),
                   "--workers", str(args.workers), "--spec", json.dumps(spec)]
            res = run_child(cmd, env)
            res.update(label=label, dataset=dataset)
            rows.append(res)
            if "error" in res:
                print(f"| {label} | – | error: {res['error']} | | | | | | | | |", flush=True)
                continue
            e_rate, e_us = fmt_rate(res["n"], res["encode_s"])
            d_rate, d_us = fmt_rate(res["n"], res["decode_s"])
            p = "lossless" if res["psnr"] >= 100 else f"{res['psnr']:.2f}"
            ce = res.get("cpu_encode_s", float("nan")) / res["n"] * 1e6
            cd = res.get("cpu_decode_s", float("nan")) / res["n"] * 1e6
            print(f"| {label} | {res['threads']} | {e_rate} | {e_us} | {ce:,.1f} | {d_rate} | {d_us} | {cd:,.1f} | "
                  f"{res['bytes']:,.0f} | {p} | {res['peak_rss_mb']:,.0f} |", flush=True)
        ratios(rows, dataset)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))
    return rows


def ratios(rows: list[dict], dataset: str) -> None:
    def rate(label_start: str, key: str, lean: bool = False) -> float | None:
        for r in rows:
            if (r["dataset"] == dataset and r["label"].startswith(label_start) and "error" not in r
                    and r["label"].endswith("--no-metrics") == lean):
                return r["n"] / r[key]
        return None

    bond = MPSD_BONDS[dataset][0]
    lines = []
    for variant, lean in ((v, lean) for lean in (False, True)
                          for v in (f"mpsd --bond {bond}", "mpsd --tol", f"mpsd --bond {bond} --residual")):
        enc = rate(variant, "encode_s", lean)
        if lean:
            variant += " ... --no-metrics"
        t = rate("tensorly", "encode_s")
        jenc = rate("imagecodecs JPEG q75", "encode_s")
        if enc and t:
            lines.append(f"{variant}: encode {enc / t:.1f}× the tensorly loop"
                         + (f", {enc / jenc:.2f}× imagecodecs JPEG q75 encode" if jenc else ""))
    dec = rate(f"mpsd --bond {bond}", "decode_s")
    for lib in ("imagecodecs JPEG q75", "imagecodecs WEBP q75", "pillow WEBP q75", "pillow PNG"):
        other = rate(lib, "decode_s")
        if dec and other:
            lines.append(f"mpsd --bond {bond} decode: {dec / other:.2f}× {lib} decode (1 thread)")
    for lib in ("imagecodecs JPEG q75, 2 threads", "imagecodecs WEBP q75, 2 threads"):
        other = rate(lib, "decode_s")
        if dec and other:
            lines.append(f"mpsd --bond {bond} decode: {dec / other:.2f}× {lib} decode")
    ra = [r for r in rows if r["dataset"] == dataset and r["label"].startswith(f"mpsd --bond {bond}") and "random_access_ms" in r]
    if ra:
        lines.append(f"random access to one image: {ra[0]['random_access_ms']:.2f} ms from an open store, "
                     f"{ra[0]['random_access_fresh_ms']:.2f} ms opening the store first")
    def cpu(label_start: str, key: str) -> float | None:
        for r in rows:
            if r["dataset"] == dataset and r["label"].startswith(label_start) and key in r and not r["label"].endswith("--no-metrics"):
                return r[key] / r["n"]
        return None

    t_cpu = cpu("tensorly", "cpu_encode_s")
    for variant in (f"mpsd --bond {bond}", "mpsd --tol", f"mpsd --bond {bond} --residual"):
        c = cpu(variant, "cpu_encode_s")
        if c and t_cpu:
            lines.append(f"{variant}: encode CPU time per image {t_cpu / c:.1f}× less than the tensorly loop")
    c = cpu(f"mpsd --bond {bond}", "cpu_decode_s")
    for lib in ("imagecodecs JPEG q75", "imagecodecs WEBP q75"):
        o = cpu(lib, "cpu_decode_s")
        if c and o:
            lines.append(f"mpsd --bond {bond} decode CPU time per image: {o / c:.2f}× {lib}'s (>1: mpsd cheaper)")
    print("\nRatios (same run):")
    for line in lines:
        print("- " + line)


# ---------------------------------------------------------------------- memory
def tiled_source(n: int, dataset: str = "cifar10"):
    """An ImageSource of ``n`` images made by tiling the real images, generated chunk by chunk."""
    from mpsd.readers.base import ImageSource

    base = load(dataset)
    nhwc = base if base.ndim == 4 else base[..., None]

    def read(start: int, stop: int) -> np.ndarray:
        return np.ascontiguousarray(nhwc[np.arange(start, stop) % len(nhwc)])

    return ImageSource(path=f"tiled-{dataset}-{n}", n_images=n, image_shape=tuple(nhwc.shape[1:]),
                       dtype=nhwc.dtype, read=read, channel_axis=base.ndim == 4)


def memory_child(args: argparse.Namespace) -> None:
    import mpsd
    from mpsd.core import _kernels

    _kernels.tune_allocator()  # as the mpsd CLI does for its process

    source = tiled_source(args.n, args.dataset)
    rss0 = peak_rss_mb()
    with tempfile.TemporaryDirectory(dir=os.environ.get("MPSD_BENCH_TMP")) as tmp:
        t0 = time.perf_counter()
        archive = mpsd.compress(source, Path(tmp) / "s", bond=MPSD_BONDS[args.dataset][0], workers=args.workers)
        enc = time.perf_counter() - t0
        rss_enc = peak_rss_mb()
        t0 = time.perf_counter()
        total = 0
        # eight chunks per call: decode() spreads a call's chunks over the CPUs.  Each batch is
        # dropped before the next is decoded, as a streaming consumer would (a for-loop variable
        # would otherwise keep the previous batch alive while the next one is built: two batches)
        for _start, batch in archive.iter_batches(8 * archive.meta.chunk_images):
            total += int(batch.shape[0])
            del batch
        dec = time.perf_counter() - t0
        size = archive.bytes_on_disk
    print("RESULT " + json.dumps({
        "n": args.n, "encode_s": enc, "decode_s": dec, "bytes": size, "rss_start_mb": rss0,
        "rss_after_compress_mb": rss_enc, "peak_rss_mb": peak_rss_mb(), "decoded": total,
    }))


def memory_main(args: argparse.Namespace) -> list[dict]:
    rows = []
    print("\n## Peak memory, streamed compress + decompress (CIFAR-10 images tiled)\n")
    print("| images | compress s | img/s | decompress s | img/s | store MB | peak RSS MB (compress) | peak RSS MB (all) |")
    print("|" + "---|" * 8)
    for n in args.sizes:
        cmd = [sys.executable, __file__, "_memory", "--n", str(n), "--workers", str(args.workers), "--dataset", "cifar10"]
        res = run_child(cmd, timeout=7200)
        rows.append(res)
        if "error" in res:
            print(f"| {n:,} | error: {res['error']} |", flush=True)
            continue
        print(f"| {n:,} | {res['encode_s']:.1f} | {n / res['encode_s']:,.0f} | {res['decode_s']:.1f} | "
              f"{n / res['decode_s']:,.0f} | {res['bytes'] / 2**20:,.0f} | {res['rss_after_compress_mb']:,.0f} | "
              f"{res['peak_rss_mb']:,.0f} |", flush=True)
    ok = [r for r in rows if "error" not in r]
    if len(ok) >= 2:
        lo, hi = ok[0]["peak_rss_mb"], ok[-1]["peak_rss_mb"]
        print(f"\npeak RSS {ok[-1]['n']:,} vs {ok[0]['n']:,} images: {hi:,.0f} / {lo:,.0f} MB = {hi / lo:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))
    return rows


# ---------------------------------------------------------------------- many files
def make_png_folder(root: Path, n: int) -> None:
    """``n`` PNG files of real CIFAR-10 images in class folders (the 5,000 images cycled)."""
    from PIL import Image

    with np.load(DATA / DATASETS["cifar10"]) as f:
        x = np.concatenate([f["x_train"], f["x_test"]])
        y = np.concatenate([f["y_train"], f["y_test"]])
        classes = [str(c) for c in f["classes"]]
    encoded = []
    for img in x:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        encoded.append(buf.getvalue())
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        k = i % len(x)
        (root / classes[int(y[k])] / f"{i:08d}.png").write_bytes(encoded[k])


def files_main(args: argparse.Namespace) -> list[dict]:
    """``mpsd compress FOLDER`` on folders of N PNG files: time and the CLI's peak RSS."""
    rows = []
    print("\n## Many files: `mpsd compress FOLDER --bond 4,6,6,4` (real CIFAR-10 PNGs, cycled)\n")
    print("| files | folder MB | compress s | files/s | peak RSS MB | peak RSS bytes per file |")
    print("|---|---|---|---|---|---|")
    for n in args.sizes:
        with tempfile.TemporaryDirectory(dir=os.environ.get("MPSD_BENCH_TMP")) as tmp:
            folder = Path(tmp) / "images"
            make_png_folder(folder, n)
            size = sum(f.stat().st_size for f in folder.rglob("*.png"))
            cmd = [sys.executable, "-m", "mpsd", "compress", str(folder), str(Path(tmp) / "s.zarr"),
                   "--bond", "4,6,6,4", "--workers", str(args.workers)]
            log = Path(tmp) / "stderr.txt"
            t0 = time.perf_counter()
            with open(log, "wb") as err_file:  # a file, not a pipe: nothing blocks while we wait
                proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err_file)
                _, status, usage = os.wait4(proc.pid, 0)
            seconds = time.perf_counter() - t0
            proc.returncode = os.waitstatus_to_exitcode(status)
            err = log.read_text(errors="replace")
            if proc.returncode != 0:
                rows.append({"n": n, "error": err.strip().splitlines()[-1:]})
                print(f"| {n:,} | error: {rows[-1]['error']} |", flush=True)
                continue
            peak = usage.ru_maxrss / 1024
            rows.append({"n": n, "folder_bytes": size, "compress_s": seconds, "peak_rss_mb": peak})
            print(f"| {n:,} | {size / 2**20:,.0f} | {seconds:,.1f} | {n / seconds:,.0f} | {peak:,.0f} | "
                  f"{peak * 2**20 / n:,.0f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))
    return rows


# ---------------------------------------------------------------------- scaling
def mosaic(n: int, size: int) -> np.ndarray:
    """``n`` real size×size colour images, each a mosaic of (size/32)² different CIFAR images."""
    base = load("cifar10")
    k = size // 32
    idx = np.arange(n * k * k) % len(base)
    tiles = base[idx].reshape(n, k, k, 32, 32, 3)
    return np.ascontiguousarray(tiles.transpose(0, 1, 3, 2, 4, 5).reshape(n, size, size, 3))


def scaling_child(args: argparse.Namespace) -> None:
    import mpsd
    from mpsd.core import _kernels

    _kernels.tune_allocator()  # as the mpsd CLI does for its process

    x = load("cifar10", args.n) if args.size == 32 else mosaic(args.n, args.size)
    kw = {"bond": "4,6,6,4"} if args.size == 32 else {"tol": 0.05}
    with tempfile.TemporaryDirectory(dir=os.environ.get("MPSD_BENCH_TMP")) as tmp:
        mpsd.compress(x[:32], Path(tmp) / "warm", workers=args.workers, **kw)
        t0 = time.perf_counter()
        a = mpsd.compress(x, Path(tmp) / "s", workers=args.workers, **kw)
        enc = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _s, _b in a.iter_batches(8 * a.meta.chunk_images):
            pass
        dec = time.perf_counter() - t0
    print("RESULT " + json.dumps({"n": args.n, "size": args.size, "encode_s": enc, "decode_s": dec,
                                  "peak_rss_mb": peak_rss_mb()}))


def scaling_main(args: argparse.Namespace) -> dict:
    out: dict = {"machine": machine(), "by_n": [], "by_size": []}
    print("\n## Scaling: time vs number of images (CIFAR-10 32×32, --bond 4,6,6,4)\n")
    print("| images | compress s | img/s | decompress s | img/s | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for n in args.ns:
        if n > 100_000:  # stream from a tiled source instead of an in-memory array
            res = run_child([sys.executable, __file__, "_memory", "--n", str(n), "--workers", str(args.workers), "--dataset", "cifar10"], timeout=7200)
        else:
            res = run_child([sys.executable, __file__, "_scaling", "--n", str(n), "--size", "32", "--workers", str(args.workers)])
        out["by_n"].append(res)
        if "error" not in res:
            print(f"| {n:,} | {res['encode_s']:.2f} | {n / res['encode_s']:,.0f} | {res['decode_s']:.2f} | "
                  f"{n / res['decode_s']:,.0f} | {res['peak_rss_mb']:,.0f} |", flush=True)
    print("\n## Scaling: time vs image size (mosaics of real CIFAR-10 images, --tol 0.05)\n")
    print("| size | images | compress s | µs/image | µs/pixel·1e3 | decompress s | µs/image |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        n = max(args.size_images * 1024 // (size * size), 100)
        res = run_child([sys.executable, __file__, "_scaling", "--n", str(n), "--size", str(size), "--workers", str(args.workers)])
        out["by_size"].append(res)
        if "error" not in res:
            us = res["encode_s"] / n * 1e6
            print(f"| {size}×{size} | {n:,} | {res['encode_s']:.2f} | {us:,.0f} | {us / (size * size) * 1e3:.1f} | "
                  f"{res['decode_s']:.2f} | {res['decode_s'] / n * 1e6:,.0f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    plot_scaling(out, Path(args.png))
    print(f"\nplot: {args.png}")
    return out


def plot_scaling(out: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    rows = [r for r in out["by_n"] if "error" not in r]
    if rows:
        n = np.array([r["n"] for r in rows], dtype=float)
        for key, label, marker in (("encode_s", "compress (array → committed store)", "o"), ("decode_s", "decompress (store → uint8)", "s")):
            t = np.array([r[key] for r in rows])
            a1.loglog(n, t, marker=marker, label=label)
            slope = t[-1] / n[-1]
            a1.loglog(n, slope * n, ":", color="grey", linewidth=0.8)
        a1.set_xlabel("images N")
        a1.set_ylabel("seconds")
        a1.set_title("time vs N (CIFAR-10, --bond 4,6,6,4); dotted: linear")
        a1.grid(True, which="both", alpha=0.3)
        a1.legend(fontsize=8)
    rows = [r for r in out["by_size"] if "error" not in r]
    if rows:
        px = np.array([r["size"] ** 2 for r in rows], dtype=float)
        enc = np.array([r["encode_s"] / r["n"] * 1e6 for r in rows])
        dec = np.array([r["decode_s"] / r["n"] * 1e6 for r in rows])
        a2.loglog(px, enc, "o-", label="compress")
        a2.loglog(px, dec, "s-", label="decompress")
        a2.set_xticks(px, [f"{r['size']}²" for r in rows])
        a2.set_xlabel("pixels per image")
        a2.set_ylabel("µs per image")
        a2.set_title("time per image vs size (mosaics, --tol 0.05)")
        a2.grid(True, which="both", alpha=0.3)
        a2.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


# ---------------------------------------------------------------------- main
def machine() -> dict:
    import numpy

    info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "python": platform.python_version(),
            "numpy": numpy.__version__, "cpus": len(os.sched_getaffinity(0)), "platform": platform.platform()}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import numba

        info["numba"] = numba.__version__
    except ImportError:
        info["numba"] = None
    info["blas"] = blas_info()
    info["OPENBLAS_CORETYPE"] = os.environ.get("OPENBLAS_CORETYPE")
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("table", help="throughput/size/quality table on the shipped datasets")
    t.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    t.add_argument("--n", type=int, default=None, help="images per dataset (default 50,000 CIFAR tiles / 70,000 Fashion-MNIST)")
    t.add_argument("--only", nargs="*", help="run only methods whose label contains one of these strings")
    m = sub.add_parser("memory", help="peak RSS of streamed compress+decompress for several N")
    m.add_argument("--sizes", nargs="+", type=int, default=[10_000, 1_000_000])
    s = sub.add_parser("scaling", help="time vs N and vs image size, plotted to docs/scaling.png")
    s.add_argument("--ns", nargs="+", type=int, default=[1_000, 10_000, 100_000, 1_000_000])
    s.add_argument("--sizes", nargs="+", type=int, default=[32, 64, 128, 256])
    s.add_argument("--size-images", type=int, default=5_000, help="pixels per size point, in units of 32×32 images")
    s.add_argument("--png", default=str(ROOT / "docs" / "scaling.png"))
    fl = sub.add_parser("files", help="mpsd compress of folders of N PNG files: time and peak RSS (not in all)")
    fl.add_argument("--sizes", nargs="+", type=int, default=[10_000, 1_000_000])
    a = sub.add_parser("all", help="table, memory and scaling")
    for q in (t, m, s, fl, a):
        q.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
        q.add_argument("--json", default=None, help="also write the raw results here")
    c = sub.add_parser("_child")
    c.add_argument("--dataset")
    c.add_argument("--n", type=int)
    c.add_argument("--workers", type=int)
    c.add_argument("--spec")
    mc = sub.add_parser("_memory")
    mc.add_argument("--n", type=int)
    mc.add_argument("--workers", type=int)
    mc.add_argument("--dataset", default="cifar10")
    sc = sub.add_parser("_scaling")
    sc.add_argument("--n", type=int)
    sc.add_argument("--size", type=int)
    sc.add_argument("--workers", type=int)
    args = p.parse_args()
    if args.cmd == "_child":
        return child_main(args)
    if args.cmd == "_memory":
        return memory_child(args)
    if args.cmd == "_scaling":
        return scaling_child(args)
    print("machine: " + json.dumps(machine()))
    if args.cmd == "table":
        table_main(args)
    elif args.cmd == "memory":
        memory_main(args)
    elif args.cmd == "scaling":
        scaling_main(args)
    elif args.cmd == "files":
        files_main(args)
    else:
        base = args.json
        for fn, extra in ((table_main, {"datasets": list(DATASETS), "n": None, "only": None}),
                          (memory_main, {"sizes": [10_000, 1_000_000]}),
                          (scaling_main, {"ns": [1_000, 10_000, 100_000, 1_000_000], "sizes": [32, 64, 128, 256],
                                          "size_images": 5_000, "png": str(ROOT / "docs" / "scaling.png")})):
            ns = argparse.Namespace(**{**vars(args), **extra, "json": (f"{base}.{fn.__name__}.json" if base else None)})
            fn(ns)


if __name__ == "__main__":
    main()
