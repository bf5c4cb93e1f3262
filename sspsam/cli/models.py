"""`sspsam models`: every model name each command accepts, and whether its files are here."""

from __future__ import annotations


def models() -> None:
    """List every model each command accepts, and whether the weights it needs are here.

    bundled: shipped inside sspsam. zeroshot: pretrained CLIP + SAM, nothing trained. variant: an
    architecture whose trained checkpoint you pass by path (`sspsam train` makes one).
    """
    from sspsam.predict.catalog import catalog

    rows = catalog()
    width = max(len(r["name"]) for r in rows)
    for command in ("segment", "ovss"):
        print(f"sspsam {command} --model …")
        for r in rows:
            if command in r["commands"]:
                print(f"  {r['name']:<{width}}  {r['kind']:<8}  {r['weights']}")
    print("Any sspsam checkpoint path works too, and for `segment` a folder `sspsam export onnx` wrote (ONNX Runtime). "
          "Weights: `sspsam weights list`; missing ones are downloaded on first use unless --offline / SSPSAM_OFFLINE=1.")
