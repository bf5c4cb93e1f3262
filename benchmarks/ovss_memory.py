"""Peak resident memory of ``OVSS.segment`` on a large image, each case in a fresh process.

Peak RSS is the kernel's high-water mark (``VmHWM`` in /proc/self/status, else
``resource.getrusage``), read in the child after the call, so the model, the decoded image and
every buffer of the call count, and one case's garbage cannot lower another's figure.

Examples::

    python benchmarks/ovss_memory.py                       # 90 MP, 5 classes, bundled ovss-shapes-demo
    python benchmarks/ovss_memory.py --megapixels 30 90 --classes 2 5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import numpy as np
from sspsam.predict.ovss import OVSS

mp, k = float(sys.argv[1]), int(sys.argv[2])
h = int((mp * 1e6 * 3 / 4) ** 0.5); w = int(mp * 1e6 / h)
ovss = OVSS.from_pretrained("ovss-shapes-demo", device="cpu")
rgb = np.zeros((h, w, 3), np.uint8)
rgb[: h // 2, : w // 2] = (220, 30, 30)
rgb[h // 2 :, w // 2 :] = (30, 30, 220)
names = ["background", "red", "green", "blue", "yellow", "circle", "square", "ring", "star", "cross"][:k]
t0 = time.perf_counter()
res = ovss.segment(rgb, names)
secs = time.perf_counter() - t0
hwm = None
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        hwm = int(line.split()[1]) * 1024
if hwm is None:
    hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"megapixels": round(h * w / 1e6, 1), "size": f"{w}x{h}", "classes": k, "seconds": round(secs, 1),
                  "peak_rss_gb": round(hwm / 2**30, 2), "classes_present": int(len(np.unique(res.labels)))}))
"""


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--megapixels", nargs="+", type=float, default=[90.0])
    p.add_argument("--classes", nargs="+", type=int, default=[5])
    args = p.parse_args(argv)
    root = str(Path(__file__).resolve().parents[1])
    print("| MP | size | classes | seconds | peak RSS (GB) |\n|---|---|---|---|---|")
    for mp in args.megapixels:
        for k in args.classes:
            out = subprocess.run([sys.executable, "-c", CHILD, str(mp), str(k)], capture_output=True, text=True,
                                 env={**__import__("os").environ, "PYTHONPATH": root})
            if out.returncode:
                print(f"| {mp:g} | - | {k} | failed: {out.stderr.strip().splitlines()[-1:]} | - |")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {r['megapixels']:g} | {r['size']} | {k} | {r['seconds']} | {r['peak_rss_gb']} |")


if __name__ == "__main__":
    main()
