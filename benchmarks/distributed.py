"""Data-parallel training at catalogue scale: step time, bytes communicated and memory per rank, for a small
BERT4Rec (dim 64) on synthetic catalogues of 100k, 1M and 4M items, 2 ranks under torchrun (gloo, CPU).

Three ways to train the item table:
- dense_full: full softmax over the catalogue (the default), dense gradients;
- dense_sampled: sampled softmax with K popularity-sampled negatives and logQ correction, dense gradients
  (the embedding is an ordinary nn.Embedding: its gradient is a dense n_items x d table all the same);
- sparse_sampled: sampled softmax with the item table as nn.Embedding(sparse=True) (swapped in here, the model
  files are unchanged) and SparseAdam for it, AdamW for the rest: DDP over gloo all-reduces sparse gradients
  by gathering each rank's (indices, rows).
Each rank trains on its share of the same global batch, as recsys_pretrain/train/loop.py does (the step
below mirrors the loop's: `distributed.part`, DDP with gradients as bucket views, clipping, AdamW).

Bytes: DDP all-reduces every parameter's gradient each step; a communication hook counts the bytes it hands
to the all-reduce (the payload; a ring all-reduce sends and receives about 2 (W - 1) / W times the payload per
rank). For sparse gradients the hook is not used (see the .md); the payload is counted from the gradient's
(indices, values) before the exchange. Two cores cannot show a speed-up, and none is claimed: the figures are
costs per step.

    python benchmarks/distributed.py                 # about 10 minutes on 2 cores
    python benchmarks/distributed.py --quick         # 10k items, a smoke run
    python benchmarks/distributed.py --sparse-check  # only: do gloo + DDP take nn.Embedding(sparse=True)?
    python benchmarks/distributed.py --render [--note TEXT]  # rewrite the .md from the .json

Results: benchmarks/results/distributed.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, write_results  # noqa: E402

SIZES = (100_000, 1_000_000, 4_000_000)
MODES = ("dense_full", "dense_sampled", "sparse_sampled")
DIM, MAX_LEN, LAYERS, HEADS = 64, 20, 2, 2
GLOBAL_BATCH = 16  # sequences per global batch (each of 2 ranks gets 8)
NEGATIVES = 1024
N_SEQS = 4000


def api():
    """The model registry, BERT4Rec's config and the loop's config: the one place to change when they move."""
    from recsys_pretrain.models import MODELS
    from recsys_pretrain.models.bert4rec import BERT4RecConfig
    from recsys_pretrain.train_config import TrainConfig

    return MODELS, BERT4RecConfig, TrainConfig


def synthetic(n_items: int, n_seqs: int, seed: int = 0) -> list:
    """Histories of 2..MAX_LEN items drawn from a Zipf-like popularity (exponent 0.8) over shuffled ids."""
    import numpy as np

    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n_items + 1) ** 0.8
    p /= p.sum()
    ids = rng.permutation(n_items) + 1
    lengths = rng.integers(2, MAX_LEN + 1, n_seqs)
    flat = ids[rng.choice(n_items, int(lengths.sum()), p=p)]
    return np.split(flat, np.cumsum(lengths)[:-1])


def _err(exc: Exception) -> str:
    """An exception as one short line (PyTorch's dispatcher errors run to pages)."""
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:240]}"


def sparse_check() -> dict:
    """A tiny 2-rank check: DDP over gloo with nn.Embedding(sparse=True); then AdamW and SparseAdam on it."""
    import torch
    import torch.distributed as tdist
    from torch import nn

    from recsys_pretrain import distributed as dist

    dist.init_from_env()
    rank = dist.rank()
    torch.manual_seed(0)
    emb = nn.Embedding(100, 4, sparse=True)
    ddp = nn.parallel.DistributedDataParallel(emb)
    ids = torch.tensor([1, 2, 3]) if rank == 0 else torch.tensor([3, 50])
    out: dict = {"torch": torch.__version__, "backend": tdist.get_backend()}
    try:
        ddp(ids).sum().backward()
        g = emb.weight.grad.coalesce()
        out["ddp_backward"] = "ok"
        out["grad_is_sparse"] = g.is_sparse
        out["rows_after_allreduce"] = g.indices()[0].tolist()
        out["row_values"] = g.values()[:, 0].tolist()  # ids seen by one rank: 0.5, by both: 1.0 (the mean)
    except Exception as exc:  # record the answer, whatever it is
        out["ddp_backward"] = _err(exc)
        return out
    for name, make in (("AdamW", torch.optim.AdamW), ("SparseAdam", torch.optim.SparseAdam)):
        try:
            make(emb.parameters(), lr=0.1).step()
            out[name] = "ok"
        except Exception as exc:
            out[name] = _err(exc)
    try:
        nn.utils.clip_grad_norm_(emb.parameters(), 1.0)
        out["clip_grad_norm_"] = "ok"
    except Exception as exc:
        out["clip_grad_norm_"] = _err(exc)
    try:  # a communication hook on a sparse gradient (how the dense cases count bytes)
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        ddp2 = nn.parallel.DistributedDataParallel(nn.Embedding(100, 4, sparse=True))
        def hook(state, bucket):
            return default_hooks.allreduce_hook(None, bucket)

        ddp2.register_comm_hook(None, hook)
        ddp2(ids).sum().backward()
        out["comm_hook"] = "ok"
    except Exception as exc:
        out["comm_hook"] = _err(exc)
    return out


def worker(n_items: int, mode: str, steps: int, warmup: int) -> dict:
    """One rank's measurement of `steps` steps (after `warmup`); rank 0 returns every rank's figures."""
    import torch
    import torch.distributed as tdist
    from torch import nn
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from recsys_pretrain import distributed as dist

    dist.init_from_env()
    rank, world = dist.rank(), dist.world_size()
    MODELS, BERT4RecConfig, TrainConfig = api()
    sampled = mode != "dense_full"
    cfg = BERT4RecConfig(dim=DIM, n_layers=LAYERS, n_heads=HEADS, max_len=MAX_LEN, dropout=0.1,
                         negatives=NEGATIVES if sampled else 0,
                         train=TrainConfig(batch_size=GLOBAL_BATCH, lr=1e-3, weight_decay=0.01, warmup_steps=0))
    t0 = time.perf_counter()
    seqs = synthetic(n_items, N_SEQS)
    task = MODELS["bert4rec"].task(cfg, SimpleNamespace(n_users=len(seqs), n_items=n_items, train_seqs=seqs,
                                                         train_matrix=None))
    torch.manual_seed(0)
    model = MODELS["bert4rec"].build(cfg, len(seqs), n_items)
    if mode == "sparse_sampled":  # the same weights, as a table with sparse gradients
        dense = model.item
        model.item = nn.Embedding(dense.num_embeddings, DIM, padding_idx=0, sparse=True)
        model.item.weight = dense.weight
    setup_s = time.perf_counter() - t0
    ddp = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
    payload = {"bytes": 0}
    if mode != "sparse_sampled":
        def counting_hook(state, bucket):
            state["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
            return default_hooks.allreduce_hook(None, bucket)

        ddp.register_comm_hook(payload, counting_hook)
    table = [model.item.weight]
    rest = [p for n, p in model.named_parameters() if n != "item.weight"]
    if mode == "sparse_sampled":
        opts = [torch.optim.SparseAdam(table, lr=1e-3), torch.optim.AdamW(rest, lr=1e-3, weight_decay=0.01)]
    else:
        opts = [torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)]
    gen = torch.Generator().manual_seed(1)
    batches = task.batches(gen)
    times, opt_times, tokens, sparse_bytes, collate = [], [], [], [], []
    for step in range(warmup + steps):
        tb = time.perf_counter()
        batch = next(batches)  # the whole global batch, on every rank
        t1 = time.perf_counter()
        mine, scale = dist.part(batch, rank, world)
        _, loss = ddp(**mine)
        loss = loss * scale
        for o in opts:
            o.zero_grad(set_to_none=True)
        if mode == "sparse_sampled":  # the rank's sparse payload: its (indices, rows) before the exchange
            def grab(grad):
                g = grad.coalesce()
                sparse_bytes.append(g.indices().numel() * 8 + g.values().numel() * 4)
                return grad

            handle = model.item.weight.register_hook(grab)
        loss.backward()
        if mode == "sparse_sampled":
            handle.remove()
            nn.utils.clip_grad_norm_(rest, 1.0)  # clipping the sparse table is not supported: dense part only
        else:
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        t2 = time.perf_counter()
        for o in opts:
            o.step()
        if step >= warmup:
            times.append(time.perf_counter() - t1)
            opt_times.append(time.perf_counter() - t2)
            collate.append((t1 - tb, int((batch["inputs"] != 0).sum())))
            tokens.append(int((mine["labels"] != 0).sum()))
        if step == warmup - 1:
            payload["bytes"] = 0
            sparse_bytes.clear()
    step_s = sum(times) / len(times)
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the bandwidth probe
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # gloo's all-reduce of a dense gradient's size on its own: how much of a dense step is communication
    probe = torch.zeros(dense_bytes // 4)
    tdist.barrier()
    t1 = time.perf_counter()
    tdist.all_reduce(probe)
    allreduce_s = time.perf_counter() - t1
    del probe
    mine = {"rank": rank, "step_s": step_s, "step_s_min": min(times), "optimizer_s": sum(opt_times) / len(opt_times),
            "collate_s": sum(c for c, _ in collate) / len(collate),
            "positions_per_global_batch": sum(n for _, n in collate) / len(collate),
            "masked_tokens_per_step": sum(tokens) / len(tokens), "peak_rss_mib": peak_rss_mib, "setup_s": setup_s,
            "allreduce_dense_grad_s": allreduce_s,
            "payload_bytes_per_step": (payload["bytes"] / steps) if mode != "sparse_sampled"
            else sum(sparse_bytes) / len(sparse_bytes) + sum(p.numel() * p.element_size() for p in rest)}
    everyone = [None] * world
    tdist.all_gather_object(everyone, mine)
    dist.destroy()
    return {"n_items": n_items, "mode": mode, "world": world, "steps": steps, "warmup": warmup,
            "params": sum(p.numel() for p in model.parameters()), "dense_grad_bytes": dense_bytes,
            "ranks": everyone}


def launch(*args: str, timeout: float) -> tuple[int, str]:
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"distributed-bench-{os.getpid()}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           "--worker-out", str(out), *args]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {timeout:.0f} s"
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not out.exists():
        tail = [ln for ln in proc.stderr.splitlines() if "Error" in ln or "error" in ln or "Killed" in ln]
        return proc.returncode, "; ".join(tail[-3:]) or proc.stderr[-500:]
    res = json.loads(out.read_text())
    res["launch_wall_s"] = wall
    out.unlink()
    return 0, json.dumps(res)


def mib(b: float) -> str:
    return f"{b / 2**20:,.1f}"


def markdown(payload: dict) -> str:
    rows, failures, check = payload["rows"], payload["failures"], payload["sparse_check"]
    load = payload.get("load_average")
    out = ["# Data-parallel training: step cost at 100k-4M items (2 ranks, gloo, CPU)\n",
           f"A BERT4Rec of dim {DIM} ({LAYERS} layers, {HEADS} heads, max_len {MAX_LEN}) on a synthetic Zipf-like log "
           f"of {N_SEQS:,} histories; global batch {GLOBAL_BATCH} sequences (8 per rank), mask probability 0.3; "
           f"sampled softmax with {NEGATIVES} shared negatives and logQ. Each rank runs one thread (torchrun's "
           "OMP_NUM_THREADS=1) on a 2-core machine shared with other work: the times are costs per step, "
           "not a speed-up (two cores cannot show one, and none is claimed). Memory available at the start: "
           f"{payload['memory_available_gib']:.1f} GiB"
           + (f"; load average at the start and end {load[0]:.1f} and {load[1]:.1f}" if load else "") + ".\n",
           *([f"Note: {payload['note']}\n"] if payload.get("note") else []),
           "| items | mode | step s (mean) | of which optimizer s | all-reduce of a dense gradient alone, s "
           "| payload per step MiB | dense gradient MiB | peak RSS per rank MiB | masked tokens per rank-step |",
           "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        rk = r["ranks"]
        step = max(x["step_s"] for x in rk)
        rss = " / ".join(f"{x['peak_rss_mib']:,.0f}" for x in rk)
        out.append(f"| {r['n_items']:,} | {r['mode']} | {step:.3f} | {max(x['optimizer_s'] for x in rk):.3f} | "
                   f"{rk[0]['allreduce_dense_grad_s']:.3f} | "
                   f"{mib(max(x['payload_bytes_per_step'] for x in rk))} | {mib(r['dense_grad_bytes'])} | {rss} | "
                   f"{sum(x['masked_tokens_per_step'] for x in rk) / len(rk):.0f} |")
    for f in failures:
        out.append(f"| {f['n_items']:,} | {f['mode']} | failed: {f['error']} | | | | | | |")
    out.append("\nStep: the slower rank's mean over the measured steps (after warm-up), batch collate excluded; "
               "it includes forward, backward with DDP's all-reduce, clipping and the optimizer. Payload: the "
               "bytes DDP hands to all-reduce per step (counted by a comm hook); for sparse_sampled, the rank's "
               "coalesced (int64 indices, float32 rows) of the item table plus the dense rest. RSS: each rank's.\n")
    out.append(findings(rows))
    out.append(paper(rows))
    out.append("## Does gloo + DDP take sparse embedding gradients?\n")
    out.append("`python benchmarks/distributed.py --sparse-check` (2 ranks, nn.Embedding(100, 4, sparse=True), "
               "rank 0 looks up ids 1, 2, 3 and rank 1 ids 3, 50):\n")
    out.append("```\n" + json.dumps(check, indent=1) + "\n```\n")
    return "\n".join(out)


def findings(rows: list[dict]) -> str:
    """What the measured table shows, in figures taken from it."""
    by = {(r["n_items"], r["mode"]): r for r in rows}
    sizes = sorted({r["n_items"] for r in rows})

    def f(n, mode, key, agg=max):
        r = by.get((n, mode))
        return None if r is None else agg(x[key] for x in r["ranks"])

    parts = []
    dense = [(n, f(n, "dense_full", "payload_bytes_per_step")) for n in sizes]
    if all(b is not None for _, b in dense):
        parts.append("Dense gradients: DDP all-reduces the whole gradient every step, "
                     + ", ".join(f"{mib(b)} MiB at {n:,} items" for n, b in dense)
                     + " (the item table n_items x 64 x 4 bytes, its bias and under 1 MiB of encoder), and sampled "
                     "softmax does not change that: it saves the logits, not the bytes nor the dense AdamW update of "
                     "every row (the optimizer column, which grows with the catalogue like the all-reduce).")
    sparse = [(n, f(n, "sparse_sampled", "payload_bytes_per_step")) for n in sizes]
    if all(b is not None for _, b in sparse):
        bias = [(n + 2) * 4 for n, _ in sparse]
        parts.append("Sparse gradients: " + ", ".join(f"{mib(b)} MiB at {n:,} items" for n, b in sparse)
                     + "; of which the output bias, a dense (n_items + 2) parameter of the model, is "
                     + ", ".join(f"{mib(b)}" for b in bias) + " MiB: the rows a step touches cost little, the dense "
                     "per-item bias is most of what is left (making it an embedding too is a model change).")
    steps = [(n, f(n, "dense_full", "step_s"), f(n, "dense_sampled", "step_s"), f(n, "sparse_sampled", "step_s"))
             for n in sizes]
    if all(None not in t for t in steps):
        parts.append("Step time on this CPU: " + "; ".join(
            f"{n:,} items {a:.2f} / {b:.2f} / {c:.2f} s (dense full / dense sampled / sparse sampled)"
            for n, a, b, c in steps) + ". Memory per rank at the largest catalogue: "
            + " / ".join(f"{f(sizes[-1], m, 'peak_rss_mib'):,.0f} MiB ({m})" for m in MODES) + ".")
    return "\n".join(parts) + "\n" if parts else ""


# ---- on paper: 1B interactions, 10M items, one node of 8 GPUs and 8 such nodes ------------------------------
# Assumptions (not measured here; typical published figures for H100-class nodes): NCCL all-reduce bus
# bandwidth inside a node (NVLink/NVSwitch) 400 GB/s; across nodes 8 x 400 Gb/s NICs per node, a bus bandwidth
# of 40 GB/s per GPU; HBM 3 TB/s. Time of a ring all-reduce of S bytes on N GPUs: S x 2 (N - 1) / N / busbw.
PAPER = {"items": 10_000_000, "interactions": 1_000_000_000, "dim": 64, "max_len": 200, "mask": 0.3,
         "windows_per_gpu": 256, "negatives": 1024, "busbw_node": 400e9, "busbw_cluster": 40e9, "hbm": 3e12}


def paper(rows: list[dict]) -> str:
    P = PAPER
    table_b = P["items"] * P["dim"] * 4  # fp32 gradient of the item table
    positions = P["windows_per_gpu"] * P["max_len"]  # per GPU and step
    masked = positions * P["mask"]
    unique_rows = min(P["items"], int(0.4 * (positions + masked)) + P["negatives"])  # Zipf: ~40% distinct lookups
    sparse_b = unique_rows * (P["dim"] * 4 + 8)
    a2a_b = (positions + masked + P["negatives"]) * P["dim"] * 4  # looked-up rows, forward (and grads back)
    adam_b = P["items"] * P["dim"] * 28  # read p, g, m, v; write p, m, v (fp32)
    full_flop = masked * P["items"] * P["dim"] * 6  # logits forward + two matmuls backward
    full = [r for r in rows if r["mode"] == "dense_full"]
    big = max(full, key=lambda r: r["n_items"], default=None)
    measured, per_pos, neg_ns = [], None, None
    if big is not None:
        rk = big["ranks"][0]
        measured.append(f"gloo's all-reduce of the {big['n_items']:,}-item dense gradient "
                        f"({mib(big['dense_grad_bytes'])} MiB) took {rk['allreduce_dense_grad_s']:.2f} s on this machine "
                        f"({big['dense_grad_bytes'] / rk['allreduce_dense_grad_s'] / 1e9:.2f} GB/s through loopback)")
        measured.append(f"AdamW over its {big['params'] / 1e6:.0f}M parameters {rk['optimizer_s']:.2f} s a step "
                        f"({rk['optimizer_s'] / big['params'] * 1e9:.0f} ns per parameter on one core: memory-bound, "
                        "it scales with the table, not the batch)")
        per_pos = sum(x["collate_s"] / x["positions_per_global_batch"] for r in full for x in r["ranks"]) / sum(
            len(r["ranks"]) for r in full)
        measured.append(f"building a global batch (masking, padding: Python, on every rank) {per_pos * 1e6:.0f} us "
                        "per position, whatever the catalogue")
        # sampled softmax's negatives: torch.multinomial over the whole catalogue per batch, O(n_items)
        sampled = {r["n_items"]: r for r in rows if r["mode"] == "dense_sampled"}
        if big["n_items"] in sampled:
            extra = (sum(x["collate_s"] for x in sampled[big["n_items"]]["ranks"])
                     - sum(x["collate_s"] for x in big["ranks"])) / len(big["ranks"])
            neg_ns = extra / big["n_items"] * 1e9
            measured.append(f"drawing the {NEGATIVES} negatives (torch.multinomial over the catalogue) about "
                            f"{extra * 1e3:.0f} ms a batch at {big['n_items']:,} items ({neg_ns:.0f} ns per item)")
    lines = ["\n## On paper: 1B interactions, 10M items, 8 GPUs and 8 x 8 GPUs\n",
             f"The same model (d = {P['dim']}, 2 layers), max_len {P['max_len']}, {P['windows_per_gpu']} windows per "
             f"GPU per step ({positions:,} positions, {masked:,.0f} masked), {P['negatives']} shared negatives. An epoch "
             f"of {P['interactions'] / 1e9:.0f}B positions is {P['interactions'] / (8 * positions):,.0f} steps on one "
             f"node and {P['interactions'] / (64 * positions):,.0f} on 64 GPUs. Memory per replica: item table "
             f"{table_b / 1e9:.2f} GB, its gradient {table_b / 1e9:.2f} GB, AdamW moments {2 * table_b / 1e9:.2f} GB: "
             f"{4 * table_b / 1e9:.1f} GB, which fits one GPU.\n",
             "Measured here, for scale: " + "; ".join(measured) + ".\n" if measured else "",
             "Assumed (typical published figures, not measured): NCCL all-reduce bus bandwidth 400 GB/s inside a node, "
             "40 GB/s per GPU across nodes (8 x 400 Gb/s NICs per node); HBM 3 TB/s; a ring all-reduce of S bytes on "
             "N GPUs takes S x 2(N-1)/N / bus bandwidth.\n",
             "| item table training | bytes per GPU per step | 1 node (8 GPUs) comm | 8 nodes (64 GPUs) comm | "
             "optimizer | where the step goes |",
             "|---|---:|---:|---:|---:|---|"]

    def ring(b, n, bw):
        return b * 2 * (n - 1) / n / bw

    lines.append(f"| full softmax, dense gradients (DDP) | {2 * 63 / 64 * table_b / 1e9:.2f} GB (all-reduce of "
                 f"{table_b / 1e9:.2f} GB) | {ring(table_b, 8, P['busbw_node']) * 1e3:.0f} ms | "
                 f"{ring(table_b, 64, P['busbw_cluster']) * 1e3:.0f} ms | {adam_b / P['hbm'] * 1e3:.0f} ms | logits: "
                 f"{full_flop / 1e12:.0f} TFLOP (about {full_flop / 400e12 * 1e3:.0f} ms at 400 TFLOPS) and "
                 f"{masked * P['items'] * 2 / 1e9:,.0f} GB (bf16) per GPU-step: must be chunked; compute-bound |")
    lines.append(f"| sampled softmax, dense gradients (DDP) | same as above | {ring(table_b, 8, P['busbw_node']) * 1e3:.0f} ms "
                 f"| {ring(table_b, 64, P['busbw_cluster']) * 1e3:.0f} ms | {adam_b / P['hbm'] * 1e3:.0f} ms | the "
                 "all-reduce of the whole table, although a step touches a fraction of its rows: the bottleneck across "
                 "nodes |")
    lines.append(f"| sampled softmax, sparse gradients (all-gather of touched rows) | {sparse_b / 1e6:.1f} MB sent, "
                 f"(N-1) x that received | {7 * sparse_b / P['busbw_node'] * 1e3:.1f} ms | "
                 f"{63 * sparse_b / P['busbw_cluster'] * 1e3:.0f} ms | ~1 ms (touched rows) | grows linearly with N (as "
                 "much as the encoder's compute at 64 GPUs); AdamW and clipping do not take sparse gradients "
                 "(SparseAdam, no weight decay); sparse all-reduce over NCCL not measured (no GPU here) |")
    lines.append(f"| sampled softmax, table sharded by rows over the GPUs (all-to-all of looked-up rows) | "
                 f"{a2a_b / 1e6:.0f} MB each way | {2 * a2a_b / P['busbw_node'] * 1e3:.1f} ms | "
                 f"{2 * a2a_b / P['busbw_cluster'] * 1e3:.1f} ms | {adam_b / 64 / P['hbm'] * 1e3:.2f} ms (1/64 of the "
                 "table each) | independent of the catalogue; needs a sharded-embedding library (TorchRec), not DDP |")
    lines.append("\nExpected step time. Compute of the encoder is small at d = 64 (about 1 MFLOP per position, 51 "
                 "GFLOP per GPU-step: a few ms, kernel-launch bound; call it 10 ms). Sampled softmax with dense "
                 f"gradients: one node about 10 + {adam_b / P['hbm'] * 1e3:.0f} + "
                 f"{ring(table_b, 8, P['busbw_node']) * 1e3:.0f} ms = "
                 f"{10 + adam_b / P['hbm'] * 1e3 + ring(table_b, 8, P['busbw_node']) * 1e3:.0f} ms a step "
                 f"({P['interactions'] / (8 * positions) * (10 + adam_b / P['hbm'] * 1e3 + ring(table_b, 8, P['busbw_node']) * 1e3) / 1e3 / 60:.1f} "
                 "min an epoch); 8 nodes about "
                 f"{10 + adam_b / P['hbm'] * 1e3 + ring(table_b, 64, P['busbw_cluster']) * 1e3:.0f} ms a step "
                 f"({P['interactions'] / (64 * positions) * (10 + adam_b / P['hbm'] * 1e3 + ring(table_b, 64, P['busbw_cluster']) * 1e3) / 1e3 / 60:.1f} "
                 "min an epoch): 8 times the GPUs buy little, the inter-node all-reduce of the 10M-row table is the "
                 "bottleneck. With the table sharded by rows the step is compute-bound again (about 10-15 ms, "
                 f"{P['interactions'] / (64 * positions) * 0.015:.0f} s an epoch on 64 GPUs).\n")
    if per_pos is not None:
        lines.append("The next bottleneck is on the host: this loop builds the whole global batch on every rank (that "
                     "is what keeps ranks' shares disjoint without communication). At the measured "
                     f"{per_pos * 1e6:.0f} us per position, a 64-GPU global batch of {64 * positions / 1e6:.1f}M "
                     f"positions costs {64 * positions * per_pos:.0f} s of collate on every rank, per step; on one "
                     f"node {8 * positions * per_pos:.0f} s, against a step of tens of ms. At that scale each rank "
                     "must build only its own share (a task that takes the rank, or a DistributedSampler over "
                     f"windows), and even that ({positions:,} positions, {positions * per_pos:.1f} s at this rate) "
                     "needs a vectorised collate in several data-loader workers per GPU" + (
                         f"; and drawing negatives by torch.multinomial over 10M items (about "
                         f"{neg_ns * P['items'] / 1e6:.0f} ms a batch at the measured rate) needs an alias table or "
                         "a precomputed CDF with searchsorted" if neg_ns else "") + ".\n")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sparse-check", action="store_true")
    p.add_argument("--sizes", default=None, help="comma-separated catalogue sizes")
    p.add_argument("--worker-out", type=Path, default=None)
    p.add_argument("--items", type=int, default=0)
    p.add_argument("--mode", default="dense_full")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--check", action="store_true")
    p.add_argument("--render", action="store_true", help="only rewrite the .md from the .json")
    p.add_argument("--note", default=None, help="with --render: a note on the run, kept in both files")
    args = p.parse_args()
    if args.render:
        render(args.note)
        return
    if args.worker_out is not None:  # a rank under torchrun
        res = sparse_check() if args.check else worker(args.items, args.mode, args.steps, args.warmup)
        if int(os.environ.get("RANK", 0)) == 0:
            args.worker_out.write_text(json.dumps(res))
        return
    code, text = launch("--check", timeout=120)
    check = json.loads(text) if code == 0 else {"error": text}
    check.pop("launch_wall_s", None)
    print(json.dumps(check), file=sys.stderr)
    if args.sparse_check:
        return
    sizes = [10_000] if args.quick else [int(s) for s in args.sizes.split(",")] if args.sizes else list(SIZES)
    steps = {10_000: 5, 100_000: 20, 1_000_000: 8, 4_000_000: 5}
    gib_free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    load0 = os.getloadavg()[0]
    rows, failures = [], []
    for n in sizes:
        for mode in MODES:
            code, text = launch("--items", str(n), "--mode", mode, "--steps", str(steps.get(n, 5)), "--warmup", "2",
                                timeout=300)
            if code != 0:
                failures.append({"n_items": n, "mode": mode, "error": f"exit {code}: {text}"})
                print(f"{n} {mode}: failed: {text}", file=sys.stderr)
                continue
            res = json.loads(text)
            rows.append(res)
            print(f"{n} {mode}: step {max(r['step_s'] for r in res['ranks']):.3f} s, payload "
                  f"{mib(res['ranks'][0]['payload_bytes_per_step'])} MiB, rss "
                  f"{[round(r['peak_rss_mib']) for r in res['ranks']]} MiB", file=sys.stderr)
    payload = {"config": {"dim": DIM, "layers": LAYERS, "heads": HEADS, "max_len": MAX_LEN,
                          "global_batch": GLOBAL_BATCH, "negatives": NEGATIVES, "n_seqs": N_SEQS, "world": 2,
                          "backend": "gloo"},
               "memory_available_gib": gib_free, "load_average": [load0, os.getloadavg()[0]], "rows": rows,
               "failures": failures, "sparse_check": check}
    write_results("distributed", payload, markdown(payload))


def render(note: str | None) -> None:
    """Rewrite the .md from the .json (same command, date and figures), with `note` added if given."""
    from _common import RESULTS

    from recsys_pretrain.io import write_json, write_text

    payload = json.loads((RESULTS / "distributed.json").read_text())
    if note:
        payload["note"] = note
        write_json(RESULTS / "distributed.json", payload)
    m = payload["machine"]
    header = (f"<!-- generated by benchmarks/distributed.py; rerun it to refresh -->\n"
              f"Command: `{payload['command']}`  \nDate: {payload['date']}  \n"
              f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Python {m['python']}, "
              f"Polars {m['polars']}\n\n")
    write_text(RESULTS / "distributed.md", header + markdown(payload))


if __name__ == "__main__":
    main()
