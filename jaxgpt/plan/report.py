"""A plan record as text: what the compiled steps need on each chip and what the chip allows."""

from __future__ import annotations


def size(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return ""


def _memory_lines(mem: dict) -> list[str]:
    lines = [f"  parameters {size(mem['parameters'])}, optimizer state {size(mem['optimizer'])}"
             if mem.get("parameters") or mem.get("optimizer") else None]
    if "peak" not in mem:
        return [x for x in lines if x] + ["  (this backend reports no memory analysis)"]
    verdict = ("fits" if mem["fits"] else "DOES NOT FIT") + f" in {size(mem['budget'])} usable " \
        f"(headroom {size(mem['headroom'])})"
    lines += [f"  arguments {size(mem['arguments'])}, outputs {size(mem['outputs'])} "
              f"({size(mem['aliased'])} donated), temporaries {size(mem['temporaries'])}",
              f"  peak {size(mem['peak'])}: {verdict}"]
    return [x for x in lines if x]


def _roofline_line(roof: dict | None, unit: str) -> str:
    if roof is None:
        return "  roofline: no datasheet figures for this chip"
    return (f"  roofline: {roof['step_s'] * 1e3:.2f} ms/step ({roof['bound']}-bound: compute "
            f"{roof['compute_s'] * 1e3:.2f}, HBM {roof['memory_s'] * 1e3:.2f}, collectives "
            f"{roof['collective_s'] * 1e3:.2f} ms) = {roof['tokens_per_s']:,.0f} {unit}/s at most, "
            f"MFU <= {roof['mfu']:.0%}")


def train_lines(t: dict) -> list[str]:
    mesh = " ".join(f"{k}={v}" for k, v in t["mesh"].items())
    att, flops = t["attention"], t["flops"]
    evidence = ", ".join(f"{k} x{v}" for k, v in att["evidence"].items()) or "none"
    why = f" ({att['reason']})" if att["reason"] else ""
    coll = ", ".join(f"{k} x{v['count']} {size(v['bytes'])}" for k, v in t["collectives"].items())
    xla = flops["xla_per_device"]
    return [
        f"train step: batch {t['batch_size']} = {t['accum_steps']} micro-batch(es) of "
        f"{t['rows_per_device']} rows per device; mesh {mesh}; remat {t['remat_policy']}; "
        f"compiled in {t['compile_s']:.1f} s",
        *_memory_lines(t["memory"]),
        f"  FLOPs: {flops['analytic_per_token'] / 1e9:.3f} GFLOP/token (6N + 12LDT), "
        f"{flops['analytic_per_step'] / 1e12:.2f} TFLOP/step; XLA's count per device: "
        + (f"{xla / 1e12:.2f} TFLOP (a loop body, such as the accumulation scan, counted once)" if xla else "none (this backend does not count)"),
        f"  attention: {att['kernel']}{why}; in the program: {evidence}",
        f"  collectives per device: {coll or 'none'}",
        _roofline_line(t["roofline"], "tokens"),
    ]


def decode_lines(d: dict) -> list[str]:
    calls = ", ".join(f"{k} x{v}" for k, v in d["custom_calls"].items()) or "none"
    return [f"decode step (serving engine): {d['slots']} rows over a {d['max_len']}-slot KV cache "
            f"({size(d['cache_bytes'])}), one chip; compiled in {d['compile_s']:.1f} s",
            *_memory_lines(d["memory"]), f"  custom calls: {calls}",
            _roofline_line(d["roofline"], "tokens")]


def text(record: dict) -> str:
    """The record as the report `python -m jaxgpt.cli.plan` prints."""
    lines = [f"plan for {record['target']}: {record['chips']} x {record['chip']} "
             f"({size(record['chip_memory'])} each, {record['hosts']} host(s)); "
             f"{record['parameters']:,} matmul parameters, compute {record['model']['dtype']}, "
             f"kernels={record['model']['kernels']}"]
    lines += train_lines(record["train"])
    if "decode" in record:
        lines += decode_lines(record["decode"])
    for a in record.get("advice", []):
        lines.append(f"  to fit: {a['change']}: peak {size(a['peak'])} "
                     f"({'fits' if a['fits'] else 'still too big'})")
    return "\n".join(lines)


def search_lines(rows: list[dict]) -> str:
    """Shapes that fit, fastest roofline first: one line each."""
    out = ["mesh (data fsdp tensor)  batch  accum  rows/device  peak        ms/step  tokens/s"]
    for r in rows:
        m, roof = r["mesh"], r["roofline"] or {}
        out.append(f"{m['data']:>4} {m['fsdp']:>4} {m['tensor']:>6}       {r['batch_size']:>5}  "
                   f"{r['accum_steps']:>5}  {r['rows_per_device']:>11}  "
                   f"{size(r['memory'].get('peak')):>10}  {roof.get('step_s', 0) * 1e3:>7.2f}  "
                   f"{roof.get('tokens_per_s', 0):>9,.0f}")
    return "\n".join(out)
