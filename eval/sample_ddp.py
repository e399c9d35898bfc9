"""Sample images for FID-50K into an ADM .npz, on any number of processes (thin CLI over
mdt_ds.tools.sample; ``mdt-sample`` is the same program). Run from a checkout:

    torchrun --nproc_per_node=8 eval/sample_ddp.py --ckpt mdt_xl2_v2_ckpt.pt --model MDTv2-XL/2 \\
        --num-samples 50000 --cfg-scale 3.8 --cfg-pow 4 --output samples/mdtv2_xl2.npz
    srun --ntasks-per-node=8 --gpus-per-node=8 python eval/sample_ddp.py ...

Rerun the same command after an interruption: finished shards are kept, missing indices made.
See ``--help`` for every option.
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mdt_ds.tools.sample import main

    sys.exit(main())
