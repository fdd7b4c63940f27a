"""Decode speed figures (issue 11). Run: python benchmarks/decode.py [--quick] [--no-tp] [--threads N]

Prints one `name: value` line per figure, all measured in this one run. Contenders are timed
interleaved (A, B, A, B, ...) and each figure is a median over REPS rounds, so that load from other
processes hits them alike.

    decode_ms_b1, hf_ms_b1, decode_vs_hf_b1    our Llama's greedy generate (static KV cache, models.generate)
                                               vs transformers' LlamaForCausalLM.generate, same weights, fp32,
                                               config hidden 256, FFN 512, 4 layers, 4 heads, 2 KV heads,
                                               vocab 8192; ms per decode step (= per token at batch 1)
    ..._b8                                     the same at batch 8 (tok/s = 8 / step)
    decode_compiled_vs_hf_b<n>                 the same Llama, forward through torch.compile (dynamic shapes),
                                               vs HF; ..._same_tokens says it decodes the eager model's tokens
    decode_bf16_vs_hf_fp32_b<n>                our Llama with its weights cast to bf16 (half the bytes read
                                               per token) vs HF in fp32: not the same numerics
    tpb_vs_llama_decode_b1                     a sandwich TPB of equal parameters vs that Llama (tokens/s
                                               ratio, one device, the model's own decode)
    tp2_llama_step_ms, tp2_hybrid_step_ms      tensor-parallel decode step on 2 processes (gloo, 1 thread each)
    tp2_measured_speedup                       Llama step / hybrid step at G = 2
    tp2_predicted_speedup                      the same from eq. 9 / 10 calibrated here (analysis/decode_measure.py)
    tp2_model_error                            max over both models of |measured - predicted| / measured;
                                               tp2_<model>_worst_term names the term that misses most
    ..._gap_t_sync                             the same with t_sync measured after the step's compute gap
    tp2_comm_l<n>_step_ms, tp2_no_comm_step_ms the delayed-communication curve, tp2_comm_threshold
    large_*                                    the same TP figures for a Llama whose weights exceed the LLC
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/models.py

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root

from analysis import decode_measure as dm  # noqa: E402
from models import build_model  # noqa: E402
from models.counts import param_count  # noqa: E402
from models.hf import to_hf  # noqa: E402

REPS, PROMPT = 5, 16


def _interleaved(fns: dict, reps: int) -> dict[str, float]:
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _compiled_copy(model):
    """The same weights, forward through torch.compile(dynamic=True): one graph for the prefill and one for
    the one-token step at any position (about 30 s of compiling on this CPU, paid in the warm-up)."""
    twin = build_model(model.cfg).eval()
    twin.load_state_dict(model.state_dict())
    twin.forward = torch.compile(twin.forward, dynamic=True)
    return twin


def vs_hf(new_tokens: int, reps: int, compiled: bool = True) -> list[str]:
    cfg = dm.llama(max_seq_len=PROMPT + new_tokens + 1)
    torch.manual_seed(0)
    ours = build_model(cfg).eval()
    hf = to_hf(ours).eval()
    fast = _compiled_copy(ours) if compiled else None
    hybrid = build_model(dm.hybrid_like(cfg)).eval()
    half = build_model(cfg).eval()
    half.load_state_dict(ours.state_dict())
    half = half.bfloat16()
    lines = [f"decode_threads: {torch.get_num_threads()}", f"llama_params: {param_count(cfg)}",
             f"hybrid_params: {param_count(hybrid.cfg)}"]
    for batch in (1, 8):
        prompt = torch.randint(0, cfg.vocab_size, (batch, PROMPT), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(prompt)
        fns = {
            "ours": lambda p=prompt: ours.generate(p, new_tokens, temperature=0),
            "hf": lambda p=prompt, m=mask: hf.generate(p, attention_mask=m, max_new_tokens=new_tokens,
                                                       min_new_tokens=new_tokens, do_sample=False,
                                                       eos_token_id=None, pad_token_id=0),
            "hybrid": lambda p=prompt: hybrid.generate(p, new_tokens, temperature=0),
            "bf16": lambda p=prompt: half.generate(p, new_tokens, temperature=0),
        }
        if fast is not None:
            fns["compiled"] = lambda p=prompt: fast.generate(p, new_tokens, temperature=0)
        t = {k: v / new_tokens for k, v in _interleaved(fns, reps).items()}  # per step (prefill amortised)
        lines += [f"decode_ms_b{batch}: {t['ours'] * 1e3:.3f}", f"hf_ms_b{batch}: {t['hf'] * 1e3:.3f}",
                  f"decode_tok_s_b{batch}: {batch / t['ours']:.0f}", f"hf_tok_s_b{batch}: {batch / t['hf']:.0f}",
                  f"decode_vs_hf_b{batch}: {t['hf'] / t['ours']:.2f}",
                  f"decode_bf16_vs_hf_fp32_b{batch}: {t['hf'] / t['bf16']:.2f}",
                  f"tpb_vs_llama_decode_b{batch}: {t['ours'] / t['hybrid']:.2f}"]
        if fast is not None:
            same = torch.equal(fast.generate(prompt, new_tokens, temperature=0),
                               ours.generate(prompt, new_tokens, temperature=0))
            lines += [f"decode_compiled_ms_b{batch}: {t['compiled'] * 1e3:.3f}",
                      f"decode_compiled_vs_hf_b{batch}: {t['hf'] / t['compiled']:.2f}",
                      f"decode_compiled_same_tokens_b{batch}: {same}"]
    return lines


def tp_lines(prefix: str, result: dm.Measured) -> list[str]:
    at = {(r.name, r.world): r for r in result.rows}
    llama, hybrid = at[("llama", 2)], at[("hybrid", 2)]
    lines = [f"{prefix}t_sync_us: {llama.t_sync_s * 1e6:.0f}",
             f"{prefix}tp1_llama_step_ms: {at[('llama', 1)].step_s * 1e3:.3f}",
             f"{prefix}tp1_hybrid_step_ms: {at[('hybrid', 1)].step_s * 1e3:.3f}",
             f"{prefix}tp2_llama_step_ms: {llama.step_s * 1e3:.3f}",
             f"{prefix}tp2_hybrid_step_ms: {hybrid.step_s * 1e3:.3f}",
             f"{prefix}tp2_llama_syncs: {llama.syncs}", f"{prefix}tp2_hybrid_syncs: {hybrid.syncs}",
             f"{prefix}tp2_measured_speedup: {llama.step_s / hybrid.step_s:.2f}",
             f"{prefix}tp2_predicted_speedup: {llama.predicted_s / hybrid.predicted_s:.2f}",
             f"{prefix}tp2_model_error: {max(llama.error, hybrid.error):.3f}",
             f"{prefix}t_sync_gap_us: {llama.t_sync_gap_s * 1e6:.0f}",
             f"{prefix}tp2_predicted_speedup_gap_t_sync: {llama.predicted_gap_s / hybrid.predicted_gap_s:.2f}",
             f"{prefix}tp2_model_error_gap_t_sync: {max(llama.error_gap, hybrid.error_gap):.3f}",
             f"{prefix}tp2_llama_us_per_sync_in_step: {llama.sync_s / max(llama.syncs, 1) * 1e6:.0f}",
             f"{prefix}tp2_hybrid_us_per_sync_in_step: {hybrid.sync_s / max(hybrid.syncs, 1) * 1e6:.0f}"]
    for r in (llama, hybrid):
        terms = r.term_errors()
        lines += [f"{prefix}tp2_{r.name}_error: {r.error:.3f}", f"{prefix}tp2_{r.name}_worst_term: {r.worst_term()}"]
        lines += [f"{prefix}tp2_{r.name}_{k}_term_error: {v:+.3f}" for k, v in terms.items()]
    for length, step, wait in result.curve:
        lines.append(f"{prefix}tp2_comm_l{length}_step_ms: {step * 1e3:.3f}")
        lines.append(f"{prefix}tp2_comm_l{length}_wait_ms: {wait * 1e3:.3f}")
    if result.curve and result.no_comm is not None:
        lines.append(f"{prefix}tp2_no_comm_step_ms: {result.no_comm.step_s * 1e3:.3f}")
    if result.threshold is not None and result.curve:
        lines.append(f"{prefix}tp2_comm_threshold: {result.threshold:.2f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer tokens and rounds")
    parser.add_argument("--no-tp", action="store_true", help="single-device figures only")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile contender (~60 s)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads of the single-device part (0 = default)")
    parser.add_argument("--figure", default=None, metavar="PNG",
                        help="also print the decode-measure table and draw it (python -m analysis decode-measure)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reps, tokens = (3, 32) if args.quick else (REPS, 64)
    for line in vs_hf(tokens, reps, compiled=not args.no_compile):
        print(line, flush=True)
    if args.no_tp:
        return
    steps, repeats = (16, 2) if args.quick else (32, 3)
    base = dm.llama()
    result = dm.measure(base, 4, 6, [2], 1, steps, repeats)
    for line in tp_lines("", result):
        print(line, flush=True)
    if args.figure:
        print("\n".join(dm.report(result)), flush=True)
        dm.figure(result.rows, result.curve, result.no_comm.step_s if result.no_comm else None, result.threshold,
                  args.figure)
    large = dm.llama(hidden=768, layers=6, heads=4, kv_heads=2)
    print(f"large_weights_mib: {sum(dm.read_bytes(large)) / 2**20:.0f}", flush=True)
    llc = dm.llc_bytes()
    print(f"llc_mib: {llc / 2**20 if llc else float('nan'):.0f}", flush=True)
    result = dm.measure(large, 4, 6, [2], 1, steps // 2, repeats, curve=False)
    for line in tp_lines("large_", result):
        print(line, flush=True)
    if args.figure:
        print("\n".join(dm.report(result)), flush=True)


if __name__ == "__main__":
    main()
