"""The README's model picture: one MoNuSeg test crop, ground truth, then each checkpoint's nuclei, each panel
titled with the whole image's AJI / PQ / object precision (the crop is for the eye, the scores are not).

    python tools/model_figure.py --image TCGA-2Z-A9J9-01A-01-TS1 --crop 300,300,350 \
        --model "paper model=runs/.../supervised-old/best.pt" --model "instance model=runs/.../supervised/best.pt" \
        --out docs/model_comparison.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cdcl.data import load_dataset
from cdcl.inference.predictor import load_predictor, predict_instances
from cdcl.metrics import evaluate_pair
from cdcl.viz import plot_comparison_grid

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "monuseg"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", required=True, help="MoNuSeg test image stem")
    parser.add_argument("--crop", required=True, help="y,x,size of the square crop shown")
    parser.add_argument("--model", action="append", required=True, metavar="TITLE=CKPT")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dataset = load_dataset(args.data, "monuseg")
    item = next(it for it in dataset if it.name == f"test/{args.image}")
    y, x, size = (int(v) for v in args.crop.split(","))
    window = (slice(y, y + size), slice(x, x + size))
    panels = [("ground truth", item.instances[window])]
    for spec in args.model:
        title, _, path = spec.partition("=")
        _, labels = predict_instances(load_predictor(path, device="cpu"), item.image)
        s = evaluate_pair(item.instances, labels)
        panels.append((f"{title}: AJI {s['aji']:.2f}, PQ {s['pq']:.2f}", labels[window]))
        print(title, {k: round(s[k], 3) for k in ("dice", "aji", "pq", "precision", "recall")})
    plot_comparison_grid(item.image[window], panels, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
