"""Turn a pytest-benchmark JSON file into a markdown table (median ms, peak extra MiB, ratios).

    python benchmarks/summarize.py results.json [--baseline cut_cross_entropy]
"""

import argparse
import json
from collections import defaultdict


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("json_file")
    ap.add_argument("--baseline", action="append", help="variant a ratio column divides by (repeatable)")
    args = ap.parse_args()
    baselines = args.baseline or ["naive_fp32"]
    with open(args.json_file) as f:
        data = json.load(f)
    groups = defaultdict(dict)
    for b in data["benchmarks"]:
        params = dict(b.get("params") or {})
        variant = params.pop("variant", None) or params.pop("method", None) or b["name"]
        case = ", ".join(f"{k}={v}" for k, v in sorted(params.items()))
        groups[f"{b['name'].split('[')[0]}[{case}]"][variant] = b
    print(f"machine: {data.get('machine_info', {}).get('node', '?')}")
    print("| case | variant | median ms | " + " | ".join(f"vs {b}" for b in baselines) + " | extra info |")
    print("|---|---|---|" + "---|" * len(baselines) + "---|")
    for key, rows in groups.items():
        for variant, b in rows.items():
            med = b["stats"]["median"]
            ratios = [f"{med / rows[base]['stats']['median']:.2f}x" if base in rows else "-"
                      for base in baselines]
            extra = ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in b.get("extra_info", {}).items())
            print(f"| {key} | {variant} | {1e3 * med:.2f} | " + " | ".join(ratios) + f" | {extra} |")


if __name__ == "__main__":
    main()
