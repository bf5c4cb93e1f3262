"""Run under torchrun: one training step of the tiny config, then each rank saves its weights."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from sspsam.config import load_config
from sspsam.engine.trainer import train


def main(data_root: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = load_config("ssp-sam-tiny")
    cfg["train"] = {"freeze": ["clip", "sam.image_encoder"], "warmup_steps": 1}
    res = train(cfg, data_root, Path(out_dir) / "run", steps=1, batch_size=2, lr=1e-3, decoder_lr=1e-3, seed=3407,
                ckpt_every=1, tensorboard=False)
    sd = {k: v.detach().cpu() for k, v in res["module"].state_dict().items()}
    torch.save({"state_dict": sd, "world": dist.get_world_size(), "step": res["step"]}, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
