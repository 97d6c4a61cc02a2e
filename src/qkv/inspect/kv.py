"""KV-cache arithmetic: bytes for a config x context x batch, and MHA vs GQA vs MQA.

Every generated token leaves a key and a value vector per KV head in every layer:

    bytes = 2 (K and V) * n_layer * n_kv_head * head_dim * bytes_per_element * tokens

with tokens = context * batch. Grouped-query attention shares one K/V head among
n_head / n_kv_head query heads, so the cache shrinks by exactly that factor; MQA is the
limit n_kv_head = 1. Named real configs come from qkv.config's presets.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from qkv.config import ModelConfig

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}


def dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown KV dtype {dtype!r}; choose one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def kv_cache_bytes(cfg: ModelConfig, context: int, batch: int = 1, dtype: str = "bf16") -> int:
    if context < 0 or batch < 1:
        raise ValueError(f"context must be >= 0 and batch >= 1 (got context={context}, batch={batch})")
    return cfg.kv_bytes_per_token(dtype_bytes(dtype)) * context * batch


@dataclass
class KVRow:
    variant: str  # MHA / GQA / MQA
    n_head: int
    n_kv_head: int
    head_dim: int
    n_layer: int
    bytes_per_token: int
    bytes_total: int


def variant_name(cfg: ModelConfig) -> str:
    return "MHA" if cfg.n_kv_head == cfg.n_head else "MQA" if cfg.n_kv_head == 1 else "GQA"


def kv_variants(cfg: ModelConfig, context: int, batch: int = 1, dtype: str = "bf16") -> list[dict]:
    """The config as it is, next to its MHA and MQA versions (same n_head, head_dim, layers)."""
    rows = []
    seen = set()
    for n_kv in (cfg.n_head, cfg.n_kv_head, 1):
        if n_kv in seen:
            continue
        seen.add(n_kv)
        c = cfg.replace(n_kv_head=n_kv)
        rows.append(
            asdict(
                KVRow(
                    variant=variant_name(c) + (" (this model)" if n_kv == cfg.n_kv_head else ""),
                    n_head=c.n_head,
                    n_kv_head=c.n_kv_head,
                    head_dim=c.head_dim,
                    n_layer=c.n_layer,
                    bytes_per_token=c.kv_bytes_per_token(dtype_bytes(dtype)),
                    bytes_total=kv_cache_bytes(c, context, batch, dtype),
                )
            )
        )
    return rows


def kv_report(configs: dict[str, ModelConfig], context: int | None, batch: int = 1, dtype: str = "bf16") -> dict:
    """{name: {"context", "variants": [...]}} for several configs; context None = each model's own."""
    return {
        name: {
            "context": context or c.max_seq_len,
            "batch": batch,
            "dtype": dtype,
            "variants": kv_variants(c, context or c.max_seq_len, batch, dtype),
        }
        for name, c in configs.items()
    }


def human_bytes(n: float) -> str:
    for suffix, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {suffix}"
    return f"{n:.0f} B"


def plot_kv(
    configs: dict[str, ModelConfig], path, batch: int = 1, dtype: str = "bf16", max_context: int = 32768
) -> None:
    """Cache size vs context (log-log) for each config's MHA/GQA/MQA variants."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ctx = [2**i for i in range(7, max_context.bit_length())]
    fig, ax = plt.subplots(figsize=(6, 4))
    styles = {"MHA": "-", "GQA": "--", "MQA": ":"}
    for ci, (name, cfg) in enumerate(configs.items()):
        color = f"C{ci}"
        for row in kv_variants(cfg, 1, batch, dtype):
            kind = row["variant"].split()[0]
            ys = [row["bytes_per_token"] * c * batch / 2**30 for c in ctx]
            ax.plot(
                ctx, ys, styles[kind], color=color, lw=1.2, label=f"{name} {row['variant']} (kv={row['n_kv_head']})"
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel(f"KV cache (GiB, {dtype}, batch {batch})")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    ax.set_title("KV-cache size: MHA vs GQA vs MQA", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
