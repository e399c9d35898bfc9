"""The ADM evaluator in PyTorch (thin CLI over mdt_ds.metrics.cli; ``mdt-eval`` is the same
program). Run from a checkout:

    python eval/evaluator.py VIRTUAL_imagenet256_labeled.npz samples/mdtv2_xl2.npz
    torchrun --nproc_per_node=8 eval/evaluator.py REF.npz SAMPLE.npz --out metrics.json
    python eval/evaluator.py ref /data/imagenet/train ref_imagenet256.npz --image-size 256
    python eval/evaluator.py show samples/mdtv2_xl2.npz --max 64   (a labelled grid PNG)

Prints Inception Score, FID, sFID, Precision and Recall as ADM does and writes them as JSON.
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mdt_ds.metrics.cli import main

    sys.exit(main())
