"""One line per `bench train` JSON of bench/gpu_issue28.sh: step time, peak allocated / reserved, and
whether it holds the profile's reserved limit; exit 1 where it does not (the script retries at 8 x 2).
    python bench/issue28_fits.py JSON METHOD LIMIT_GIB"""

import json
import sys

path, method, limit = sys.argv[1], sys.argv[2], float(sys.argv[3])
try:
    d = json.load(open(path))["methods"][method]
except (OSError, KeyError, ValueError) as e:
    print(path, "no result:", type(e).__name__)
    sys.exit(1)
fits = "error" not in d and d.get("peak_reserved_gib", 99.0) <= limit
if "error" in d:
    print(path.split("/")[-1], "error", d["error"][:120])
else:
    print(
        path.split("/")[-1],
        f"step {d['step_time_s_median']:.3f} s, allocated {d['peak_mem_gib']:.2f},"
        f" reserved {d['peak_reserved_gib']:.2f} GiB",
        "fits" if fits else "OVER",
    )
sys.exit(0 if fits or method == "peft_reference" else 1)
